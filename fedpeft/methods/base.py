"""What a seed system adds around the shared engine, as a small set of hooks.

The engine samples clients, swaps trainable states in and out of the one resident model, trains
each client (``fedpeft.client.train_local``), counts bytes and time, checks uploads, evaluates and
checkpoints. A *federated method* decides what each client receives and trains, how the model is
conditioned on a batch, what stays on the client, and turns the uploads into the next global
state. ``FederatedMethod`` gives every hook a no-op default; a method overrides what it needs.

Order of the hooks for one client in one round (both engines)::

    prepare_client -> download -> [engine: reset untouched tensors, load received]
    -> begin_client(session) -> for each batch: condition, forward, local_loss, backward,
       after_backward, [engine: masks] -> end_client(session) -> upload

and on the server: ``aggregate`` of the checked uploads; before any scoring ``prepare_eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.client import Evaluation, LocalResult
from fedpeft.data.tokenize import TokenizedData

State = dict[str, torch.Tensor]
Metrics = dict[str, Any]  # float or list of floats per key: what a client reports with its upload


@dataclass(frozen=True)
class ClientContext:
    """Plain facts about one client, handed to ``setup`` (no config)."""

    cid: int
    num_rows: int
    label_counts: np.ndarray  # int64 [num_labels], over the client's training rows
    group: str | None  # natural partitions: the client's group (e.g. its language)
    num_test_rows: int
    test_label_counts: np.ndarray

    @property
    def label_distribution(self) -> np.ndarray:
        total = self.label_counts.sum()
        if total == 0:
            return np.full(len(self.label_counts), 1.0 / len(self.label_counts))
        return self.label_counts / total


@dataclass
class ClientSession:
    """One client's local work in one round, as the method sees it (the client side).

    ``rows`` may be replaced by ``begin_client`` (a curriculum trains on a subset); ``store`` holds
    the client's persistent tensors (kept between its rounds, checkpointed, never seen by another
    client); ``masks`` freeze entries exactly (False entries come out of training unchanged:
    the engine restores them after each optimiser step, so neither weight decay nor momentum can
    move them); ``metrics`` travel with the upload to ``aggregate``; ``charge`` adds device FLOPs.
    """

    rnd: int
    cid: int
    model: nn.Module
    data: TokenizedData
    rows: np.ndarray
    received: State
    store: State
    context: ClientContext
    forward: Callable[[Mapping[str, torch.Tensor], np.ndarray], torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)
    extra_flops: float = 0.0

    def charge(self, flops: float) -> None:
        """Charge extra work (a scoring pass, a hypernetwork) to the client's device."""
        if flops < 0:
            raise ValueError(f"cannot charge negative work ({flops} FLOPs)")
        self.extra_flops += float(flops)


@dataclass
class ClientUpdate:
    """One client's upload, already decoded and checked."""

    cid: int
    state: State
    num_samples: int
    result: LocalResult
    metrics: Metrics = field(default_factory=dict)


