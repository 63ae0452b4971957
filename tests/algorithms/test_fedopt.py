"""FedAdagrad / FedAdam / FedYogi steps on one-element tensors, checked against hand arithmetic.

Common setting: x0 = 1.0, eta = 1e-2, beta1 = 0.9, beta2 = 0.99, tau = 1e-3, so v starts at
tau^2 = 1e-6. Round 1: clients average to 1.5, delta1 = 0.5, m1 = 0.1 * 0.5 = 0.05.
Round 2: clients average to x1 + 0.01, delta2 = 0.01, m2 = 0.9 * 0.05 + 0.1 * 0.01 = 0.046.
"""

import math

import pytest
import torch

from fedpeft.algorithms.fedopt import fedopt_step

HP = {"eta": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def two_steps(kind):
    x0 = {"w": torch.tensor([1.0], dtype=torch.float64)}
    x1, opt1 = fedopt_step(x0, {"w": torch.tensor([1.5], dtype=torch.float64)}, {}, kind, **HP)
    x2, opt2 = fedopt_step(x1, {"w": x1["w"] + 0.01}, opt1, kind, **HP)
    return x1, opt1, x2, opt2


def test_fedadagrad_by_hand():
    x1, opt1, x2, opt2 = two_steps("fedadagrad")
    # v1 = 1e-6 + 0.5^2 = 0.250001
    assert opt1["v"]["w"].item() == pytest.approx(0.250001, rel=1e-12)
    assert opt1["m"]["w"].item() == pytest.approx(0.05, rel=1e-12)
    # x1 = 1 + 0.01 * 0.05 / (sqrt(0.250001) + 0.001)
    assert x1["w"].item() == pytest.approx(
        1 + 0.01 * 0.05 / (math.sqrt(0.250001) + 0.001), rel=1e-12
    )
    assert x1["w"].item() == pytest.approx(1.000998002, rel=1e-9)
    # v2 = 0.250001 + 0.01^2 = 0.250101
    assert opt2["v"]["w"].item() == pytest.approx(0.250101, rel=1e-9)
    assert opt2["m"]["w"].item() == pytest.approx(0.046, rel=1e-9)
    # x2 = x1 + 0.01 * 0.046 / (sqrt(0.250101) + 0.001) = x1 + 0.000917979
    assert x2["w"].item() - x1["w"].item() == pytest.approx(0.000917979, rel=1e-6)


def test_fedadam_by_hand():
    x1, opt1, x2, opt2 = two_steps("fedadam")
    # v1 = 0.99 * 1e-6 + 0.01 * 0.25 = 0.00250099
    assert opt1["v"]["w"].item() == pytest.approx(0.00250099, rel=1e-12)
    # x1 = 1 + 0.01 * 0.05 / (sqrt(0.00250099) + 0.001) = 1 + 0.0005 / 0.0510099
    assert x1["w"].item() == pytest.approx(1.009802019, rel=1e-9)
    # v2 = 0.99 * 0.00250099 + 0.01 * 1e-4 = 0.0024759801 + 0.000001
    assert opt2["v"]["w"].item() == pytest.approx(0.0024769801, rel=1e-9)
    # x2 - x1 = 0.01 * 0.046 / (sqrt(0.0024769801) + 0.001)
    assert x2["w"].item() - x1["w"].item() == pytest.approx(0.00906060, rel=1e-6)


def test_fedyogi_by_hand_both_signs():
    x1, opt1, x2, opt2 = two_steps("fedyogi")
    # round 1: v0 = 1e-6 < delta^2 = 0.25, sign = -1: v1 = 1e-6 + 0.01 * 0.25 = 0.002501
    assert opt1["v"]["w"].item() == pytest.approx(0.002501, rel=1e-12)
    assert x1["w"].item() == pytest.approx(1 + 0.0005 / (math.sqrt(0.002501) + 0.001), rel=1e-12)
    # round 2: v1 = 0.002501 > delta^2 = 1e-4, sign = +1: v2 = 0.002501 - 0.01 * 1e-4 = 0.0025
    assert opt2["v"]["w"].item() == pytest.approx(0.0025, rel=1e-9)
    # x2 - x1 = 0.01 * 0.046 / (sqrt(0.0025) + 0.001) = 0.00046 / 0.051
    assert x2["w"].item() - x1["w"].item() == pytest.approx(0.00046 / 0.051, rel=1e-6)


def test_zero_update_decays_v_only_for_fedadam():
    # With a zero update FedAdam decays v by beta2, FedYogi and FedAdagrad leave it alone.
    x = {"w": torch.tensor([1.0], dtype=torch.float64)}
    opt = {
        "m": {"w": torch.tensor([0.0], dtype=torch.float64)},
        "v": {"w": torch.tensor([4.0], dtype=torch.float64)},
    }
    for kind, expected_v in [("fedadam", 0.99 * 4.0), ("fedyogi", 4.0), ("fedadagrad", 4.0)]:
        new_x, new_opt = fedopt_step(x, x, opt, kind, **HP)
        assert new_opt["v"]["w"].item() == pytest.approx(expected_v)
        assert new_x["w"].item() == 1.0


def test_inputs_not_mutated():
    x = {"w": torch.tensor([1.0, 2.0])}
    avg = {"w": torch.tensor([2.0, 2.0])}
    opt = {"m": {"w": torch.tensor([0.1, 0.1])}, "v": {"w": torch.tensor([0.5, 0.5])}}
    snapshot = [t.clone() for t in (x["w"], avg["w"], opt["m"]["w"], opt["v"]["w"])]
    fedopt_step(x, avg, opt, "fedadam")
    for before, after in zip(
        snapshot, (x["w"], avg["w"], opt["m"]["w"], opt["v"]["w"]), strict=True
    ):
        assert torch.equal(before, after)


def test_dtype_kept_and_moments_at_least_float32():
    x = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    new_x, opt = fedopt_step(x, {"w": torch.tensor([2.0], dtype=torch.bfloat16)}, {}, "fedyogi")
    assert new_x["w"].dtype == torch.bfloat16
    assert opt["m"]["w"].dtype == torch.float32
    assert opt["v"]["w"].dtype == torch.float32


def test_new_keys_start_fresh_and_dropped_keys_vanish():
    x1, opt1 = fedopt_step({"a": torch.tensor([0.0])}, {"a": torch.tensor([1.0])}, {}, "fedadam")
    grown = {"a": x1["a"], "b": torch.tensor([0.0])}
    x2, opt2 = fedopt_step(grown, {"a": x1["a"], "b": torch.tensor([1.0])}, opt1, "fedadam")
    # "b" sees its first update: same step as "a" took in round 1
    torch.testing.assert_close(x2["b"], x1["a"])
    x3, opt3 = fedopt_step({"b": x2["b"]}, {"b": x2["b"]}, opt2, "fedadam")
    assert set(opt3["m"]) == set(opt3["v"]) == {"b"}


def test_integer_buffers_follow_the_average():
    x = {"w": torch.tensor([0.0]), "n": torch.tensor([3])}
    new_x, opt = fedopt_step(x, {"w": torch.tensor([0.0]), "n": torch.tensor([5])}, {}, "fedadam")
    assert torch.equal(new_x["n"], torch.tensor([5]))
    assert "n" not in opt["m"]


def test_errors():
    x = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="fedadam"):
        fedopt_step(x, x, {}, "fedsgd")
    with pytest.raises(ValueError, match="'w'"):
        fedopt_step(x, {"v": torch.zeros(1)}, {}, "fedadam")
    with pytest.raises(ValueError, match="tau"):
        fedopt_step(x, x, {}, "fedadam", tau=0.0)
    with pytest.raises(ValueError, match="beta"):
        fedopt_step(x, x, {}, "fedadam", beta2=1.0)
