"""AutoFedNLP / FedAdapter: adapters whose depth and width are configured during the run.

Cai, Wu, Wang, Xu, Zhang, Wang, Liu. "Efficient Federated Learning for Modern NLP", MobiCom 2023
(arXiv:2205.10162, earlier "AutoFedNLP" / "FedAdapter"). Reference code: UbiquitousLearning/FedAdapter.

A configuration is (depth d, width w): bottleneck adapters of width w in the top d layers, the
layers below frozen (d = 0 trains the classifier head only). Training runs in *trial periods*;
one engine round here is one period:

1. The client population is shuffled (seeded by the period) and split into three disjoint pools,
   one per candidate, all starting from the current global weights:
       shallow (d, w)     wide (d, min(w + step, max_width))     deep (d', w), d' = d + 1
   (d' = ``depth_jump_from_zero`` when d = 0, as in the reference: one top layer barely helps).
   A candidate equal to shallow (width or depth at its cap; wide at d = 0, where there are no
   adapters to widen) is not run.
2. Each candidate gets the same budget of simulated device time, T = tau * (4d + 1): it runs FedAvg
   rounds of ``clients_per_round`` clients drawn from its pool while its elapsed time is below T,
   so a cheaper candidate runs more rounds. The groups run side by side: the period lasts as long
   as the slowest group; bytes of all groups count.
3. The server scores each candidate on its held-out validation split. The best accuracy wins,
   ties going to shallow, then wide, then deep (the cheaper configuration). Everyone continues
   from the winner's weights and configuration.

tau, as a count of rounds. The reference sets tau = 60-100 s against its own latency table,
which gives on the order of a hundred rounds per candidate per period at shallow depth. Seconds do
not carry over between cost models, models and data sizes (on the tiny test model 60 s bought
thousands of rounds per period), so by default tau is derived, before the first period, from a
budget stated in rounds (``rounds_per_period``, R = 20):

    r_c   = max over all clients k of the cost model's upper bound on k's round at candidate c
            of the first period, from the starting weights (``ClientRunner.client_time_s``):
            one local pass, every sequence as long as k's longest row, every row a cache miss
            (charged a frozen-bottom forward, as in a configuration's first round), plus the
            candidate's trainable tensors down and up over k's link
    r_0   = max over the first period's candidates of r_c      (the deep one, in practice)
    tau   = R * r_0 / (4 d_0 + 1)                                (d_0: the starting depth)

so the first period's budget is T_1 = tau * (4 d_0 + 1) = R * r_0. Every actual round of a
first-period candidate lasts at most r_0 (its slowest sampled client is no slower than the
slowest client's bound), so each of them runs at least R rounds, whatever the model, data,
devices or links. Later periods keep the reference's T = tau * (4d + 1): a round's cost grows
about linearly with depth (a layer's forward and backward per row) while the budget grows by
4 tau per layer, so deeper periods run at least as many rounds. Worked example (MiniLM-L6, 4
labels, Jetson TX2 at 200 GFLOP/s, 1 MB/s links, about 100 rows of <= 64 tokens per client,
start (0, 8)): the deep candidate (2, 8) is bounded by 0.89 s of compute (two trained layers
plus four frozen layers for the misses) + 0.12 s for its 14.6k parameters both ways, r_0 = 1.0 s,
tau = 20 s; head-only rounds at (0, 8) cost 0.01 s once the client's rows are cached, so the
shallow candidate runs hundreds of rounds in the same 20 s. ``tau`` set explicitly (seconds)
skips the derivation. The derived tau is kept in the checkpoint and written into every trial.

Upgrades keep the trained weights: deeper adds zero-up-projection adapters below the existing
ones, wider appends bottleneck units with zero up-projection columns (``peft.adapter.set_layout``),
so the model's output is unchanged at the moment of the upgrade. Because the frozen bottom only
changes with depth, the activation cache (``fedpeft.cache``) stays valid across width changes.

The period's metrics row carries ``depth`` / ``width`` (the winner's) and ``trial``: tau and the
budget, the candidates, the rounds each ran, their simulated time, local-training wall-clock,
validation accuracy, and the winner. Each candidate's progress is shown as it runs (``ClientRunner.report``).
Server-side validation is not charged to simulated time (the server is not the bottleneck).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.algorithms.fedavg import weighted_average
from fedpeft.methods.base import ClientRunner, ClientUpdate, RoundDriver, RoundReport, State
from fedpeft.peft import adapter as adapter_unit
from fedpeft.peft.adapter import AdapterSettings, set_layout
from fedpeft.peft.base import load_trainable_state, trainable_state
from fedpeft.registry import MethodSpec

if TYPE_CHECKING:
    from fedpeft.config import RunConfig


class AutoFedNLPSettings(BaseModel):
    """Defaults are the reference's (FedAdapter: start at depth 0, width 8, +8 up to 64)."""

    model_config = ConfigDict(extra="forbid")

    start_depth: int = Field(0, ge=0, description="depth of the first configuration")
    start_width: int = Field(8, ge=1, description="adapter width of the first configuration")
    rounds_per_period: int = Field(
        20,
        ge=1,
        description="budget in rounds: tau is set so every first-period candidate runs at least "
        "this many rounds (its slowest client, nothing cached)",
    )
    tau: float | None = Field(
        None,
        gt=0,
        description="simulated seconds (a trial period gets T = tau * (4d + 1)); "
        "default: derived from rounds_per_period",
    )
    width_step: int = Field(8, ge=1, description="bottleneck units the wide candidate adds")
    max_width: int = Field(64, ge=1, description="width cap")
    max_depth: int | None = Field(None, ge=0, description="depth cap (default: all layers)")
    depth_jump_from_zero: int = Field(
        2, ge=1, description="depth the deep candidate tries when the current depth is 0"
    )


