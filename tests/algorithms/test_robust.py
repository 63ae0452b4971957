"""Robust aggregation: golden numbers, resistance to an outlier client, and bad input."""

import math

import pytest
import torch

from fedpeft.algorithms import make_algorithm
from fedpeft.algorithms.robust import (
    clip_updates,
    coordinate_median,
    trim_count,
    trimmed_mean,
    update_norm,
)

GLOBAL = {"w": torch.zeros(2), "step": torch.tensor(7)}


def clients(*rows):
    return [{"w": torch.tensor(row), "step": torch.tensor(i)} for i, row in enumerate(rows)]


def test_median_odd_and_even_golden():
    odd = clients([1.0, 10.0], [2.0, -5.0], [100.0, 0.0])
    assert coordinate_median(GLOBAL, odd)["w"].tolist() == [2.0, 0.0]
    even = clients([1.0, 4.0], [2.0, 0.0], [3.0, 8.0], [100.0, 1.0])
    assert coordinate_median(GLOBAL, even)["w"].tolist() == [2.5, 2.5]


def test_integer_buffers_keep_the_first_clients_value():
    result = coordinate_median(GLOBAL, clients([1.0, 1.0], [2.0, 2.0], [3.0, 3.0]))
    assert result["step"].item() == 0 and result["step"].dtype == torch.int64
    assert result["w"].dtype == torch.float32


def test_trimmed_mean_golden():
    rows = clients([1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [1000.0, -1000.0])
    # 5 clients x 0.2 -> drop one at each end: (2 + 3 + 4) / 3 = 3 and (0 + 0 + 0) / 3 = 0
    assert trimmed_mean(GLOBAL, rows, 0.2)["w"].tolist() == [3.0, 0.0]
    # 0.1 of 5 drops nothing: the plain mean
    assert trimmed_mean(GLOBAL, rows, 0.1)["w"].tolist() == pytest.approx([202.0, -200.0])


def test_trim_count_and_bad_ratio():
    assert trim_count(10, 0.25) == 2 and trim_count(5, 0.2) == 1 and trim_count(4, 0.2) == 0
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="trim_ratio"):
            trim_count(5, bad)


def test_one_outlier_moves_fedavg_but_not_the_robust_rules():
    honest = [[1.0, 1.0]] * 4
    rows = clients(*honest, [1e6, -1e6])
    samples = [10] * 5
    fedavg = make_algorithm("fedavg").aggregate(GLOBAL, rows, samples)["w"]
    median = make_algorithm("median").aggregate(GLOBAL, rows, samples)["w"]
    trimmed = make_algorithm("trimmed_mean", trim_ratio=0.2).aggregate(GLOBAL, rows, samples)["w"]
    assert fedavg[0].item() > 1e5
    assert median.tolist() == [1.0, 1.0] and trimmed.tolist() == [1.0, 1.0]


def test_clip_updates_golden_and_untouched_small_updates():
    anchor = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    big = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}  # update (3, 0, 4): norm 5
    small = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([0.0])}  # norm 0.5
    assert update_norm(anchor, big) == pytest.approx(5.0)
    out_big, out_small = clip_updates(anchor, [big, small], max_norm=1.0)
    assert out_big["a"].tolist() == pytest.approx([1.6, 1.0])
    assert out_big["b"].tolist() == pytest.approx([0.8])
    assert update_norm(anchor, out_big) == pytest.approx(1.0)
    assert out_small is small
    with pytest.raises(ValueError, match="max_norm"):
        clip_updates(anchor, [big], max_norm=0.0)


def test_clip_norm_applies_before_fedavg():
    anchor = {"w": torch.zeros(2)}
    rows = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.0])}]
    result = make_algorithm("fedavg", clip_norm=1.0).aggregate(anchor, rows, [1, 1])["w"]
    assert result.tolist() == pytest.approx([0.3, 0.4])
    assert math.isclose(float(result.norm()), 0.5, rel_tol=1e-6)


def test_mismatched_client_state_is_refused():
    with pytest.raises(ValueError, match="lacks key 'step'"):
        coordinate_median(GLOBAL, [{"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        trimmed_mean(GLOBAL, [{"w": torch.zeros(3), "step": torch.tensor(0)}], 0.0)
    with pytest.raises(ValueError, match="at least one"):
        coordinate_median(GLOBAL, [])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="trim_ratio"):
        make_algorithm("trimmed_mean", trim_ratio=0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        make_algorithm("fedavg", clip_norm=-1.0)
