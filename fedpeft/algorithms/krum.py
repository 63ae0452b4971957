"""Krum, Multi-Krum and Bulyan: keep the client states that sit closest to the others.

The coordinate-wise rules in ``robust.py`` look at one coordinate at a time. These look at whole
client states: a state far from most of the others is left out, whatever its coordinates.
``f`` (``num_byzantine``) is how many of the ``n`` clients of a round may be Byzantine (send
anything at all). States are the exchanged tensors of each client, flattened and concatenated into
one vector ``V_i``; integer tensors take no part and keep the first state's value, as in
``fedavg``. Sample counts are ignored: a client could lie about them.

Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017, https://arxiv.org/abs/1703.02757) needs n > 2f + 2. Each state is scored by its squared distances to its n - f - 2 nearest others::

    score(i) = sum_{j in N_i} ||V_i - V_j||^2,    N_i = the n - f - 2 states closest to V_i (j != i)
    Krum     = V_{i*},    i* = argmin_i score(i)

Multi-Krum (same paper) averages the m states with the lowest scores (one scoring pass); m = 1 is
Krum, m = n the plain mean. By default m = n - f, the most that can all be honest.

Bulyan (El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML
2018, https://arxiv.org/abs/1802.07927) needs n >= 4f + 3. It selects
theta = n - 2f states by Krum applied again and again (pick the Krum winner of the remaining
states, move it to the selection S, repeat), then per coordinate averages the beta = theta - 2f
values of S closest to that coordinate's median::

    Bulyan[c] = mean of the beta values V_s[c], s in S, with the smallest |V_s[c] - median_S[c]|

Choices the papers leave open, made here. Inside Bulyan, Krum on the r states still remaining sums
over max(r - f - 2, 1) neighbours: the last picks leave fewer than f + 3 states, where the paper's
count would drop below 1. With one neighbour the two states of the closest pair always tie, so
a tie in Bulyan's picks goes to the state with the lower Krum score over all n (then the lower
index); a tie in Krum and Multi-Krum goes to the lower index. A tie in the distance to a median
goes to the smaller value, and the median of an even count is the mean of the two middle values.

Distances are taken between the states themselves. Since ||V_i - V_j|| = ||(V_i - g) - (V_j - g)||
for the global state g, this equals the distance between the updates V_i - g (the papers' gradients)
and needs no subtraction; and because Krum's output is one of its inputs and Bulyan's median is
shift-equivariant, aggregating states or updates gives the same next global state. Each difference
is taken element by element in float64, never through ||a||^2 + ||b||^2 - 2<a, b>, which would
cancel catastrophically for large weights that differ by small updates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.algorithms.fedavg import State, check_same_keys

KRUM_KINDS: tuple[str, ...] = ("krum", "multi_krum", "bulyan")


def min_clients(rule: str, num_byzantine: int) -> int:
    """The fewest clients a round needs for ``rule`` to tolerate ``num_byzantine`` of them."""
    if rule == "bulyan":
        return 4 * num_byzantine + 3
    return 2 * num_byzantine + 3


def check_clients(rule: str, num_clients: int, num_byzantine: int) -> None:
    """Raise a one-line ValueError when ``num_clients`` is too few for ``rule`` with this f."""
    if rule not in KRUM_KINDS:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(KRUM_KINDS)}")
    if num_byzantine < 0:
        raise ValueError(f"{rule}: num_byzantine must be >= 0, got {num_byzantine}")
    need = min_clients(rule, num_byzantine)
    if num_clients < need:
        condition = "n >= 4f + 3" if rule == "bulyan" else "n > 2f + 2"
        raise ValueError(
            f"{rule} with f = {num_byzantine} needs at least {need} clients per round "
            f"({condition}), got {num_clients}"
        )


def _check(global_state: State, client_states: Sequence[State]) -> None:
    if not client_states:
        raise ValueError("krum-style aggregation needs at least one client state")
    for index, state in enumerate(client_states):
        check_same_keys(global_state, state, f"client state {index}")
        for key, reference in global_state.items():
            if state[key].shape != reference.shape:
                raise ValueError(
                    f"key {key!r}: shape {tuple(state[key].shape)} != {tuple(reference.shape)}"
                )


def pairwise_sq_distances(global_state: State, client_states: Sequence[State]) -> torch.Tensor:
    """[n, n] float64: ||V_i - V_j||^2 over all floating tensors (the global state names them)."""
    _check(global_state, client_states)
    n = len(client_states)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            continue
        for i in range(n):
            left = client_states[i][key].detach().to(torch.float64)
            for j in range(i + 1, n):
                right = client_states[j][key].detach().to(left.device, torch.float64)
                distances[i, j] += float((left - right).pow(2).sum())
    return distances + distances.T


def krum_scores(distances: torch.Tensor, num_byzantine: int, neighbours: int | None = None):
    """Each state's sum of squared distances to its ``neighbours`` (default n - f - 2) nearest."""
    n = distances.shape[0]
    count = n - num_byzantine - 2 if neighbours is None else neighbours
    if not 1 <= count <= n - 1:
        raise ValueError(f"Krum needs 1 to {n - 1} neighbours per state, got {count}")
    others = distances + torch.diag(torch.full((n,), float("inf"), dtype=distances.dtype))
    return others.sort(dim=1).values[:, :count].sum(dim=1)


