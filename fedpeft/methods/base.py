"""What a seed system adds around the shared engine, as a small set of hooks.

The engine samples clients, swaps trainable states in and out of the one resident model, runs
``client.train_local``, counts bytes and time, evaluates and checkpoints. A *federated method*
decides what each client receives and trains, may add a local loss term or edit gradients, and
turns the uploaded states into the next global state. The engine calls only these hooks, so it
does not care which system or aggregation rule runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedpeft.client import Evaluation, LocalResult

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


# -- methods that drive a round themselves ----------------------------------------------------
# Some systems do not fit "sample clients, train, aggregate" (AutoFedNLP runs three candidate
# configurations side by side on disjoint client groups). Such a method also implements
# ``RoundDriver``; the engine then hands it a ``ClientRunner`` for the round instead of running
# the default round. The engine still evaluates, checkpoints and writes the metrics row.


@dataclass
class RoundReport:
    """What one round did; the engine turns it into a metrics row (``extra`` is merged in)."""

    rnd: int
    clients: list[int]
    train_loss: float
    bytes_up: int = 0
    bytes_down: int = 0
    sim_time_s: float = 0.0
    client_sim_s: list[float] = field(default_factory=list)
    train_wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientFit:
    """One client's local training from a given state, as the engine ran and charged it."""

    update: ClientUpdate
    bytes_up: int
    bytes_down: int
    sim_time_s: float
    wall_s: float


class ClientRunner(Protocol):
    """What an engine offers a round-driving method."""

    model: nn.Module  # the one resident model; the method may reshape it (then load a state)
    num_clients: int
    seed: int

    def fit(self, rnd: int, cid: int, state: State, stream: tuple[int, ...] = ()) -> ClientFit:
        """Send ``state`` to client ``cid``, train it locally, receive and decode its upload.

        Bytes and simulated seconds are counted as in a default round; ``stream`` separates the
        seeds of several fits of one client in one round.
        """

    def evaluate(self, state: State, split: str) -> Evaluation:
        """Score ``state`` (loaded into the resident model as shaped now) on 'validation'/'test'."""


class RoundDriver(Protocol):
    def run_round(
        self, rnd: int, global_state: State, runner: ClientRunner
    ) -> tuple[State, RoundReport]:
        """Run round ``rnd`` from ``global_state``; return the next global state and the report."""

    def shape_model(self, model: nn.Module) -> None:
        """Shape the resident model to fit the current global state (before it is loaded)."""