class FederatedMethod:
    """The hooks of a seed system; every default leaves plain FedAvg-style behaviour alone."""

    name = "method"

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, clients: list[ClientContext], num_labels: int) -> None:
        """Called once with every client's plain context, before round 1 (and on resume)."""

    # -- the client side ------------------------------------------------------------------------
    def prepare_client(self, model: nn.Module, rnd: int, cid: int) -> None:
        """Shape the resident model for this client before its state is loaded."""

    def download(self, rnd: int, cid: int, global_state: State) -> State:
        """The tensors the server sends this client; the client loads exactly these."""
        return global_state

    def begin_client(self, session: ClientSession) -> None:
        """After the received tensors are loaded, before training: local tensors, row choice,
        masks, scoring passes (charged)."""

    def condition(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        rows: np.ndarray,
        *,
        training: bool,
        cid: int | None,
    ) -> None:
        """Before every forward, in training and evaluation (``cid`` None: global evaluation)."""

    def local_loss(
        self, params: Mapping[str, nn.Parameter], received: State
    ) -> torch.Tensor | None:
        """An extra term added to the client's loss (e.g. FedProx); None for none."""
        return None

    def after_backward(self, model: nn.Module, cid: int) -> None:
        """Edit gradients before the optimiser step."""

    def end_client(self, session: ClientSession) -> None:
        """After training, before upload: keep local tensors, report metrics, charge work."""

    def upload(self, rnd: int, cid: int, trained: State) -> State:
        """What travels back: a pure selection of ``trained``. The server applies the same
        selection to the global state to know which names, shapes and dtypes to expect."""
        return trained

    # -- the server side ------------------------------------------------------------------------
    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The next global trainable state (keys not uploaded keep their global value)."""
        raise NotImplementedError

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        """Extra fields for round ``rnd``'s metrics row, asked after ``aggregate`` (e.g. which
        layers were aggregated, the curriculum's share of rows)."""
        return {}

    def prepare_eval(self, model: nn.Module, cid: int | None, store: State | None) -> None:
        """Before scoring: ``cid`` None is the global model; otherwise client ``cid``'s
        personalised score, with its persistent tensors ``store``."""

    def state_dict(self) -> dict[str, Any]:
        """JSON values and tensors (nested dicts/lists): checkpointed without pickle."""
        return {}

    # -- between the two sides ------------------------------------------------------------------
    def client_settings(self) -> dict[str, Any]:
        """What a client needs of the server's decisions to train this round (e.g. which
        layers are aggregated), as JSON values. The embedded engine's clients share this object;
        the Flower engine sends it with every download and the client's process loads it with
        ``load_client_settings``. Not counted as traffic: a few numbers beside the tensors."""
        return {}

    def load_client_settings(self, settings: dict[str, Any]) -> None:
        """Take the server's ``client_settings`` in a client's own process."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# -- methods that drive a round themselves ----------------------------------------------------
# Some systems do not fit "sample clients, train, aggregate" (AutoFedNLP runs three candidate
# configurations side by side on disjoint client groups). Such a method subclasses
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
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {cid, reason}
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientFit:
    """One client's local training from a given state, as the engine ran and charged it.

    ``update`` is None when the server rejected the upload (``rejected`` says why)."""

    update: ClientUpdate | None
    bytes_up: int
    bytes_down: int
    sim_time_s: float
    wall_s: float
    rejected: str | None = None


class ClientRunner:
    """What an engine offers a round-driving method (see ``fedpeft.engine.local``)."""

    model: nn.Module  # the one resident model; the method may reshape it (then load a state)
    num_clients: int
    seed: int

    def fit(self, rnd: int, cid: int, state: State, stream: tuple[int, ...] = ()) -> ClientFit:
        """Send ``state`` to client ``cid``, train it locally, receive and check its upload."""
        raise NotImplementedError

    def fit_many(
        self, rnd: int, cids: list[int], state: State, stream: tuple[int, ...] = ()
    ) -> list[ClientFit]:
        """``fit`` for several clients from the same ``state``, in ``cids`` order (an engine
        whose clients train at the same time sends them all at once)."""
        return [self.fit(rnd, cid, state, stream) for cid in cids]

    def evaluate(self, state: State, split: str) -> Evaluation:
        """Score ``state`` (loaded into the resident model as shaped now) on 'validation'/'test'."""
        raise NotImplementedError

    def client_time_s(self, cid: int, state: State) -> float:
        """The cost model's upper bound on client ``cid``'s simulated seconds for one round from
        ``state`` (model as shaped now; nothing trains): for budgets planned in simulated time."""
        raise NotImplementedError

    def client_times_s(self, cids: list[int], state: State) -> list[float]:
        """``client_time_s`` for several clients (an engine whose clients compute it asks them
        all at once)."""
        return [self.client_time_s(cid, state) for cid in cids]

    def report(self, kind: str, info: dict[str, Any]) -> None:
        """Progress of the round so far, for the screen (e.g. ``"trial"``); ignored by default."""


class RoundDriver(FederatedMethod):
    """A method that runs whole rounds itself (recognised by type, not by attribute)."""

    def run_round(
        self, rnd: int, global_state: State, runner: ClientRunner
    ) -> tuple[State, RoundReport]:
        raise NotImplementedError

    def shape_model(self, model: nn.Module) -> None:
        """Shape the resident model to fit the current global state (before it is loaded)."""
