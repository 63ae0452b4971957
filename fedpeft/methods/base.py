"""What a seed system adds around the shared engine, as a small set of hooks.

The engine samples clients, swaps trainable states in and out of the one resident model, runs
``client.train_local``, counts bytes and time, evaluates and checkpoints. A *federated method*
decides what each client receives and trains, may add a local loss term or edit gradients, and
turns the uploaded states into the next global state. The engine calls only these hooks, so it
does not care which system or aggregation rule runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedpeft.client import LocalResult

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's upload, already decoded and checked."""

    cid: int
    state: State
    num_samples: int
    result: LocalResult


class FederatedMethod(Protocol):
    name: str

    def prepare_client(self, model: nn.Module, rnd: int, cid: int) -> None:
        """Shape the resident model for this client before its state is loaded (per-client configs)."""

    def download(self, rnd: int, cid: int, global_state: State) -> State:
        """The tensors the server sends this client; the client loads exactly these."""

    def local_loss(
        self, params: Mapping[str, nn.Parameter], received: State
    ) -> torch.Tensor | None:
        """An extra term added to the client's loss (e.g. FedProx); None for none."""

    def after_backward(self, model: nn.Module, cid: int) -> None:
        """Edit gradients before the optimiser step (e.g. sparse updates)."""

    def upload(self, rnd: int, cid: int, trained: State) -> State:
        """The tensors the client sends back (e.g. only the globally aggregated layers)."""

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The next global trainable state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
