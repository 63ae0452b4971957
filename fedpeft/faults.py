"""Simulated faults (both engines): crashes, stragglers, a round deadline, a quorum.

Real federations lose clients. ``faults:`` in the run config turns on, all drawn from the run
seed so that a run (and a resumed run) is reproducible:

- ``crash_prob``: each sampled client crashes with this probability, independently per
  (round, client, attempt). A crashed client has downloaded the global state (those bytes count)
  and then disappears: it trains nothing and sends nothing. The server notices the dropped
  connection when the download ends, so the client occupies the round for its download time.
- ``straggler_fraction``, ``straggler_factor``: floor(fraction x num_clients) clients, drawn once
  (like attackers: a slow device stays slow), take ``factor`` times their simulated time
  (compute and communication) in every round they are sampled.
- ``deadline_s``: the server waits this many simulated seconds for replies. A client whose
  simulated time exceeds it is dropped, as a real server drops a late reply: its update is not
  aggregated (its upload bytes still count: it sent them), and the round lasts ``deadline_s``.
- ``min_clients``: a round that ends with fewer usable updates (not crashed, not late, not
  rejected) is retried with a fresh seeded sample, at most ``retries`` times; every attempt's bytes
  and simulated time count. If the last attempt also falls short the run stops with
  ``RoundFailed`` (one line), and the run folder keeps the rounds before it (resumable).

Every metrics row then lists ``clients_dropped: [{cid, reason, attempt}]`` (reason ``crashed`` or
``deadline``) and ``stragglers_in_round``; rejected uploads stay in ``clients_rejected``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_FAULT_STREAM = 0x6661756C  # keeps these draws apart from every other seeded draw of a run
_CRASH, _STRAGGLERS, _RESAMPLE = 1, 2, 3


class RoundFailed(ValueError):
    """A round that could not gather ``min_clients`` usable updates; said in one line."""


def num_stragglers(num_clients: int, fraction: float) -> int:
    """floor(fraction x num_clients), robust to float error."""
    return min(num_clients, math.floor(fraction * num_clients + 1e-9))


@dataclass(frozen=True)
class FaultPlan:
    """The faults of a run, fixed by the config and the seed (``plan_faults`` builds it)."""

    seed: int
    crash_prob: float
    stragglers: tuple[int, ...]
    straggler_factor: float
    deadline_s: float | None
    min_clients: int
    retries: int

    def crashed(self, rnd: int, cid: int, attempt: int = 0) -> bool:
        """Whether client ``cid`` crashes in round ``rnd`` (attempt ``attempt``)."""
        if self.crash_prob <= 0:
            return False
        rng = np.random.default_rng([self.seed, _FAULT_STREAM, _CRASH, rnd, cid, attempt])
        return bool(rng.random() < self.crash_prob)

    def client_time_s(self, cid: int, seconds: float) -> float:
        """A client's simulated time, stretched when it is a straggler."""
        return seconds * self.straggler_factor if cid in self.stragglers else seconds

    def late(self, seconds: float) -> bool:
        return self.deadline_s is not None and seconds > self.deadline_s

    def round_time_s(self, slowest_s: float) -> float:
        """The round lasts as long as its slowest client, at most the deadline."""
        if self.deadline_s is None:
            return slowest_s
        return min(slowest_s, self.deadline_s)

    def sample(self, rnd: int, attempt: int, num_clients: int, per_round: int) -> list[int]:
        """The clients of a retry (attempt >= 1): a fresh seeded draw, sorted."""
        rng = np.random.default_rng([self.seed, _FAULT_STREAM, _RESAMPLE, rnd, attempt])
        return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def plan_faults(
    seed: int,
    num_clients: int,
    *,
    crash_prob: float = 0.0,
    straggler_fraction: float = 0.0,
    straggler_factor: float = 1.0,
    deadline_s: float | None = None,
    min_clients: int = 0,
    retries: int = 2,
) -> FaultPlan | None:
    """The run's fault plan, or None when no fault is configured."""
    if not 0 <= crash_prob <= 1:
        raise ValueError(f"crash_prob must be in [0, 1], got {crash_prob}")
    if not 0 <= straggler_fraction <= 1:
        raise ValueError(f"straggler_fraction must be in [0, 1], got {straggler_fraction}")
    if straggler_factor < 1:
        raise ValueError(f"straggler_factor must be >= 1, got {straggler_factor}")
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0 (or None), got {deadline_s}")
    count = num_stragglers(num_clients, straggler_fraction)
    if not (crash_prob or (count and straggler_factor != 1) or deadline_s or min_clients):
        return None
    rng = np.random.default_rng([seed, _FAULT_STREAM, _STRAGGLERS])
    stragglers = sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))
    return FaultPlan(
        seed, crash_prob, tuple(stragglers), straggler_factor, deadline_s, min_clients, retries
    )
