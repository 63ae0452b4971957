"""Robust aggregation: rules that a few faulty or malicious clients cannot drag far.

FedAvg's mean follows any single client without bound: one client that returns weights of 1e6
moves the global model by 1e6 / K. The rules here bound that influence, coordinate by coordinate
or client by client. They are pure functions of ``{name: tensor}`` states, like ``fedavg``, so both
engines share them.

- ``coordinate_median``: the per-coordinate median of the client states (Yin et al., "Byzantine-
  Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018,
  https://arxiv.org/abs/1803.01498). Unweighted; with an even number of clients it is the mean of
  the two middle values.
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_ratio * K)`` largest and smallest values
  and average the rest (same paper). ``trim_ratio`` 0 is the plain mean.
- ``clip_updates``: scale each client's update ``w_k - w_global`` down to an L2 norm of at most
  ``max_norm`` over all exchanged tensors (norm bounding, Sun et al., "Can You Really Backdoor
  Federated Learning?", 2019, https://arxiv.org/abs/1911.07963); any aggregation rule can follow.

The median and the trimmed mean ignore sample counts: weighting by a count the client reports
itself would hand the influence back to a client that lies about it. Integer buffers cannot be
averaged and keep the first state's value, as in ``fedavg``. Arithmetic runs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedpeft.algorithms.fedavg import State, check_same_keys


def _stacked(global_state: State, client_states: Sequence[State]):
    """Yield (key, reference, float64 stack of shape [K, *shape]) for the floating keys."""
    if not client_states:
        raise ValueError("robust aggregation needs at least one client state")
    for index, state in enumerate(client_states):
        check_same_keys(global_state, state, f"client state {index}")
    for key, reference in global_state.items():
        values = [state[key] for state in client_states]
        for value in values:
            if value.shape != reference.shape:
                raise ValueError(
                    f"key {key!r}: shape {tuple(value.shape)} != {tuple(reference.shape)}"
                )
        if not reference.is_floating_point():
            yield key, reference, None
            continue
        stack = torch.stack([v.detach().to(reference.device, torch.float64) for v in values])
        yield key, reference, stack


def _per_coordinate(
    global_state: State, client_states: Sequence[State], drop: int, reduce
) -> State:
    """Sort the client values of each coordinate, drop ``drop`` at each end, ``reduce`` the rest
    along dim 0; integer buffers keep the first client's value."""
    result: State = {}
    for key, reference, stack in _stacked(global_state, client_states):
        if stack is None:
            result[key] = client_states[0][key].clone()
            continue
        ordered = stack.sort(dim=0).values
        result[key] = reduce(ordered[drop : ordered.shape[0] - drop]).to(reference.dtype)
    return result


def coordinate_median(global_state: State, client_states: Sequence[State]) -> State:
    """The per-coordinate median of the client states (the global state gives keys and dtypes)."""

    def middle(ordered: torch.Tensor) -> torch.Tensor:
        count = ordered.shape[0]
        return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2

    return _per_coordinate(global_state, client_states, 0, middle)


def check_trim_ratio(trim_ratio: float) -> None:
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")


def trim_count(num_clients: int, trim_ratio: float) -> int:
    """How many values are dropped at each end; raises when nothing would be left."""
    check_trim_ratio(trim_ratio)
    drop = math.floor(trim_ratio * num_clients)
    if num_clients - 2 * drop < 1:
        raise ValueError(f"trim_ratio {trim_ratio} leaves no client of {num_clients}")
    return drop


def trimmed_mean(
    global_state: State, client_states: Sequence[State], trim_ratio: float = 0.2
) -> State:
    """Per coordinate: sort the K client values, drop floor(trim_ratio*K) at each end, average."""
    drop = trim_count(len(client_states), trim_ratio)
    return _per_coordinate(global_state, client_states, drop, lambda kept: kept.mean(dim=0))


def update_norm(global_state: State, state: State) -> float:
    """The L2 norm of ``state - global_state`` over all floating tensors together."""
    total = 0.0
    for key, anchor in global_state.items():
        if anchor.is_floating_point():
            diff = state[key].detach().to(torch.float64) - anchor.detach().to(torch.float64)
            total += float(diff.pow(2).sum())
    return math.sqrt(total)


def clip_updates(
    global_state: State, client_states: Sequence[State], max_norm: float
) -> list[State]:
    """Each client state moved back towards the global one until its update norm <= max_norm."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    clipped: list[State] = []
    for index, state in enumerate(client_states):
        check_same_keys(global_state, state, f"client state {index}")
        norm = update_norm(global_state, state)
        if norm <= max_norm:
            clipped.append(state)
            continue
        scale = max_norm / norm
        new_state: State = {}
        for key, anchor in global_state.items():
            value = state[key]
            if not anchor.is_floating_point():
                new_state[key] = value
                continue
            base = anchor.detach().to(torch.float64)
            moved = base + scale * (value.detach().to(torch.float64) - base)
            new_state[key] = moved.to(value.dtype)
        clipped.append(new_state)
    return clipped
