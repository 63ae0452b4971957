"""FedAvg: the server replaces the global model by the data-weighted mean of the client models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, https://arxiv.org/abs/1602.05629

With client k holding n_k samples and returning weights w_k after local training,

    w_global <- sum_k (n_k / n) * w_k,        n = sum_k n_k

The states are plain ``{name: tensor}`` dicts holding only what is exchanged (for PEFT: the trainable
tensors), so the same arithmetic serves the embedded engine and the Flower engine. The sum runs in
float64 and is cast back, so half-precision updates do not lose the small contributions of many
clients. Integer buffers (position ids, counters) cannot be averaged and keep the first state's value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def check_same_keys(reference: State, other: State, what: str) -> None:
    """Raise ValueError naming the first key present in one state but not the other."""
    missing = [key for key in reference if key not in other]
    extra = [key for key in other if key not in reference]
    if missing:
        raise ValueError(f"{what} lacks key {missing[0]!r}")
    if extra:
        raise ValueError(f"{what} has unexpected key {extra[0]!r}")


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """The weighted mean of states with identical keys and shapes; weights are normalised here."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    fractions = [float(w) / total for w in weights]

    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        check_same_keys(first, state, f"state {index}")

    averaged: State = {}
    for key, reference in first.items():
        if not reference.is_floating_point():
            averaged[key] = reference.clone()
            continue
        total_value = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
        for fraction, state in zip(fractions, states, strict=True):
            value = state[key]
            if value.shape != reference.shape:
                raise ValueError(
                    f"key {key!r}: shape {tuple(value.shape)} != {tuple(reference.shape)}"
                )
            total_value += fraction * value.detach().to(reference.device, torch.float64)
        averaged[key] = total_value.to(reference.dtype)
    return averaged


def fedavg(
    global_state: State, client_states: Sequence[State], num_samples: Sequence[int]
) -> State:
    """The new global state: client states averaged by their number of training samples.

    The clients must return exactly the keys of the global state, so that a client that silently
    trained (or dropped) a different set of tensors fails loudly instead of corrupting the model.
    """
    for index, state in enumerate(client_states):
        check_same_keys(global_state, state, f"client state {index}")
    return weighted_average(client_states, [float(n) for n in num_samples])
