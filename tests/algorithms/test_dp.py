"""DP-FedAvg: clipping, the noise scale, adaptive clipping, the accountant against an independent
RDP computation, and a tiny run that reports growing epsilon and stops at its budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.algorithms import dp
from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

WALL = ("wall_time_s", "wall_time_total_s", "train_wall_s")


# -- pure functions -------------------------------------------------------------------------------
def test_clip_scales_a_long_update_to_the_clip_norm_and_keeps_a_short_one():
    update = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64), "b": torch.tensor([4.0])}
    clipped = dp.clip(update, 2.5)  # norm 5 over both tensors together
    assert dp.global_norm(clipped) == pytest.approx(2.5)
    assert clipped["a"].tolist() == pytest.approx([1.5, 0.0])
    assert clipped["b"].tolist() == pytest.approx([2.0])
    assert dp.clip(update, 10.0)["b"].tolist() == [4.0]


def test_noise_std_is_z_times_c_over_n():
    assert dp.noise_std(1.2, 0.5, 4) == pytest.approx(0.15)


def test_without_noise_dp_fedavg_is_the_uniform_mean_of_clipped_updates():
    g = {"w": torch.zeros(2), "step": torch.tensor(7)}
    clients = [
        {"w": torch.tensor([6.0, 8.0]), "step": torch.tensor(1)},  # norm 10 -> clipped to 1
        {"w": torch.tensor([0.5, 0.0]), "step": torch.tensor(1)},  # norm 0.5, kept
    ]
    new, done = dp.dp_fedavg(
        g, clients, clip_norm=1.0, noise_multiplier=0.0, generator=dp.round_generator(0, 1)
    )
    assert new["w"].tolist() == pytest.approx([(0.6 + 0.5) / 2, 0.8 / 2])
    assert new["step"].item() == 7
    assert done.clipped_fraction == 0.5 and done.noise_std == 0.0


def test_noise_has_the_configured_scale_and_is_seeded():
    g = {"w": torch.zeros(200_000)}
    clients = [{"w": torch.zeros(200_000)} for _ in range(4)]
    kwargs = {"clip_norm": 2.0, "noise_multiplier": 1.5}
    a, done = dp.dp_fedavg(g, clients, generator=dp.round_generator(0, 3), **kwargs)
    b, _ = dp.dp_fedavg(g, clients, generator=dp.round_generator(0, 3), **kwargs)
    c, _ = dp.dp_fedavg(g, clients, generator=dp.round_generator(0, 4), **kwargs)
    assert done.noise_std == pytest.approx(1.5 * 2.0 / 4)
    assert float(a["w"].std()) == pytest.approx(0.75, rel=0.01)
    assert abs(float(a["w"].mean())) < 0.01
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_adaptive_clipping_formulas():
    # C' = C exp(-eta (b - gamma)): half unclipped at target 0.5 keeps C
    assert dp.next_clip_norm(2.0, 0.5, 0.5, 0.2) == 2.0
    assert dp.next_clip_norm(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert dp.update_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="too large for adaptive clipping"):
        dp.update_noise_multiplier(2.0, 1.0)


def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile():
    g = {"w": torch.zeros(1)}
    clients = [{"w": torch.tensor([float(v)])} for v in (0.1, 0.2, 0.3, 0.4)]
    _, done = dp.dp_fedavg(
        g,
        clients,
        clip_norm=1.0,
        noise_multiplier=0.0,
        generator=dp.round_generator(0, 1),
        adaptive=True,
        count_std=1e-9,
    )
    assert done.next_clip_norm == pytest.approx(math.exp(-0.2 * 0.5))  # all unclipped: shrink


def _improved_rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Independent: the Gaussian mechanism without subsampling has RDP T a / (2 z^2) at order a;
    convert with Balle et al. 2020 (Proposition 12 of arXiv:2004.00010) on a fine grid of a."""
    orders = np.arange(1.01, 512, 0.01)
    rdp = rounds * orders / (2 * noise_multiplier**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(eps.min())


@pytest.mark.parametrize("z, rounds", [(1.0, 10), (2.0, 50), (0.8, 1)])
def test_the_accountant_matches_an_independent_rdp_computation(z, rounds):
    got = dp.epsilon(z, 1.0, rounds, 1e-5)
    expected = _improved_rdp_epsilon(z, rounds, 1e-5)
    assert expected <= got + 1e-9  # the accountant's orders are a coarser grid
    assert got == pytest.approx(expected, rel=0.02)


def test_subsampling_amplifies_privacy_and_epsilon_grows_with_rounds():
    full, sub = dp.epsilon(1.0, 1.0, 10, 1e-5), dp.epsilon(1.0, 0.1, 10, 1e-5)
    assert sub < full
    values = [dp.epsilon(1.0, 0.1, t, 1e-5) for t in (1, 5, 20)]
    assert values == sorted(values) and values[0] > 0
    assert dp.epsilon(0.0, 0.1, 1, 1e-5) == math.inf and dp.epsilon(1.0, 0.1, 0, 1e-5) == 0


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        ({"algorithm": "median"}, "median does not compose"),
        ({"algorithm": "fedadam"}, "fedadam does not compose"),
        ({"quantize": "int8"}, "quantize: int8 codes are not clipped"),
        ({"robust": {"clip_norm": 1.0}}, "dp clips updates itself"),
        ({"method": "fibecfed"}, "fibecfed aggregates its own way"),
        ({"dp": {"noise_multiplier": 1.0, "adaptive": True}}, "needs 2 x count noise"),
    ],
)
def test_dp_is_refused_where_it_does_not_compose(toy_data, extra, message):
    with pytest.raises(ConfigError, match=message):
        build_config(tiny_config(toy_data, **{"dp": {"noise_multiplier": 1.0}, **extra}))


