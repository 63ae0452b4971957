"""Split a dataset across federated clients (FedNLP / FedPETuning style) and describe the split.

Schemes (all deterministic for a seed):

- ``iid``: seeded shuffle, near-equal client sizes (flwr-datasets `IidPartitioner`).
- ``dirichlet``: FedNLP label skew. Every client gets the same number of samples, n // K (the
  remainder is left unused); client k's label mix is p_k ~ Dir(alpha * q), q the global label
  proportions. Smaller alpha => more skew. Written by hand, see `_dirichlet_train`.
- ``quantity``: client sizes ~ Dir(alpha) over clients (every client at least one sample), labels
  iid (sizes drawn here, split by flwr-datasets `SizePartitioner`).
- ``natural``: one client per distinct value of `train_groups` (e.g. language), in sorted order.
  If num_clients is a multiple m of the number of groups, each group is shuffled and split evenly
  into m clients (clients g*m .. g*m+m-1 belong to group g).

Local test split (for personalised evaluation): each client's test rows follow its train label
mix. dirichlet: drawn with the same p_k; iid and quantity: a random equal share; natural: the same
group's test rows, split the same way (or a random equal share when no `test_groups` are given).
Test shares are equal-sized (n_test // K) and disjoint; only when the test set has fewer rows than
clients does each client get one test row drawn independently, so rows may repeat across clients.
For dirichlet, once a class runs out in the test set, clients fall back to the remaining classes,
so under strong skew the local test mix can only approximate p_k.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

SCHEMES = ("iid", "dirichlet", "quantity", "natural")


@dataclass
class Partition:
    """Per-client index arrays into the train and test sets."""

    train: list[np.ndarray]  # per client: indices into the train set (int64, sorted)
    test: list[np.ndarray]  # per client: its local test split, indices into the test set
    scheme: str


def make_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 1.0,
    seed: int = 0,
    train_groups: list | None = None,
    test_groups: list | None = None,
) -> Partition:
    """Assign train and local-test indices to `num_clients` clients with the given scheme."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    _check_arguments(len(train_labels), num_clients, scheme, alpha)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        train = _iid_train(len(train_labels), num_clients, rng)
        test = _equal_shares(len(test_labels), num_clients, rng)
    elif scheme == "dirichlet":
        train, mixes = _dirichlet_train(train_labels, num_clients, alpha, rng)
        test = _test_by_mix(test_labels, mixes, rng)
    elif scheme == "quantity":
        train = _quantity_train(len(train_labels), num_clients, alpha, rng)
        test = _equal_shares(len(test_labels), num_clients, rng)
    else:
        train, test = _natural(
            train_labels, test_labels, num_clients, train_groups, test_groups, rng
        )
    return Partition(
        train=[_sorted(i) for i in train], test=[_sorted(i) for i in test], scheme=scheme
    )


def _check_arguments(n_train: int, num_clients: int, scheme: str, alpha: float) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme '{scheme}'; choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n_train:
        raise ValueError(f"more clients ({num_clients}) than training samples ({n_train})")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _sorted(indices: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(indices, dtype=np.int64))


# ---------------------------------------------------------------- iid and quantity