@dataclass(frozen=True)
class Candidate:
    name: str  # shallow | wide | deep
    depth: int
    width: int


# Tie order: the first listed wins a tie (cheapest first).
ORDER = ("shallow", "wide", "deep")


class AutoFedNLP(RoundDriver):
    name = "autofednlp"

    def __init__(
        self,
        settings: AutoFedNLPSettings,
        adapter: AdapterSettings,
        num_layers: int,
        clients_per_round: int,
    ):
        self.settings = settings
        self.adapter = adapter
        self.num_layers = num_layers
        self.max_depth = min(settings.max_depth or num_layers, num_layers)
        self.clients_per_round = clients_per_round
        self.depth = min(settings.start_depth, self.max_depth)
        self.width = settings.start_width
        self.tau = settings.tau  # None until derived from rounds_per_period
        # (depth, width) of the candidate in training: the shape a client's own copy of the
        # model takes (engines whose clients run in other processes, ``client_settings``)
        self.trial_shape: tuple[int, int] | None = None
        self.client_shape: tuple[int, int] | None = None

    # -- the configuration search ---------------------------------------------------------------
    def budget_s(self) -> float:
        if self.tau is None:
            raise ValueError("tau is not set yet: it is derived before the first trial period")
        return self.tau * (4 * self.depth + 1)

    def calibrate(self, global_state: State, runner: ClientRunner, rnd: int) -> float:
        """tau from ``rounds_per_period``: R x the costliest bound on a round of any candidate
        of this (the first) period, over all clients, / (4d + 1). See the module docstring."""
        costliest = 0.0
        for candidate in self.candidates():
            start = self.upgrade(runner.model, global_state, candidate, seed=runner.seed * 1000)
            self.trial_shape = (candidate.depth, candidate.width)  # the shape clients take
            try:
                worst = max(runner.client_times_s(list(range(runner.num_clients)), start))
            finally:
                self.trial_shape = None
            costliest = max(costliest, worst)
        self.shape_model(runner.model)
        return self.settings.rounds_per_period * costliest / (4 * self.depth + 1)

    def candidates(self) -> list[Candidate]:
        d, w, s = self.depth, self.width, self.settings
        deeper = s.depth_jump_from_zero if d == 0 else d + 1
        found = [Candidate("shallow", d, w)]
        if d > 0 and w < s.max_width:
            found.append(Candidate("wide", d, min(w + s.width_step, s.max_width)))
        if d < self.max_depth:
            found.append(Candidate("deep", min(deeper, self.max_depth), w))
        return found

    @staticmethod
    def pick_winner(scores: Mapping[str, float]) -> str:
        """Best validation accuracy; ties go to the earlier of shallow, wide, deep."""
        best = None
        for name in ORDER:
            if name in scores and (best is None or scores[name] > scores[best]):
                best = name
        if best is None:
            raise ValueError("no candidate was scored")
        return best

    def _shape(self, model: nn.Module, depth: int, width: int) -> None:
        set_layout(model, depth, width, self.adapter)

    def upgrade(self, model: nn.Module, state: State, candidate: Candidate, seed: int) -> State:
        """The candidate's starting state: the current weights plus output-preserving new parts."""
        self._shape(model, self.depth, self.width)
        load_trainable_state(model, state)
        torch.manual_seed(seed)  # the new down-projections' random init
        self._shape(model, candidate.depth, candidate.width)
        return trainable_state(model)

    # -- one trial period -------------------------------------------------------------------------
    def _pools(self, seed: int, rnd: int, num_clients: int, groups: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, rnd, 1017]).permutation(num_clients)
        return np.array_split(order, groups)

    def _train_candidate(
        self,
        rnd: int,
        group: int,
        candidate: Candidate,
        state: State,
        pool: np.ndarray,
        runner: ClientRunner,
        budget: float,
    ) -> dict[str, Any]:
        elapsed, rounds, up, down, wall, loss_sum, seen, clients = 0.0, 0, 0, 0, 0.0, 0.0, 0, []
        per_round = min(self.clients_per_round, len(pool))
        while elapsed < budget:
            runner.report(
                "trial",
                {
                    "period": rnd,
                    "candidate": candidate.name,
                    "depth": candidate.depth,
                    "width": candidate.width,
                    "rounds": rounds,
                    "sim_time_s": elapsed,
                    "budget_s": budget,
                },
            )
            rng = np.random.default_rng([runner.seed, rnd, group, rounds])
            chosen = sorted(int(c) for c in rng.choice(pool, size=per_round, replace=False))
            fits = runner.fit_many(rnd, chosen, state, stream=(group, rounds))
            updates: list[ClientUpdate] = [fit.update for fit in fits if fit.update is not None]
            if updates:  # a round whose every upload was rejected leaves the state as it was
                state = weighted_average(
                    [u.state for u in updates], [u.num_samples for u in updates]
                )
            elapsed += max(fit.sim_time_s for fit in fits)
            up += sum(fit.bytes_up for fit in fits)
            down += sum(fit.bytes_down for fit in fits)
            wall += sum(fit.wall_s for fit in fits)
            loss_sum += sum(u.result.mean_loss * u.result.samples_seen for u in updates)
            seen += sum(u.result.samples_seen for u in updates)
            clients += [u.cid for u in updates]
            rounds += 1
        return {
            "state": state,
            "rounds": rounds,
            "sim_time_s": elapsed,
            "bytes_up": up,
            "bytes_down": down,
            "train_wall_s": wall,
            "train_loss": loss_sum / max(seen, 1),
            "samples": seen,
            "clients": clients,
        }

    def run_round(
        self, rnd: int, global_state: State, runner: ClientRunner
    ) -> tuple[State, RoundReport]:
        model = runner.model
        if self.tau is None:
            self.tau = self.calibrate(global_state, runner, rnd)
        budget = self.budget_s()
        candidates = self.candidates()
        pools = self._pools(runner.seed, rnd, runner.num_clients, 3)
        runs: dict[str, dict[str, Any]] = {}
        for group, candidate in enumerate(candidates):
            started = time.perf_counter()
            start = self.upgrade(model, global_state, candidate, seed=runner.seed * 1000 + rnd)
            self.trial_shape = (candidate.depth, candidate.width)
            try:
                run = self._train_candidate(
                    rnd, group, candidate, start, pools[group], runner, budget
                )
            finally:
                self.trial_shape = None
            run["val_accuracy"] = runner.evaluate(run["state"], "validation").accuracy
            runs[candidate.name] = run
            runner.report(
                "trial_end",
                {
                    "period": rnd,
                    "candidate": candidate.name,
                    "depth": candidate.depth,
                    "width": candidate.width,
                    "wall_s": time.perf_counter() - started,
                    **{k: run[k] for k in ("rounds", "sim_time_s", "val_accuracy")},
                },
            )
        winner_name = self.pick_winner({name: run["val_accuracy"] for name, run in runs.items()})
        winner = next(c for c in candidates if c.name == winner_name)
        previous = (self.depth, self.width)
        self.depth, self.width = winner.depth, winner.width
        new_state = runs[winner_name]["state"]
        self.shape_model(model)
        trial = {
            "period": rnd,
            "start": {"depth": previous[0], "width": previous[1]},
            "tau_s": self.tau,
            "rounds_per_period": self.settings.rounds_per_period
            if self.settings.tau is None
            else None,
            "budget_s": budget,
            "candidates": [
                {
                    "name": c.name,
                    "depth": c.depth,
                    "width": c.width,
                    **{k: v for k, v in runs[c.name].items() if k != "state"},
                }
                for c in candidates
            ],
            "winner": winner_name,
        }
        samples = sum(run["samples"] for run in runs.values())
        report = RoundReport(
            rnd=rnd,
            clients=sorted({c for run in runs.values() for c in run["clients"]}),
            train_loss=sum(run["train_loss"] * run["samples"] for run in runs.values()) / samples,
            bytes_up=sum(run["bytes_up"] for run in runs.values()),
            bytes_down=sum(run["bytes_down"] for run in runs.values()),
            sim_time_s=max(run["sim_time_s"] for run in runs.values()),
            train_wall_s=sum(run["train_wall_s"] for run in runs.values()),
            extra={"depth": self.depth, "width": self.width, "trial": trial},
        )
        return new_state, report

    def shape_model(self, model: nn.Module) -> None:
        self._shape(model, self.depth, self.width)

    # -- a client in its own process --------------------------------------------------------------
    def client_settings(self) -> dict[str, Any]:
        """The shape of the candidate a client trains (during a trial period)."""
        return {} if self.trial_shape is None else {"shape": list(self.trial_shape)}

    def load_client_settings(self, settings: dict[str, Any]) -> None:
        shape = settings.get("shape")
        self.client_shape = None if shape is None else (int(shape[0]), int(shape[1]))

    def prepare_client(self, model: nn.Module, rnd: int, cid: int) -> None:
        """A client's own model takes the shape of the candidate it trains (the embedded
        engine's one model already has it: ``upgrade``)."""
        if self.client_shape is not None:
            self._shape(model, *self.client_shape)

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return weighted_average([u.state for u in updates], [u.num_samples for u in updates])

    def state_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "width": self.width, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.depth = state.get("depth", self.depth)
        self.width = state.get("width", self.width)
        self.tau = state.get("tau", self.tau)


