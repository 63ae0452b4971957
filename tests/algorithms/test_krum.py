"""Krum, Multi-Krum and Bulyan: hand-computed golden numbers, an outlier, bad input, the
fallback of a round with too few replies, config errors, and a one-round run of the tiny model."""

import logging

import pytest
import torch

from fedpeft.algorithms import coordinate_median, make_algorithm
from fedpeft.algorithms.krum import (
    bulyan,
    bulyan_select,
    check_clients,
    krum,
    krum_scores,
    krum_select,
    mean_around_median,
    min_clients,
    multi_krum,
    multi_krum_select,
    pairwise_sq_distances,
)
from fedpeft.config import ConfigError, build_config
from tests.conftest import tiny_config

# -- Krum and Multi-Krum: five clients, f = 1, points (a, b) split over two tensors -------------
# A (0, 0), B (1, 0), C (0, 2), D (3, 3), E (100, 0), sent in the order E, D, B, A, C.
# n - f - 2 = 2 neighbours. Squared distances and the two smallest of each row:
#   A: B 1, C 4, D 18, E 10000          -> 1 + 4 = 5
#   B: A 1, C 5, D 13, E 9801           -> 1 + 5 = 6
#   C: A 4, B 5, D 10, E 10004          -> 4 + 5 = 9
#   D: C 10, B 13, A 18, E 9418         -> 10 + 13 = 23
#   E: B 9801, A 10000, D 9418, C 10004 -> 9418 + 9801 = 19219
POINTS = {"E": (100.0, 0.0), "D": (3.0, 3.0), "B": (1.0, 0.0), "A": (0.0, 0.0), "C": (0.0, 2.0)}
GLOBAL = {"a": torch.zeros(1), "b": torch.zeros(1), "step": torch.tensor(7)}


def states(points):
    return [
        {"a": torch.tensor([x]), "b": torch.tensor([y]), "step": torch.tensor(i * 10)}
        for i, (x, y) in enumerate(points)
    ]


FIVE = states(POINTS.values())


def test_pairwise_distances_and_scores_golden():
    distances = pairwise_sq_distances(GLOBAL, FIVE)
    assert distances[3].tolist() == [10000.0, 18.0, 1.0, 0.0, 4.0]  # A's row
    assert torch.equal(distances, distances.T)
    assert krum_scores(distances, 1).tolist() == [19219.0, 23.0, 6.0, 5.0, 9.0]


def test_krum_picks_the_most_central_client():
    assert krum_select(GLOBAL, FIVE, 1) == 3  # A
    out = krum(GLOBAL, FIVE, 1)
    assert (out["a"].item(), out["b"].item()) == (0.0, 0.0)
    assert out["a"].dtype == torch.float32


def test_multi_krum_averages_the_m_best():
    assert multi_krum_select(GLOBAL, FIVE, 1, m=3) == [3, 2, 4]  # A, B, C
    out = multi_krum(GLOBAL, FIVE, 1, m=3)  # ((0 + 1 + 0) / 3, (0 + 0 + 2) / 3)
    assert out["a"].item() == pytest.approx(1 / 3) and out["b"].item() == pytest.approx(2 / 3)
    default = multi_krum(GLOBAL, FIVE, 1)  # m = n - f = 4 adds D: (4 / 4, 5 / 4)
    assert (default["a"].item(), default["b"].item()) == (1.0, 1.25)
    every = multi_krum(GLOBAL, FIVE, 1, m=5)  # m = n: the plain mean (104 / 5, 5 / 5)
    assert every["a"].item() == pytest.approx(20.8) and every["b"].item() == pytest.approx(1.0)


def test_integer_tensors_are_left_out_and_keep_the_first_value():
    for out in (
        krum(GLOBAL, FIVE, 1),
        multi_krum(GLOBAL, FIVE, 1),
        coordinate_median(GLOBAL, FIVE),
    ):
        assert out["step"].item() == 0 and out["step"].dtype == torch.int64
    # a huge integer difference does not move any distance
    shifted = [{**s, "step": torch.tensor(10**12 * i)} for i, s in enumerate(FIVE)]
    assert torch.equal(pairwise_sq_distances(GLOBAL, shifted), pairwise_sq_distances(GLOBAL, FIVE))


def test_half_precision_states_keep_their_dtype():
    half = [{k: v.half() if v.is_floating_point() else v for k, v in s.items()} for s in FIVE]
    glob = {k: v.half() if v.is_floating_point() else v for k, v in GLOBAL.items()}
    assert multi_krum(glob, half, 1, m=3)["a"].dtype == torch.float16
    assert krum_select(glob, half, 1) == 3


