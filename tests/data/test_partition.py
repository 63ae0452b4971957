"""Partitioners: sizes, disjointness, label skew against alpha, determinism, natural groups, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data import load_source, make_partition, partition_summary
from fedpeft.plots import plot_partition

RNG = np.random.default_rng(123)
TRAIN = RNG.choice(4, size=2000, p=[0.4, 0.3, 0.2, 0.1]).astype(np.int64)
TEST = RNG.choice(4, size=400, p=[0.4, 0.3, 0.2, 0.1]).astype(np.int64)


def _assert_disjoint(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(np.unique(joined)) == len(joined), "an index is used twice"
    assert joined.min() >= 0 and joined.max() < n
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def _mean_kl(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> float:
    reference = np.bincount(labels, minlength=num_labels) / labels.size
    total = 0.0
    for part in parts:
        mix = np.bincount(labels[part], minlength=num_labels) / part.size
        nz = mix > 0
        total += float(np.sum(mix[nz] * np.log(mix[nz] / reference[nz])))
    return total / len(parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_equal_sizes_and_disjoint(scheme: str) -> None:
    p = make_partition(TRAIN, TEST, 30, scheme, alpha=0.5, seed=0)
    sizes = {part.size for part in p.train}
    assert max(sizes) - min(sizes) <= (1 if scheme == "iid" else 0)
    assert {part.size for part in p.test} == {400 // 30}
    _assert_disjoint(p.train, TRAIN.size)
    _assert_disjoint(p.test, TEST.size)
    if scheme == "iid":
        assert sum(part.size for part in p.train) == TRAIN.size


def test_label_skew_grows_as_alpha_falls() -> None:
    skew = {
        alpha: np.mean(
            [
                _mean_kl(
                    TRAIN,
                    make_partition(TRAIN, TEST, 20, "dirichlet", alpha=alpha, seed=s).train,
                    4,
                )
                for s in range(4)
            ]
        )
        for alpha in (0.1, 1.0, 10.0)
    }
    assert skew[0.1] > skew[1.0] > skew[10.0]
    iid = _mean_kl(TRAIN, make_partition(TRAIN, TEST, 20, "iid", seed=0).train, 4)
    assert iid < skew[10.0]


def test_dirichlet_local_test_follows_train_mix() -> None:
    p = make_partition(TRAIN, TEST, 10, "dirichlet", alpha=0.3, seed=3)
    agree = []
    for train_part, test_part in zip(p.train, p.test, strict=True):
        agree.append(
            np.argmax(np.bincount(TRAIN[train_part], minlength=4))
            == np.argmax(np.bincount(TEST[test_part], minlength=4))
        )
    assert np.mean(agree) >= 0.7  # majority labels mostly agree (pools may run out)


def test_dirichlet_handles_exhausted_classes() -> None:
    labels = np.array([0] * 95 + [1] * 5, dtype=np.int64)
    p = make_partition(labels, labels[:10], 10, "dirichlet", alpha=0.01, seed=0)
    assert [part.size for part in p.train] == [10] * 10
    _assert_disjoint(p.train, labels.size)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    for scheme in ("iid", "dirichlet", "quantity"):
        a = make_partition(TRAIN, TEST, 8, scheme, alpha=1.0, seed=5)
        b = make_partition(TRAIN, TEST, 8, scheme, alpha=1.0, seed=5)
        c = make_partition(TRAIN, TEST, 8, scheme, alpha=1.0, seed=6)
        assert all(
            np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test, strict=True)
        )
        assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))


def test_quantity_sizes_vary_and_cover_everything() -> None:
    p = make_partition(TRAIN, TEST, 15, "quantity", alpha=0.5, seed=1)
    sizes = [part.size for part in p.train]
    assert sum(sizes) == TRAIN.size and min(sizes) >= 1
    assert max(sizes) > 2 * min(sizes)
    _assert_disjoint(p.train, TRAIN.size)
    small = make_partition(TRAIN[:50], TEST, 50, "quantity", alpha=0.01, seed=1)
    assert [part.size for part in small.train] == [1] * 50


def test_natural_groups_one_and_several_clients_per_group() -> None:
    train_groups = ["en", "de", "fr"] * 100
    test_groups = ["fr", "en", "de"] * 20
    labels, test_labels = np.zeros(300, dtype=np.int64), np.zeros(60, dtype=np.int64)
    p = make_partition(
        labels, test_labels, 3, "natural", train_groups=train_groups, test_groups=test_groups
    )
    for client, lang in enumerate(["de", "en", "fr"]):  # sorted group order
        assert {train_groups[i] for i in p.train[client]} == {lang}
        assert {test_groups[i] for i in p.test[client]} == {lang}
        assert p.train[client].size == 100 and p.test[client].size == 20
    p6 = make_partition(
        labels, test_labels, 6, "natural", train_groups=train_groups, test_groups=test_groups
    )
    assert [part.size for part in p6.train] == [50] * 6
    assert {train_groups[i] for i in np.concatenate(p6.train[2:4])} == {"en"}
    _assert_disjoint(p6.train, 300)
    _assert_disjoint(p6.test, 60)
    with pytest.raises(ValueError, match="number of groups"):
        make_partition(labels, test_labels, 4, "natural", train_groups=train_groups)
    with pytest.raises(ValueError, match="train_groups"):
        make_partition(labels, test_labels, 3, "natural")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 5000, "scheme": "iid"}, "more clients"),
        ({"num_clients": 5, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 5, "scheme": "pathological"}, "unknown partition scheme"),
    ],
)
def test_bad_input_raises_one_line_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make_partition(TRAIN, TEST, **kwargs)
    assert "\n" not in str(info.value)


def test_tiny_test_set_still_gives_every_client_a_test_row() -> None:
    p = make_partition(TRAIN, TEST[:5], 10, "dirichlet", alpha=1.0, seed=0)
    assert [part.size for part in p.test] == [1] * 10
    p = make_partition(TRAIN, TEST[:5], 10, "iid", seed=0)
    assert [part.size for part in p.test] == [1] * 10


def test_summary_is_json_and_plot_writes_png(tmp_path: Path) -> None:
    p = make_partition(TRAIN, TEST, 12, "dirichlet", alpha=0.5, seed=0)
    summary = partition_summary(p, TRAIN, TEST, num_labels=4)
    json.dumps(summary)
    assert summary["num_clients"] == 12 and len(summary["clients"]) == 12
    first = summary["clients"][0]
    assert sum(first["train_label_counts"]) == first["train_size"] == p.train[0].size
    assert summary["totals"]["train_assigned"] == sum(part.size for part in p.train)
    assert summary["totals"]["mean_label_kl"] > 0
    out = tmp_path / "plots" / "partition.png"
    plot_partition(summary, out, label_names=["w", "x", "y", "z"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_umsab_natural_and_ag_news_dirichlet(shared_dataset) -> None:
    umsab = load_source(str(shared_dataset("umsab")))
    langs = umsab.train.field("lang")
    n_groups = len(set(langs))
    p = make_partition(
        umsab.train.labels,
        umsab.test.labels,
        n_groups,
        "natural",
        train_groups=langs,
        test_groups=umsab.test.field("lang"),
    )
    assert sum(part.size for part in p.train) == len(umsab.train)
    ag = load_source(str(shared_dataset("ag_news")))
    p = make_partition(ag.train.labels, ag.test.labels, 100, "dirichlet", alpha=0.1, seed=0)
    assert {part.size for part in p.train} == {len(ag.train) // 100}
    _assert_disjoint(p.test, len(ag.test))