def _iid_train(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then flwr-datasets' IidPartitioner cuts contiguous near-equal shards."""
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = _index_dataset(rng.permutation(n))
    return [partitioner.load_partition(k)[:]["idx"] for k in range(num_clients)]


def _quantity_train(
    n: int, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sizes = 1 + Multinomial(n - K, Dir(alpha)); flwr-datasets' SizePartitioner cuts them."""
    from flwr_datasets.partitioner import SizePartitioner

    shares = _safe_dirichlet(rng, np.full(num_clients, alpha), fallback=np.ones(num_clients))
    sizes = 1 + rng.multinomial(n - num_clients, shares)
    order = rng.permutation(n)
    partitioner = SizePartitioner(partition_sizes=[int(s) for s in sizes])
    partitioner.dataset = _index_dataset(order)
    positions = partitioner.partition_id_to_indices
    return [order[np.asarray(positions[k], dtype=np.int64)] for k in range(num_clients)]


def _index_dataset(order: np.ndarray):
    """A one-column HF dataset of row indices, the input flwr-datasets partitioners expect."""
    import datasets

    return datasets.Dataset.from_dict({"idx": order.astype(np.int64)}).with_format("numpy")


def _equal_shares(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint random shares of n // K rows each (one independent row each if n < K)."""
    per_client = n // num_clients
    if n == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(num_clients)]
    if per_client == 0:
        return [rng.choice(n, size=1) for _ in range(num_clients)]
    order = rng.permutation(n)[: per_client * num_clients]
    return list(order.reshape(num_clients, per_client))


# ---------------------------------------------------------------- dirichlet (FedNLP)


def _dirichlet_train(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """FedNLP label skew: equal sizes, client mixes p_k ~ Dir(alpha * global proportions).

    Why not flwr-datasets: its `DirichletPartitioner` splits each class across clients with
    Dir(alpha) shares, so client sizes differ (the Hsu et al. form, not FedNLP's).
    `InnerDirichletPartitioner` has the right form (fixed sizes, per-client Dirichlet priors,
    exhausted classes dropped), but keeps its p_k private, and we need the same p_k to draw each
    client's local test split; it also assigns one sample per Python iteration. The same algorithm
    is written here with multinomial draws, so it is vectorised over clients.
    Returns the per-client indices and the mixes p_k as a [K, num_labels] array.
    """
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    present = counts > 0
    concentration = alpha * counts[present] / counts.sum()
    mixes = np.zeros((num_clients, counts.size))
    for k in range(num_clients):
        mixes[k, present] = _safe_dirichlet(rng, concentration, fallback=counts[present])
    sizes = np.full(num_clients, labels.size // num_clients)
    return _fill_from_pools(labels, mixes, sizes, rng), mixes


def _test_by_mix(
    labels: np.ndarray, mixes: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Equal-sized, disjoint local test splits drawn with each client's train mix p_k."""
    num_clients = mixes.shape[0]
    if labels.size == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(num_clients)]
    mixes = _pad_columns(mixes, int(labels.max()) + 1)
    per_client = labels.size // num_clients
    if per_client >= 1:
        return _fill_from_pools(labels, mixes, np.full(num_clients, per_client), rng)
    return [
        _fill_from_pools(labels, mixes[k : k + 1], np.ones(1, int), rng)[0]
        for k in range(num_clients)
    ]


def _pad_columns(mixes: np.ndarray, width: int) -> np.ndarray:
    if mixes.shape[1] >= width:
        return mixes
    return np.pad(mixes, ((0, 0), (0, width - mixes.shape[1])))


def _fill_from_pools(
    labels: np.ndarray, mixes: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give client k `sizes[k]` distinct rows whose labels are drawn from mixes[k].

    Each pass draws every client's missing label counts from its mix restricted to classes that
    still have rows. Where a class is oversubscribed, the rows it has left go to a uniformly random
    subset of the requests (multivariate hypergeometric), and the rest are redrawn next pass, from
    the remaining classes. Each pass ends or exhausts a class, so there are at most C + 1 passes.
    """
    num_labels = mixes.shape[1]
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_labels)]
    remaining = np.array([len(p) for p in pools])
    taken = np.zeros((len(sizes), num_labels), dtype=np.int64)
    missing = np.asarray(sizes, dtype=np.int64).copy()
    while missing.sum() > 0:
        probs = _restricted_mixes(mixes, remaining)
        draw = rng.multinomial(missing, probs)
        for c in np.flatnonzero(draw.sum(axis=0) > remaining):
            draw[:, c] = rng.multivariate_hypergeometric(draw[:, c], int(remaining[c]))
        taken += draw
        remaining -= draw.sum(axis=0)
        missing -= draw.sum(axis=1)
    starts = np.vstack([np.zeros(num_labels, dtype=np.int64), np.cumsum(taken, axis=0)])
    return [
        np.concatenate([pools[c][starts[k, c] : starts[k + 1, c]] for c in range(num_labels)])
        for k in range(len(sizes))
    ]


def _restricted_mixes(mixes: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """Zero exhausted classes and renormalise; a client left with no mass takes the pool mix."""
    probs = mixes * (remaining > 0)
    mass = probs.sum(axis=1, keepdims=True)
    pool_mix = remaining / remaining.sum()
    probs = np.where(mass > 0, probs / np.where(mass > 0, mass, 1.0), pool_mix)
    return probs / probs.sum(axis=1, keepdims=True)


def _safe_dirichlet(
    rng: np.random.Generator, concentration: np.ndarray, fallback: np.ndarray
) -> np.ndarray:
    """A Dirichlet draw; with tiny concentrations it can underflow, then use `fallback`'s shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        draw = rng.dirichlet(concentration)
    if not np.all(np.isfinite(draw)) or draw.sum() <= 0:
        return np.asarray(fallback, dtype=float) / np.sum(fallback)
    return draw


# ---------------------------------------------------------------- natural groups


def _natural(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    train_groups: list | None,
    test_groups: list | None,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One client per group, or `num_clients / groups` equal clients per group.

    Written with numpy rather than flwr-datasets' NaturalIdPartitioner: that one only makes one
    partition per group, and both the even split within a group and the matching test split need
    the same grouping anyway.
    """
    if train_groups is None:
        raise ValueError("natural partitioning needs train_groups (e.g. the 'lang' field)")
    train_groups_arr = _group_array(train_groups, len(train_labels), "train_groups")
    names = np.unique(train_groups_arr)
    if num_clients % len(names):
        raise ValueError(
            f"natural partitioning needs num_clients equal to the number of groups ({len(names)}) "
            f"or a multiple of it, got {num_clients}"
        )
    per_group = num_clients // len(names)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    test_arr = None
    if test_groups is not None:
        test_arr = _group_array(test_groups, len(test_labels), "test_groups")
    for name in names:
        rows = np.flatnonzero(train_groups_arr == name)
        if rows.size < per_group:
            raise ValueError(
                f"group '{name}' has {rows.size} training rows, fewer than {per_group} clients"
            )
        train += np.array_split(rng.permutation(rows), per_group)
        if test_arr is not None:
            test += np.array_split(rng.permutation(np.flatnonzero(test_arr == name)), per_group)
    if test_arr is None:
        test = _equal_shares(len(test_labels), num_clients, rng)
    return train, test


def _group_array(groups: list, expected: int, what: str) -> np.ndarray:
    if len(groups) != expected:
        raise ValueError(f"{what} has {len(groups)} entries but there are {expected} rows")
    return np.asarray([str(g) for g in groups])


# ---------------------------------------------------------------- summaries and plots


def partition_summary(
    p: Partition, train_labels: np.ndarray, test_labels: np.ndarray, num_labels: int
) -> dict:
    """JSON-able description: per-client sizes and label histograms, totals and a skew measure.

    `mean_label_kl` is the mean KL divergence (nats) of each client's train label mix from the
    global one: 0 for a perfectly iid split, larger under more label skew.
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    clients = []
    for k, (tr, te) in enumerate(zip(p.train, p.test, strict=True)):
        clients.append(
            {
                "client": k,
                "train_size": int(tr.size),
                "test_size": int(te.size),
                "train_label_counts": _histogram(train_labels[tr], num_labels),
                "test_label_counts": _histogram(test_labels[te], num_labels),
            }
        )
    global_counts = _histogram(train_labels, num_labels)
    return {
        "scheme": p.scheme,
        "num_clients": len(p.train),
        "num_labels": num_labels,
        "clients": clients,
        "totals": {
            "train_rows": int(train_labels.size),
            "test_rows": int(test_labels.size),
            "train_assigned": int(sum(c["train_size"] for c in clients)),
            "test_assigned": int(sum(c["test_size"] for c in clients)),
            "train_label_counts": global_counts,
            "mean_label_kl": _mean_kl([c["train_label_counts"] for c in clients], global_counts),
        },
    }


def _histogram(labels: np.ndarray, num_labels: int) -> list[int]:
    return np.bincount(labels, minlength=num_labels)[:num_labels].astype(int).tolist()


def _mean_kl(client_counts: list[list[int]], global_counts: list[int]) -> float:
    reference = np.asarray(global_counts, dtype=float)
    reference /= max(reference.sum(), 1.0)
    divergences = []
    for counts in client_counts:
        mix = np.asarray(counts, dtype=float)
        if mix.sum() == 0:
            continue
        mix /= mix.sum()
        nonzero = mix > 0
        divergences.append(float(np.sum(mix[nonzero] * np.log(mix[nonzero] / reference[nonzero]))))
    return float(np.mean(divergences)) if divergences else 0.0