# -- Bulyan: seven clients, f = 1, one coordinate ------------------------------------------------
# values 9, 50, 0, 5, -70, 2, 1 (clients 0..6); theta = n - 2f = 5, beta = theta - 2f = 3.
# Squared distances among the honest 0, 1, 2, 5, 9: 0-1 1, 0-2 4, 0-5 25, 0-9 81, 1-2 1, 1-5 16,
# 1-9 64, 2-5 9, 2-9 49, 5-9 16; 50 is 1681 from 9 and farther from the rest, -70 is 4900 from 0.
# pick 1, r = 7, 4 neighbours: 0: 1+4+25+81 = 111, 1: 1+1+16+64 = 82, 2: 1+4+9+49 = 63,
#        5: 9+16+16+25 = 66, 9: 16+49+64+81 = 210, 50 and -70 in the thousands  -> 2 (client 5)
# pick 2, r = 6, 3 neighbours: 0: 1+25+81 = 107, 1: 1+16+64 = 81, 5: 16+16+25 = 57,
#        9: 16+64+81 = 161                                                     -> 5 (client 3)
# pick 3, r = 5, 2 neighbours: 0: 1+81 = 82, 1: 1+64 = 65, 9: 64+81 = 145      -> 1 (client 6)
# pick 4, r = 4, 1 neighbour: 0: 81, 9: 81, 50: 1681, -70: 4900; 0 and 9 tie, and 0 has the lower
#        score over all seven (111 < 210)                                     -> 0 (client 2)
#        (the lower index alone would have taken 9, client 0)
# pick 5, r = 3, 1 neighbour: 9: 1681, 50: 1681, -70: 6241; 9's overall 210 wins -> 9 (client 0)
# S = {0, 1, 2, 5, 9}: median 2, distances 2, 1, 0, 3, 7 -> the 3 closest 0, 1, 2 -> mean 1.0
# (a plain trimmed mean of S would give (1 + 2 + 5) / 3, FedAvg (17 + 50 - 70) / 7 = -3/7)
BULYAN_VALUES = [9.0, 50.0, 0.0, 5.0, -70.0, 2.0, 1.0]
BULYAN_GLOBAL = {"w": torch.zeros(1)}
SEVEN = [{"w": torch.tensor([v])} for v in BULYAN_VALUES]


def test_bulyan_selection_golden():
    assert bulyan_select(BULYAN_GLOBAL, SEVEN, 1) == [5, 3, 6, 2, 0]


def test_bulyan_mean_around_the_median_golden():
    assert bulyan(BULYAN_GLOBAL, SEVEN, 1)["w"].item() == pytest.approx(1.0)
    # per coordinate: column 0 as above -> 1.0; column 1 sorted 2, 3, 4, 8, 9, median 4,
    # distances 2, 1, 0, 4, 5 -> 2, 3, 4 -> 3.0 (the two columns use different clients)
    stack = torch.tensor([[0.0, 9.0], [1.0, 4.0], [2.0, 3.0], [5.0, 8.0], [9.0, 2.0]])
    assert mean_around_median(stack, 3).tolist() == [1.0, 3.0]
    # even count: median of 1, 2, 4, 10 is 3; the two closest are 2 and 4; a distance tie
    # (1, 2, 4, 5 around 3) goes to the smaller value: 2 and 4, then 1 before 5
    assert mean_around_median(torch.tensor([[10.0], [1.0], [4.0], [2.0]]), 2).tolist() == [3.0]
    assert mean_around_median(torch.tensor([[5.0], [1.0], [4.0], [2.0]]), 3).tolist() == [
        pytest.approx(7 / 3)
    ]


def test_bulyan_with_f_zero_is_the_mean():
    three = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 6.0)]
    assert bulyan(BULYAN_GLOBAL, three, 0)["w"].item() == pytest.approx(3.0)


# -- one huge outlier ----------------------------------------------------------------------------
def test_one_huge_update_moves_fedavg_but_not_the_krum_family():
    anchor = {"w": torch.zeros(3), "step": torch.tensor(0)}
    honest = [[1.0, 1.1, 0.9], [1.1, 0.9, 1.0], [0.9, 1.0, 1.1], [1.0, 1.0, 1.0], [1.05, 0.95, 1.0]]
    honest += [[0.95, 1.05, 1.0]]
    rows = [{"w": torch.tensor(r), "step": torch.tensor(1)} for r in honest]
    rows.insert(2, {"w": torch.tensor([1e6, -1e6, 1e6]), "step": torch.tensor(1)})
    samples = [10] * len(rows)
    moved = make_algorithm("fedavg").aggregate(anchor, rows, samples)["w"]
    assert (moved - 1.0).abs().max().item() > 1e3
    for name in ("krum", "multi_krum", "bulyan"):
        out = make_algorithm(name, num_byzantine=1).aggregate(anchor, rows, samples)["w"]
        assert ((out - 1.0).abs() <= 0.1 + 1e-6).all(), (name, out)