def _start_settings(config: RunConfig) -> AdapterSettings:
    """Bottleneck adapters in the starting configuration (the ``adapter:`` section otherwise)."""
    start = config.autofednlp
    return config.adapter.model_copy(
        update={"depth": start.start_depth, "width": start.start_width, "layers": None}
    )


def _check(config: RunConfig) -> None:
    if config.num_clients < 3 * config.clients_per_round:
        raise ValueError(
            f"num_clients: autofednlp splits clients into 3 trial groups of "
            f"clients_per_round ({config.clients_per_round}); needs >= {3 * config.clients_per_round}"
        )
    if config.validation_size == 0:
        raise ValueError("validation_size: autofednlp picks trial winners on it; set > 0")
    if config.algorithm != "fedavg":
        raise ValueError("algorithm: autofednlp aggregates with fedavg, as the reference")


SPEC = MethodSpec(
    name="autofednlp",
    summary="AutoFedNLP (Cai et al., MobiCom 2023): adapter depth/width upgraded by client trials",
    settings=AutoFedNLPSettings,
    inject=lambda model, config: adapter_unit.inject(model, _start_settings(config)),
    default_lr=1e-2,  # the adapter's (FedPETuning study, validation-only selection)
    system=lambda config, info: AutoFedNLP(
        config.autofednlp, _start_settings(config), info.num_layers, config.clients_per_round
    ),
    check=_check,
    drives_rounds=True,
)
