"""FedProx: FedAvg plus a proximal term that keeps each client near the global model.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127

Client k minimises its local loss plus a penalty on drifting from the round's global weights w^t:

    h_k(w) = F_k(w) + (mu / 2) * ||w - w^t||^2

so under strong data skew (non-IID label mixes) local models cannot wander far from each other.
The gradient of the penalty is mu * (w - w^t). Only the client's objective changes: the server still
aggregates with FedAvg (``fedpeft.algorithms.fedavg.fedavg``). mu = 0 recovers FedAvg; the paper
picks mu from {0.001, 0.01, 0.1, 1}.

The norm runs over the exchanged tensors only (the keys of the global state), which for PEFT methods
are the trainable ones: frozen backbone weights cannot drift and need no penalty.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft.algorithms.fedavg import State


def proximal_term(
    params: Mapping[str, torch.Tensor], global_state: State, mu: float
) -> torch.Tensor:
    """(mu / 2) * sum over the global state's keys of ||params[k] - global_state[k]||^2.

    Differentiable with respect to ``params``; the global state is treated as a constant.
    Add it to the local loss before ``backward()``.
    """
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    squared_distance: torch.Tensor | None = None
    for key, anchor in global_state.items():
        if not anchor.is_floating_point():
            continue
        if key not in params:
            raise ValueError(f"proximal term: params lack key {key!r} of the global state")
        param = params[key]
        diff = param - anchor.detach().to(param.device, param.dtype)
        term = diff.pow(2).sum()
        squared_distance = term if squared_distance is None else squared_distance + term
    if squared_distance is None:
        return torch.zeros(())
    return 0.5 * mu * squared_distance
