"""FedPETuning (Zhang et al., Findings of ACL 2023): a PEFT method under a plain FL algorithm.

Clients receive the global trainable state (PEFT tensors + task head), train it locally, and
upload it; the server combines the uploads with the chosen algorithm (FedAvg weighted by client
samples, FedProx, or a server optimiser: FedAdam / FedYogi / FedAdagrad). Only trainable tensors
travel; the frozen backbone never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedpeft.algorithms import ServerAlgorithm
from fedpeft.methods.base import ClientUpdate, State


class FedPETuning:
    name = "fedpetuning"

    def __init__(self, algorithm: ServerAlgorithm):
        self.algorithm = algorithm

    def prepare_client(self, model: nn.Module, rnd: int, cid: int) -> None:
        return None

    def download(self, rnd: int, cid: int, global_state: State) -> State:
        return global_state

    def local_loss(
        self, params: Mapping[str, nn.Parameter], received: State
    ) -> torch.Tensor | None:
        return self.algorithm.client_loss(params, received)

    def after_backward(self, model: nn.Module, cid: int) -> None:
        return None

    def upload(self, rnd: int, cid: int, trained: State) -> State:
        return trained

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return self.algorithm.aggregate(
            global_state, [u.state for u in updates], [u.num_samples for u in updates]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state.get("algorithm", {}))