# -- the engine -----------------------------------------------------------------------------------
def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _dp_config(toy_data, **dp_settings):
    settings = {"noise_multiplier": 0.5, "clip_norm": 0.5, **dp_settings}
    return build_config(tiny_config(toy_data, rounds=3, dp=settings))


def test_a_dp_run_reports_growing_epsilon_and_adapts_its_clip_norm(tmp_path, toy_data):
    config = _dp_config(toy_data, adaptive=True, count_noise=1.0, delta=1e-4)
    summary = EmbeddedEngine(
        build_job(config), RunDir.create(tmp_path / "r", dump_config(config))
    ).run()
    rows = _metrics(tmp_path / "r")
    eps = [row["epsilon"] for row in rows]
    assert eps == sorted(eps) and eps[0] < eps[1] < eps[2]
    assert eps == pytest.approx([dp.epsilon(0.5, 0.5, r, 1e-4) for r in (1, 2, 3)])
    assert summary["epsilon"] == eps[-1] and summary["dp_delta"] == 1e-4
    assert rows[0]["dp_clip_norm"] == 0.5
    assert rows[1]["dp_clip_norm"] == rows[0]["dp_clip_norm_next"] != 0.5
    weights = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_dp_run_stops_before_the_round_that_would_exceed_max_epsilon(tmp_path, toy_data):
    budget = (dp.epsilon(0.5, 0.5, 1, 1e-5) + dp.epsilon(0.5, 0.5, 2, 1e-5)) / 2
    config = _dp_config(toy_data, max_epsilon=budget)
    notes = []
    engine = EmbeddedEngine(
        build_job(config),
        RunDir.create(tmp_path / "r", dump_config(config)),
        on_event=lambda kind, info: notes.append(info["text"]) if kind == "note" else None,
    )
    summary = engine.run()
    assert [row["round"] for row in _metrics(tmp_path / "r")] == [1]
    assert summary["stopped"].startswith("stopped before round 2: epsilon would reach")
    assert summary["stopped"] in notes and "\n" not in summary["stopped"]
    assert summary["epsilon"] <= budget
    assert (tmp_path / "r" / "weights.safetensors").is_file()