# -- settings and bad input ----------------------------------------------------------------------
def test_minimum_clients_and_one_line_errors():
    assert (min_clients("krum", 1), min_clients("multi_krum", 2), min_clients("bulyan", 1)) == (
        5,
        7,
        7,
    )
    check_clients("krum", 5, 1)
    check_clients("bulyan", 7, 1)
    with pytest.raises(ValueError) as info:
        check_clients("krum", 4, 1)
    assert (
        str(info.value) == "krum with f = 1 needs at least 5 clients per round (n > 2f + 2), got 4"
    )
    with pytest.raises(
        ValueError, match=r"bulyan with f = 2 needs at least 11 .*n >= 4f \+ 3.*got 10"
    ):
        check_clients("bulyan", 10, 2)
    with pytest.raises(ValueError, match="needs at least 5"):
        krum(GLOBAL, FIVE[:4], 1)
    with pytest.raises(ValueError, match="m must be in"):
        multi_krum(GLOBAL, FIVE, 1, m=6)
    with pytest.raises(ValueError, match="lacks key 'step'"):
        krum(GLOBAL, [{"a": s["a"], "b": s["b"]} for s in FIVE], 1)
    with pytest.raises(ValueError, match="shape"):
        krum(GLOBAL, [{**s, "a": torch.zeros(2)} for s in FIVE], 1)
    with pytest.raises(ValueError, match="num_byzantine"):
        make_algorithm("krum", num_byzantine=-1)


def test_too_few_replies_fall_back_to_the_median(caplog):
    four = FIVE[:4]
    with caplog.at_level(logging.WARNING, logger="fedpeft.algorithms"):
        out = make_algorithm("bulyan", num_byzantine=1).aggregate(GLOBAL, four, [1] * 4)
    expected = coordinate_median(GLOBAL, four)
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    assert "bulyan with f = 1 needs 7 replies, got 4" in caplog.text


def test_multi_krum_m_is_capped_at_n_minus_f():
    out = make_algorithm("multi_krum", num_byzantine=1, multi_krum_m=50).aggregate(
        GLOBAL, FIVE, [1] * 5
    )
    assert (out["a"].item(), out["b"].item()) == (1.0, 1.25)  # m = 4, as above
    assert "m=50" in repr(make_algorithm("multi_krum", multi_krum_m=50))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"algorithm": "krum", "num_clients": 10, "clients_per_round": 4},
            "clients_per_round: krum with f = 1 needs at least 5 clients per round "
            "(n > 2f + 2), got 4 (robust.num_byzantine)",
        ),
        (
            {
                "algorithm": "bulyan",
                "num_clients": 20,
                "clients_per_round": 10,
                "robust": {"num_byzantine": 2},
            },
            "bulyan with f = 2 needs at least 11 clients per round (n >= 4f + 3), got 10",
        ),
        (
            {"algorithm": "multi_krum", "clients_per_round": 6, "robust": {"multi_krum_m": 6}},
            "robust.multi_krum_m: 6 is more than clients_per_round - num_byzantine (5)",
        ),
        ({"robust": {"num_byzantine": -1}}, "robust.num_byzantine:"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_config(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_settings_reach_the_server_algorithm():
    from fedpeft.job import build_algorithm

    config = build_config(
        {"algorithm": "multi_krum", "robust": {"num_byzantine": 2, "multi_krum_m": 3}}
    )
    algorithm = build_algorithm(config)
    assert (algorithm.name, algorithm.num_byzantine, algorithm.multi_krum_m) == ("multi_krum", 2, 3)


def test_one_round_of_the_tiny_model_with_krum(tmp_path, toy_data):
    from tests.engine.test_local import metrics, run_once

    config = tiny_config(
        toy_data, algorithm="krum", num_clients=8, clients_per_round=7, rounds=1, local_steps=2
    )
    summary, run = run_once(tmp_path / "krum", **config)
    rows = metrics(run)
    assert len(rows) == 1 and len(rows[0]["clients"]) == 7 and rows[0]["clients_rejected"] == []
    assert summary["final_accuracy"] is not None
    assert "algorithm: krum" in (run.path / "config.yaml").read_text()
