"""Server-side FL algorithms behind one small object, so the engines never branch on the algorithm.

The arithmetic lives in pure functions (``fedavg``, ``fedprox``, ``fedopt``, ``robust``,
``krum``), shared by the embedded and the Flower engine. ``ServerAlgorithm`` adds only what a run
needs around them: the server optimiser's state between rounds (FedOpt), the client's extra loss
term (FedProx), optional norm clipping of client updates, the fallback of the Krum family when a
round has too few replies, and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from fedpeft.algorithms.fedavg import State, fedavg, weighted_average
from fedpeft.algorithms.fedopt import (
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_ETA,
    DEFAULT_TAU,
    FEDOPT_KINDS,
    check_fedopt_hparams,
    fedopt_step,
)
from fedpeft.algorithms.fedprox import proximal_term
from fedpeft.algorithms.krum import (
    KRUM_KINDS,
    bulyan,
    check_clients,
    krum,
    min_clients,
    multi_krum,
)
from fedpeft.algorithms.robust import (
    check_trim_ratio,
    clip_updates,
    coordinate_median,
    trimmed_mean,
)

ROBUST_KINDS: tuple[str, ...] = ("median", "trimmed_mean", *KRUM_KINDS)
ALGORITHMS: tuple[str, ...] = ("fedavg", "fedprox", *FEDOPT_KINDS, *ROBUST_KINDS)


log = logging.getLogger("fedpeft.algorithms")


class ServerAlgorithm:
    """One per run: FedAvg aggregation, optionally followed by a FedOpt server step (fedadam,
    fedyogi, fedadagrad) or paired with a FedProx client term; or a robust rule (median,
    trimmed_mean, krum, multi_krum, bulyan) in its place. ``clip_norm`` bounds every client's
    update norm first, whatever the rule. Build it with ``make_algorithm``.

    The Krum family tolerates ``num_byzantine`` = f clients per round when the round has enough
    replies (krum, multi_krum: n > 2f + 2; bulyan: n >= 4f + 3); the run config refuses a
    ``clients_per_round`` below that. A round can still end with fewer replies (rejected uploads,
    clients that timed out under Flower): it then falls back to the coordinate-wise median of the
    replies, with a warning. The median needs no minimum and still resists fewer than half
    Byzantine clients; stopping the run would hand any f clients that send malformed uploads a way
    to stop it, and skipping the round would stall training whenever clients drop out.
    ``multi_krum_m`` (default n - f) is capped at n - f replies."""

    def __init__(
        self,
        name: str,
        *,
        mu: float = 0.01,
        eta: float = DEFAULT_ETA,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        tau: float = DEFAULT_TAU,
        trim_ratio: float = 0.2,
        clip_norm: float | None = None,
        num_byzantine: int = 1,
        multi_krum_m: int | None = None,
    ) -> None:
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
        if name == "fedprox" and mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        if name in FEDOPT_KINDS:
            check_fedopt_hparams(name, eta, beta1, beta2, tau)
        if name == "trimmed_mean":
            check_trim_ratio(trim_ratio)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or None), got {clip_norm}")
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if multi_krum_m is not None and multi_krum_m < 1:
            raise ValueError(f"multi_krum_m must be >= 1 (or None), got {multi_krum_m}")
        self.name = name
        self.trim_ratio, self.clip_norm = trim_ratio, clip_norm
        self.num_byzantine, self.multi_krum_m = num_byzantine, multi_krum_m
        self.mu = mu
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self._opt_state: dict = {}

    def aggregate(
        self, global_state: State, client_states: list[State], num_samples: list[int]
    ) -> State:
        """The next global state from this round's client states (only the exchanged tensors).

        Clients may upload a subset of the global keys (the same subset each: a method that
        exchanges only some layers); those keys are aggregated and the rest keep their value.
        """
        uploaded = client_states[0].keys() if client_states else global_state.keys()
        if uploaded != global_state.keys():
            unknown = sorted(uploaded - global_state.keys())
            if unknown:
                raise ValueError(f"client state 0 has unexpected key {unknown[0]!r}")
            part = {key: global_state[key] for key in global_state if key in uploaded}
            return {**global_state, **self.aggregate(part, client_states, num_samples)}
        if self.clip_norm is not None:
            client_states = clip_updates(global_state, client_states, self.clip_norm)
        if self.name == "median":
            return coordinate_median(global_state, client_states)
        if self.name == "trimmed_mean":
            return trimmed_mean(global_state, client_states, self.trim_ratio)
        if self.name in KRUM_KINDS:
            return self._krum_family(global_state, client_states)
        averaged = fedavg(global_state, client_states, num_samples)
        if self.name not in FEDOPT_KINDS:
            return averaged
        new_global, self._opt_state = fedopt_step(
            global_state,
            averaged,
            self._opt_state,
            self.name,
            eta=self.eta,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return new_global

    def _krum_family(self, global_state: State, client_states: list[State]) -> State:
        n, f = len(client_states), self.num_byzantine
        if n < min_clients(self.name, f):
            log.warning(
                "%s with f = %d needs %d replies, got %d: this round uses the coordinate median",
                self.name,
                f,
                min_clients(self.name, f),
                n,
            )
            return coordinate_median(global_state, client_states)
        if self.name == "krum":
            return krum(global_state, client_states, f)
        if self.name == "bulyan":
            return bulyan(global_state, client_states, f)
        m = n - f if self.multi_krum_m is None else min(self.multi_krum_m, n - f)
        return multi_krum(global_state, client_states, f, m)

    def client_loss(
        self, params: Mapping[str, torch.Tensor], global_state: State
    ) -> torch.Tensor | None:
        """The extra term a client adds to its local loss: FedProx's proximal term, else None."""
        if self.name != "fedprox":
            return None
        return proximal_term(params, global_state, self.mu)

    def state_dict(self) -> dict:
        """What a checkpoint must keep to resume identically: the server optimiser's m and v."""
        return {"name": self.name, "opt_state": self._opt_state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint written by ``state_dict`` of the same algorithm."""
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint is for {state.get('name')!r}, not {self.name!r}")
        opt_state = state.get("opt_state", {})
        self._opt_state = {part: dict(tensors) for part, tensors in opt_state.items()}

    def __repr__(self) -> str:
        if self.name == "fedprox":
            return f"ServerAlgorithm('fedprox', mu={self.mu})"
        if self.name in FEDOPT_KINDS:
            return (
                f"ServerAlgorithm({self.name!r}, eta={self.eta}, beta1={self.beta1}, "
                f"beta2={self.beta2}, tau={self.tau})"
            )
        if self.name == "trimmed_mean":
            return f"ServerAlgorithm('trimmed_mean', trim_ratio={self.trim_ratio})"
        if self.name == "multi_krum":
            return (
                f"ServerAlgorithm('multi_krum', num_byzantine={self.num_byzantine}, "
                f"m={self.multi_krum_m})"
            )
        if self.name in KRUM_KINDS:
            return f"ServerAlgorithm({self.name!r}, num_byzantine={self.num_byzantine})"
        return f"ServerAlgorithm({self.name!r})"


def make_algorithm(
    name: str,
    *,
    mu: float = 0.01,
    eta: float = DEFAULT_ETA,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    tau: float = DEFAULT_TAU,
    trim_ratio: float = 0.2,
    clip_norm: float | None = None,
    num_byzantine: int = 1,
    multi_krum_m: int | None = None,
) -> ServerAlgorithm:
    """Build the server algorithm named in the run config (one of ``ALGORITHMS``)."""
    return ServerAlgorithm(
        name,
        mu=mu,
        eta=eta,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        trim_ratio=trim_ratio,
        clip_norm=clip_norm,
        num_byzantine=num_byzantine,
        multi_krum_m=multi_krum_m,
    )


__all__ = [
    "ALGORITHMS",
    "KRUM_KINDS",
    "ROBUST_KINDS",
    "ServerAlgorithm",
    "State",
    "bulyan",
    "check_clients",
    "clip_updates",
    "coordinate_median",
    "fedavg",
    "fedopt_step",
    "krum",
    "make_algorithm",
    "min_clients",
    "multi_krum",
    "proximal_term",
    "trimmed_mean",
    "weighted_average",
]