def test_a_resumed_adaptive_dp_run_equals_an_uninterrupted_one(tmp_path, toy_data):
    config = _dp_config(toy_data, adaptive=True, count_noise=1.0)
    EmbeddedEngine(build_job(config), RunDir.create(tmp_path / "whole", dump_config(config))).run()

    def stop(kind, info):
        if kind == "round_start" and info["round"] == 3:
            raise KeyboardInterrupt

    run = RunDir.create(tmp_path / "part", dump_config(config))
    with pytest.raises(KeyboardInterrupt):
        EmbeddedEngine(build_job(config), run, on_event=stop).run()
    EmbeddedEngine(build_job(config), RunDir.open(tmp_path / "part")).run()
    strip = [
        [{k: v for k, v in row.items() if k not in WALL} for row in _metrics(tmp_path / name)]
        for name in ("whole", "part")
    ]
    assert strip[0] == strip[1]
    a = load_file(str(tmp_path / "whole" / "weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- local DP ------------------------------------------------------------------------------------
def test_local_randomisation_without_noise_clips_the_update_and_keeps_the_rest():
    received = {"w": torch.tensor([1.0, 1.0]), "step": torch.tensor(3)}
    trained = {"w": torch.tensor([4.0, 5.0]), "step": torch.tensor(4), "own": torch.ones(2)}
    upload, clipped = dp.randomize_upload(
        received, trained, clip_norm=2.5, noise_multiplier=0.0, generator=dp.round_generator(0, 1)
    )
    assert clipped  # the update (3, 4) has norm 5
    assert upload["w"].tolist() == pytest.approx([1.0 + 1.5, 1.0 + 2.0])
    assert upload["step"].item() == 4 and torch.equal(upload["own"], trained["own"])
    short = {"w": torch.tensor([1.3, 0.6]), "step": torch.tensor(4)}
    kept, clipped = dp.randomize_upload(
        received, short, clip_norm=2.5, noise_multiplier=0.0, generator=dp.round_generator(0, 1)
    )
    assert not clipped and kept["w"].tolist() == pytest.approx([1.3, 0.6])


@pytest.mark.parametrize("norm", [0.1, 3.0, 1e4])
def test_a_noiseless_local_upload_never_moves_further_than_the_clip_norm(norm):
    g = torch.Generator().manual_seed(0)
    received = {"a": torch.randn(50, generator=g), "b": torch.randn(3, 4, generator=g)}
    direction = {k: torch.randn(t.shape, generator=g) for k, t in received.items()}
    scale = norm / dp.global_norm({k: t.double() for k, t in direction.items()})
    trained = {k: received[k] + scale * direction[k] for k in received}
    upload, clipped = dp.randomize_upload(
        received, trained, clip_norm=1.0, noise_multiplier=0.0, generator=dp.round_generator(0, 1)
    )
    moved = dp.global_norm(dp.update_of(received, upload))
    assert moved == pytest.approx(min(norm, 1.0), rel=1e-5) and clipped == (norm > 1.0)


def test_local_noise_has_std_z_times_c_per_coordinate_and_is_seeded_per_client_and_round():
    received = {"w": torch.zeros(200_000, dtype=torch.float64)}
    plan = dp.DPPlan(0.8, 0.5, False, 0.5, 0.2, 1.0, 1e-5, None, 0.5, 7, mode="local")
    a, _ = plan.randomize(received, dict(received), 3, 1)
    again, _ = plan.randomize(received, dict(received), 3, 1)
    other_client, _ = plan.randomize(received, dict(received), 3, 2)
    other_round, _ = plan.randomize(received, dict(received), 4, 1)
    assert float(a["w"].std()) == pytest.approx(0.8 * 0.5, rel=0.01)
    assert abs(float(a["w"].mean())) < 0.005
    assert torch.equal(a["w"], again["w"])
    assert not torch.equal(a["w"], other_client["w"]) and not torch.equal(a["w"], other_round["w"])
    # uploads of different clients are independent: their mean has std z C / sqrt(2)
    mean = (a["w"] + other_client["w"]) / 2
    assert float(mean.std()) == pytest.approx(0.4 / math.sqrt(2), rel=0.01)


@pytest.mark.parametrize("z, uploads", [(1.0, 1), (2.0, 5), (4.0, 30)])
def test_local_epsilon_matches_an_independent_rdp_computation_at_half_the_multiplier(z, uploads):
    got = dp.local_epsilon(z, uploads, 1e-5)
    expected = _improved_rdp_epsilon(z / 2, uploads, 1e-5)  # sensitivity 2C: any two datasets
    assert expected <= got + 1e-9
    assert got == pytest.approx(expected, rel=0.02)
    assert dp.local_epsilon(z, uploads + 1, 1e-5) > got
    assert dp.local_epsilon(z, 0, 1e-5) == 0 and dp.local_epsilon(0.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"dp": {"noise_multiplier": 1.0, "mode": "local", "adaptive": True}}, "^dp.adaptive: "),
        ({"dp": {"noise_multiplier": 1.0, "mode": "locall"}}, "^dp.mode: "),
        ({"dp": {"noise_multiplier": 1.0, "mode": "local"}, "method": "c2a"}, "c2a aggregates"),
    ],
)
def test_local_dp_config_errors_are_one_line(toy_data, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config(tiny_config(toy_data, **extra))
    assert "\n" not in str(err.value)


def test_local_dp_composes_with_any_aggregation_rule(toy_data):
    for algorithm in ("median", "trimmed_mean", "fedadam"):
        dp_settings = {"noise_multiplier": 1.0, "mode": "local"}
        config = build_config(tiny_config(toy_data, algorithm=algorithm, dp=dp_settings))
        assert config.dp.mode == "local"


def test_a_local_dp_run_accounts_each_clients_uploads(tmp_path, toy_data):
    dp_settings = {"noise_multiplier": 2.0, "clip_norm": 0.5, "mode": "local", "delta": 1e-4}
    config = build_config(tiny_config(toy_data, rounds=3, dp=dp_settings))
    summary = EmbeddedEngine(
        build_job(config), RunDir.create(tmp_path / "r", dump_config(config))
    ).run()
    rows = _metrics(tmp_path / "r")
    uploads: dict[int, int] = {}
    for row in rows:
        assert row["dp_mode"] == "local" and row["dp_noised_clients"] == row["clients"]
        assert row["dp_noise_std"] == pytest.approx(1.0)
        for cid in row["clients"]:
            uploads[cid] = uploads.get(cid, 0) + 1
        worst = max(uploads.values())
        assert row["epsilon"] == pytest.approx(_improved_rdp_epsilon(1.0, worst, 1e-4), rel=0.02)
    assert summary["epsilon"] == rows[-1]["epsilon"] and summary["dp_mode"] == "local"
    assert "dp_clip_norm" not in rows[0]  # the server does not clip or noise


def test_local_clipping_bounds_how_far_one_noiseless_round_moves_the_model(tmp_path, toy_data):
    dp_settings = {"noise_multiplier": 0.0, "clip_norm": 1e-3, "mode": "local"}
    config = build_config(tiny_config(toy_data, rounds=1, dp=dp_settings))
    job = build_job(config)
    start = {k: t.clone() for k, t in job.initial_state.items()}
    EmbeddedEngine(job, RunDir.create(tmp_path / "r", dump_config(config))).run()
    final = load_file(str(tmp_path / "r" / "weights.safetensors"))
    moved = dp.global_norm(dp.update_of({k: start[k] for k in final}, final))
    assert 0 < moved <= 1e-3 * (1 + 1e-4)  # a weighted mean of updates clipped to 1e-3


def test_a_local_dp_run_stops_before_a_client_could_pass_max_epsilon(tmp_path, toy_data):
    # 4 clients, 2 per round: after round 1 some client has one upload; a second could pass
    budget = (dp.local_epsilon(2.0, 1, 1e-5) + dp.local_epsilon(2.0, 2, 1e-5)) / 2
    dp_settings = {"noise_multiplier": 2.0, "mode": "local", "max_epsilon": budget}
    config = build_config(tiny_config(toy_data, rounds=3, dp=dp_settings))
    summary = EmbeddedEngine(
        build_job(config), RunDir.create(tmp_path / "r", dump_config(config))
    ).run()
    assert [row["round"] for row in _metrics(tmp_path / "r")] == [1]
    assert summary["stopped"].startswith("stopped before round 2: a client's epsilon could reach")
    assert summary["epsilon"] <= budget
