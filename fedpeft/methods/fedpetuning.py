"""FedPETuning (Zhang et al., Findings of ACL 2023): a PEFT method under a plain FL algorithm.

Clients receive the global trainable state (PEFT tensors + task head), train it locally, and
upload it; the server combines the uploads with the chosen algorithm (FedAvg weighted by client
samples, FedProx, a server optimiser: FedAdam / FedYogi / FedAdagrad, or a robust rule). Only
trainable tensors travel; the frozen backbone never does. This is what every plain PEFT unit
(``method: lora`` etc.) runs: their ``MethodSpec.system`` is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedpeft.algorithms import ServerAlgorithm
from fedpeft.methods.base import ClientUpdate, FederatedMethod, State


class FedPETuning(FederatedMethod):
    name = "fedpetuning"

    def __init__(self, algorithm: ServerAlgorithm):
        self.algorithm = algorithm

    def local_loss(
        self, params: Mapping[str, nn.Parameter], received: State
    ) -> torch.Tensor | None:
        return self.algorithm.client_loss(params, received)

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return self.algorithm.aggregate(
            global_state, [u.state for u in updates], [u.num_samples for u in updates]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state.get("algorithm", {}))
