"""FibecFed (Liu et al., EMNLP 2024): a Fisher-information curriculum and sparse LoRA updates.

Paper: "Fisher Information-based Efficient Curriculum Federated Learning with Large Language
Models" (https://aclanthology.org/2024.emnlp-main.587). No public code exists and the paper's
pacing function, N, sparsity ratio and momentum are not available to us, so every formula below
is our design (../shared/SPEC.md section 4); docs/fibecfed.md explains each choice.

Three parts, on LoRA injected with the run's ``lora:`` settings, each one switchable:

1. Curriculum (``curriculum``). A client scores each of its rows by the trace of its empirical
   Fisher, s(x) = ||d log p(y|x) / d theta_LoRA||^2, with the current global model (vectorised
   per-sample gradients, ``fedpeft.fisher``), re-scored every K rounds (scores kept in the client's
   store) and charged to its device. In round t (t = rnd - 1) it trains on the easiest fraction
   g(t) of its rows:  linear  g(t) = min(1, g0 + (1 - g0) t / T_c)
                      root    g(t) = min(1, sqrt(g0^2 + (1 - g0^2) t / T_c))
   ``order: random`` ranks rows by a seeded random score instead (the ablation).
2. Global aggregation layers (``layer_selection``). In rounds 1, 1+K, 1+2K, ... every client
   reports the sensitivity of each LoRA layer (``fedpeft.fisher.layer_sensitivity``, or the mean
   Fisher diagonal); the server averages the reports and keeps the top N layers for the next K
   rounds. Only their LoRA tensors and the head are uploaded and averaged (round 1, before any
   report, aggregates every layer). The download stays the whole global state.
3. Sparse local update (``sparse``, outside the aggregation layers). Each client keeps a momentum
   score per neuron, m <- beta m + (1 - beta) F, F = the Fisher diagonal summed over the neuron's
   LoRA parameters (a neuron is a row of A [r x in] or of B [out x r]), updated at each scoring,
   and trains only the top k of the rows of each such tensor; every other entry stays exactly
   frozen (``session.masks``). Those tensors never travel: the client keeps them in its store and
   restores them the next time it is sampled, as long as the layer has stayed non-global (a layer
   that was aggregated in between has a new shared value, and the local copy is dropped).
   ``sparse: false`` trains the non-global layers densely, still locally.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedpeft import cost
from fedpeft.fisher import (
    fisher_layer_sensitivity,
    fisher_pass,
    layer_of,
    layer_sensitivity,
    lora_names,
    momentum,
    neuron_scores,
    top_layers,
    top_rows_mask,
)
from fedpeft.methods.base import ClientSession, ClientUpdate, FederatedMethod, State
from fedpeft.peft import lora
from fedpeft.registry import MethodSpec

if TYPE_CHECKING:
    from torch import nn

    from fedpeft.algorithms import ServerAlgorithm


class FibecFedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    curriculum: bool = Field(True, description="train on the easiest rows first (part 1)")
    order: Literal["fisher", "random"] = Field(
        "fisher", description="rank rows by Fisher score, or randomly (ablation)"
    )
    g0: float = Field(0.5, gt=0, le=1, description="g0: fraction of rows used in round 1")
    pacing: Literal["linear", "root"] = Field("root", description="how g(t) grows to 1")
    rounds_to_full: int = Field(10, ge=1, description="T_c: rounds until every row is used")
    rescore_every: int = Field(
        5, ge=1, description="K: rounds between re-scoring rows and re-selecting layers"
    )
    layer_selection: bool = Field(
        True, description="aggregate only the N most sensitive LoRA layers (part 2)"
    )
    global_layers: int | None = Field(
        None, ge=1, description="N: aggregation layers (default: half the LoRA layers, rounded up)"
    )
    sensitivity: Literal["perturbation", "fisher"] = Field(
        "perturbation", description="layer score: output change under input noise, or mean Fisher"
    )
    perturbation: float = Field(
        0.01, gt=0, description="input noise scale, relative to each token's RMS"
    )
    sensitivity_rows: int = Field(64, ge=1, description="rows per client for the layer scores")
    sparse: bool = Field(
        True, description="update only the top-k neurons outside the aggregation layers (part 3)"
    )
    top_neurons: float = Field(
        0.1, gt=0, le=1, description="k: fraction of each local tensor's neurons that train"
    )
    beta: float = Field(0.9, ge=0, lt=1, description="momentum of the neuron scores")
    chunk_rows: int = Field(32, ge=1, description="rows per vectorised per-sample gradient call")


# -- the arithmetic ------------------------------------------------------------------------------


def curriculum_fraction(t: int, g0: float, rounds_to_full: int, pacing: str) -> float:
    """g(t): the fraction of its rows a client trains on at (0-based) round t."""
    progress = t / rounds_to_full
    if pacing == "linear":
        return min(1.0, g0 + (1.0 - g0) * progress)
    if pacing == "root":
        return min(1.0, math.sqrt(g0 * g0 + (1.0 - g0 * g0) * progress))
    raise ValueError(f"unknown pacing '{pacing}' (use 'linear' or 'root')")


def easiest_rows(rows: np.ndarray, scores: torch.Tensor, fraction: float) -> np.ndarray:
    """The ceil(fraction * n) rows (>= 1) with the lowest scores, in their original order; ties
    go to the earlier row."""
    count = min(len(rows), max(1, math.ceil(fraction * len(rows))))
    chosen = np.sort(torch.argsort(scores, stable=True)[:count].numpy())
    return np.asarray(rows)[chosen]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _is_lora(name: str) -> bool:
    return ".lora_" in name


# -- the method ----------------------------------------------------------------------------------


class FibecFed(FederatedMethod):
    name = "fibecfed"

    def __init__(
        self, settings: FibecFedSettings, algorithm: ServerAlgorithm, *, seed: int, num_labels: int
    ):
        self.settings = settings
        self.algorithm = algorithm
        self.seed = seed
        self.num_labels = num_labels
        self.global_layers: list[int] | None = None  # None: every layer aggregates
        self.local_since: dict[int, int] = {}  # layer -> first round of its non-global stretch

    # -- schedule ---------------------------------------------------------------------------------
    def _reporting(self, rnd: int) -> bool:
        return self.settings.layer_selection and (rnd - 1) % self.settings.rescore_every == 0

    def _sparse_active(self) -> bool:
        return self.settings.layer_selection and self.settings.sparse

    def _local(self, name: str) -> bool:
        """A LoRA tensor of a layer outside the aggregation layers (trained and kept locally)."""
        return (
            self.global_layers is not None
            and _is_lora(name)
            and layer_of(name) not in self.global_layers
        )

    # -- client side ------------------------------------------------------------------------------
    def begin_client(self, session: ClientSession) -> None:
        s, store, rnd = self.settings, session.store, session.rnd
        names = lora_names(session.model)
        rows = np.asarray(session.rows)
        fisher = None
        if self._due(store, rnd, rows):
            needs_fisher = (s.curriculum and s.order == "fisher") or self._sparse_active()
            if needs_fisher:
                fisher = fisher_pass(
                    session.model, session.data, rows, names, chunk_rows=s.chunk_rows
                )
                session.charge(self._fisher_flops(session, rows, names))
            if s.curriculum:
                if s.order == "fisher":
                    scores = fisher.scores
                else:
                    generator = torch.Generator().manual_seed(_seed(self.seed, rnd, session.cid))
                    scores = torch.rand(len(rows), generator=generator)
                store["curriculum.scores"] = scores
                store["curriculum.rows"] = torch.as_tensor(rows, dtype=torch.int64)
            if self._sparse_active():
                previous = {n: store[f"momentum.{n}"] for n in names if f"momentum.{n}" in store}
                updated = momentum(previous or None, neuron_scores(fisher.diagonal), s.beta)
                store.update({f"momentum.{n}": m for n, m in updated.items()})
            store["scored_round"] = torch.tensor([rnd], dtype=torch.int64)
        if self._reporting(rnd):
            session.metrics["sensitivity"] = self._sensitivity(session, rows, names, fisher)
        self._restore_local(session.model, store)
        if self._sparse_active():
            session.masks.update(
                {
                    n: top_rows_mask(store[f"momentum.{n}"], s.top_neurons, p.shape)
                    for n, p in session.model.named_parameters()
                    if self._local(n)
                }
            )
        if s.curriculum:
            fraction = curriculum_fraction(rnd - 1, s.g0, s.rounds_to_full, s.pacing)
            session.rows = easiest_rows(rows, store["curriculum.scores"], fraction)
            session.metrics["curriculum_fraction"] = fraction

    def _due(self, store: State, rnd: int, rows: np.ndarray) -> bool:
        """Whether this client (re-)scores its rows and neurons now."""
        if not (self.settings.curriculum or self._sparse_active()):
            return False
        if "scored_round" not in store:
            return True
        if self.settings.curriculum and not np.array_equal(store["curriculum.rows"].numpy(), rows):
            return True
        return rnd - int(store["scored_round"][0]) >= self.settings.rescore_every

    def _sensitivity(self, session: ClientSession, rows, names, fisher) -> list[float]:
        """This client's score for each LoRA layer (ascending layer order), charged."""
        s = self.settings
        layers = sorted({layer_of(n) for n in names})
        generator = torch.Generator().manual_seed(_seed(self.seed, session.rnd, session.cid, 1))
        order = torch.randperm(len(rows), generator=generator).numpy()
        sample = rows[np.sort(order[: s.sensitivity_rows])]
        if s.sensitivity == "fisher":
            if fisher is None:
                fisher = fisher_pass(
                    session.model, session.data, sample, names, chunk_rows=s.chunk_rows
                )
                session.charge(self._fisher_flops(session, sample, names))
            scores = fisher_layer_sensitivity(fisher.diagonal, layers)
        else:
            scores = layer_sensitivity(
                session.model,
                session.data,
                sample,
                layers,
                scale=s.perturbation,
                generator=generator,
                chunk_rows=s.chunk_rows,
            )
            dims, seq_len = self._dims(session, sample)
            per_row = cost.forward_flops(dims, seq_len) + len(layers) * cost.layer_forward_flops(
                dims, seq_len
            )
            session.charge(len(sample) * per_row)
        return [scores[i] for i in layers]

    def _dims(self, session: ClientSession, rows: np.ndarray) -> tuple[cost.ModelDims, int]:
        dims = cost.ModelDims.from_hf_config(session.model.config, self.num_labels)
        seq_len = max(1, round(float(session.data.lengths[rows].float().mean())))
        return dims, seq_len

    def _fisher_flops(self, session: ClientSession, rows: np.ndarray, names: list[str]) -> float:
        """Forward and backward of every scored row, gradients for the LoRA tensors only."""
        dims, seq_len = self._dims(session, rows)
        params = dict(session.model.named_parameters())
        return cost.train_flops(
            dims,
            seq_len,
            len(rows),
            lowest_trainable_layer=min(layer_of(n) for n in names),
            trainable_params=sum(params[n].numel() for n in names),
        )

    def _restore_local(self, model: nn.Module, store: State) -> None:
        """Load this client's own copies of the non-global LoRA tensors that are still valid."""
        if "local_round" not in store:
            return
        saved = int(store["local_round"][0])
        with torch.no_grad():
            for name, p in model.named_parameters():
                key = f"local.{name}"
                if key in store and self._local(name) and self.local_since[layer_of(name)] <= saved:
                    p.copy_(store[key])

    def end_client(self, session: ClientSession) -> None:
        if self.global_layers is None:
            return
        for name, p in session.model.named_parameters():
            if self._local(name):
                session.store[f"local.{name}"] = p.detach().clone()
            else:
                session.store.pop(f"local.{name}", None)
        session.store["local_round"] = torch.tensor([session.rnd], dtype=torch.int64)

    def local_loss(self, params, received: State) -> torch.Tensor | None:
        return self.algorithm.client_loss(params, received)

    def upload(self, rnd: int, cid: int, trained: State) -> State:
        return {name: t for name, t in trained.items() if not self._local(name)}

    # -- server side ------------------------------------------------------------------------------
    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        new_global = self.algorithm.aggregate(
            global_state, [u.state for u in updates], [u.num_samples for u in updates]
        )
        layers = sorted({layer_of(n) for n in global_state if _is_lora(n)})
        fractions = [
            u.metrics["curriculum_fraction"] for u in updates if "curriculum_fraction" in u.metrics
        ]
        self._round_row = {
            "aggregated_layers": layers if self.global_layers is None else list(self.global_layers),
            "curriculum_fraction": float(np.mean(fractions)) if fractions else 1.0,
        }
        reports = [u.metrics["sensitivity"] for u in updates if "sensitivity" in u.metrics]
        if self._reporting(rnd) and reports:
            mean = np.mean(np.asarray(reports, dtype=np.float64), axis=0)
            count = self.settings.global_layers or math.ceil(len(layers) / 2)
            chosen = top_layers(dict(zip(layers, mean.tolist(), strict=True)), count)
            for layer in layers:
                was_global = self.global_layers is None or layer in self.global_layers
                if layer in chosen:
                    self.local_since.pop(layer, None)
                elif was_global:
                    self.local_since[layer] = rnd + 1
            self.global_layers = chosen
        return new_global

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        """The layers whose LoRA tensors were averaged this round, and the curriculum's share."""
        return dict(getattr(self, "_round_row", {}))

    def prepare_eval(self, model: nn.Module, cid: int | None, store: State | None) -> None:
        """Personalised scores use the client's own local tensors; the global score the shared."""
        if cid is not None and store is not None:
            self._restore_local(model, store)

    def client_settings(self) -> dict[str, Any]:
        """The aggregation layers and since when each other layer is local: a client needs them
        to know what it keeps, restores and uploads."""
        return {
            "global_layers": self.global_layers,
            "local_since": {str(k): v for k, v in self.local_since.items()},
        }

    def load_client_settings(self, settings: dict[str, Any]) -> None:
        self.global_layers = settings.get("global_layers")
        self.local_since = {int(k): int(v) for k, v in settings.get("local_since", {}).items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm.state_dict(),
            "global_layers": self.global_layers,
            "local_since": {str(k): v for k, v in self.local_since.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state.get("algorithm", {}))
        self.global_layers = state.get("global_layers")
        self.local_since = {int(k): int(v) for k, v in state.get("local_since", {}).items()}


SPEC = MethodSpec(
    name="fibecfed",
    summary="FibecFed (Liu et al., 2024): Fisher curriculum, selected aggregation layers, "
    "sparse local LoRA",
    settings=FibecFedSettings,
    inject=lambda model, config: lora.inject(model, config.lora),
    default_lr=1e-2,  # LoRA's winner in the FedPETuning study's lr selection
    system=lambda config, info: FibecFed(
        config.fibecfed, info.algorithm, seed=config.seed, num_labels=info.num_labels
    ),
)