def _best(scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` lowest scores' indices, lowest first; ties go to the lower index."""
    return [int(i) for i in torch.argsort(scores, stable=True)[:count]]


def krum_select(global_state: State, client_states: Sequence[State], num_byzantine: int) -> int:
    """The index of the Krum winner."""
    check_clients("krum", len(client_states), num_byzantine)
    scores = krum_scores(pairwise_sq_distances(global_state, client_states), num_byzantine)
    return _best(scores, 1)[0]


def multi_krum_select(
    global_state: State, client_states: Sequence[State], num_byzantine: int, m: int | None = None
) -> list[int]:
    """The indices of the m best-scored states (default m = n - f), best first."""
    n = len(client_states)
    check_clients("multi_krum", n, num_byzantine)
    m = n - num_byzantine if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be in [1, {n}], got {m}")
    scores = krum_scores(pairwise_sq_distances(global_state, client_states), num_byzantine)
    return _best(scores, m)


def bulyan_select(
    global_state: State, client_states: Sequence[State], num_byzantine: int
) -> list[int]:
    """Bulyan's selection: theta = n - 2f indices, in the order Krum picked them."""
    n = len(client_states)
    check_clients("bulyan", n, num_byzantine)
    distances = pairwise_sq_distances(global_state, client_states)
    overall = krum_scores(distances, num_byzantine).tolist()
    remaining, selected = list(range(n)), []
    while len(selected) < n - 2 * num_byzantine:
        if len(remaining) == 1:
            selected.append(remaining.pop())
            continue
        sub = distances[remaining][:, remaining]
        neighbours = max(len(remaining) - num_byzantine - 2, 1)
        scores = krum_scores(sub, num_byzantine, neighbours).tolist()
        pick = min(range(len(remaining)), key=lambda p: (scores[p], overall[remaining[p]], p))
        selected.append(remaining.pop(pick))
    return selected


def mean_around_median(stack: torch.Tensor, beta: int) -> torch.Tensor:
    """Along dim 0, per coordinate: the mean of the ``beta`` values closest to the median."""
    if not 1 <= beta <= stack.shape[0]:
        raise ValueError(f"beta must be in [1, {stack.shape[0]}], got {beta}")
    ordered = stack.sort(dim=0).values  # ties in distance then go to the smaller value
    count = ordered.shape[0]
    median = (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
    nearest = (ordered - median).abs().argsort(dim=0, stable=True)[:beta]
    return ordered.gather(0, nearest).mean(dim=0)


def _mean_of(global_state: State, client_states: Sequence[State], chosen: Sequence[int]) -> State:
    """The unweighted mean of the chosen states (float64, cast back); integers from state 0."""
    result: State = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = client_states[0][key].clone()
            continue
        total = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
        for index in chosen:
            total += client_states[index][key].detach().to(reference.device, torch.float64)
        result[key] = (total / len(chosen)).to(reference.dtype)
    return result


def krum(global_state: State, client_states: Sequence[State], num_byzantine: int) -> State:
    """The Krum winner's state (float tensors; integer tensors keep the first state's value)."""
    winner = krum_select(global_state, client_states, num_byzantine)
    return _mean_of(global_state, client_states, [winner])


def multi_krum(
    global_state: State, client_states: Sequence[State], num_byzantine: int, m: int | None = None
) -> State:
    """The mean of the m best-scored states (default m = n - f)."""
    chosen = multi_krum_select(global_state, client_states, num_byzantine, m)
    return _mean_of(global_state, client_states, chosen)


def bulyan(global_state: State, client_states: Sequence[State], num_byzantine: int) -> State:
    """Krum-selected theta = n - 2f states, then per coordinate the mean of the beta = theta - 2f
    values closest to the median."""
    chosen = bulyan_select(global_state, client_states, num_byzantine)
    beta = len(chosen) - 2 * num_byzantine
    result: State = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = client_states[0][key].clone()
            continue
        stack = torch.stack(
            [client_states[i][key].detach().to(reference.device, torch.float64) for i in chosen]
        )
        result[key] = mean_around_median(stack, beta).to(reference.dtype)
    return result
