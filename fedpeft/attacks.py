"""Simulated attacks: some clients send poisoned updates or train on flipped labels.

A run with ``attack.type`` set picks ``floor(fraction x num_clients)`` attacking clients once,
by a draw seeded with the run seed (``choose_attackers``); they attack in every round they are
sampled. With g the state the client received and w the state it trained (so its honest update is
w - g) and s = ``attack.scale``, an attacker uploads, tensor by tensor over the floating ones:

    sign_flip    g - s (w - g)        the update reversed (s = 1 by default)
    scale        g + s (w - g)        the update blown up (s = 10 by default)
    noise        w + e, e ~ N(0, s^2) Gaussian noise on every coordinate (s = 1 by default),
                                      seeded by (run seed, round, client)
    label_flip   trains on labels y -> num_labels - 1 - y, then uploads honestly

Integer tensors, and tensors the client did not receive (it has no update for them), travel
unchanged. Arithmetic runs in float64 and is cast back; a result that overflows the dtype becomes
Inf and is rejected by the server's upload check like any other bad upload.

These are the common baselines of the Byzantine-robustness literature (sign flipping and Gaussian
noise, e.g. Li et al., "RSA", AAAI 2019, https://arxiv.org/abs/1811.03761; boosted updates,
Bhagoji et al., "Analyzing Federated Learning through an Adversarial Lens", ICML 2019,
https://arxiv.org/abs/1811.12470; label flipping, Tolpegin et al., ESORICS 2020,
https://arxiv.org/abs/2007.08432).
They are pure functions; both engines apply them (``client_upload`` in ``engine/run.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedpeft.data.tokenize import TokenizedData

State = dict[str, torch.Tensor]

ATTACKS: tuple[str, ...] = ("none", "sign_flip", "scale", "noise", "label_flip")
UPDATE_ATTACKS: tuple[str, ...] = ("sign_flip", "scale", "noise")
DEFAULT_SCALE: dict[str, float] = {"sign_flip": 1.0, "scale": 10.0, "noise": 1.0}
_ATTACK_STREAM = 0x61747461  # keeps these draws apart from every other seeded draw of a run


def num_attackers(num_clients: int, fraction: float) -> int:
    """floor(fraction x num_clients), robust to float error (0.3 x 10 is 3, not 2)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"attack fraction must be in [0, 1], got {fraction}")
    return min(num_clients, math.floor(fraction * num_clients + 1e-9))


def choose_attackers(seed: int, num_clients: int, fraction: float) -> list[int]:
    """The attacking clients of a run, sorted: a seeded draw without replacement."""
    count = num_attackers(num_clients, fraction)
    rng = np.random.default_rng([seed, _ATTACK_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class AttackPlan:
    """Who attacks and how, fixed for a run (``plan_attack`` builds it)."""

    kind: str
    fraction: float
    scale: float | None  # None for label_flip
    seed: int
    attackers: tuple[int, ...]

    def record(self) -> dict:
        """What ``attackers.json`` in the run folder holds."""
        return {
            "type": self.kind,
            "fraction": self.fraction,
            "scale": self.scale,
            "seed": self.seed,
            "attackers": list(self.attackers),
        }


def plan_attack(
    kind: str, fraction: float, num_clients: int, seed: int, scale: float | None = None
) -> AttackPlan | None:
    """The run's attack, or None for ``kind`` 'none'."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; valid: {', '.join(ATTACKS)}")
    if kind == "none":
        return None
    if kind == "label_flip":
        if scale is not None:
            raise ValueError("label_flip takes no scale")
    else:
        scale = DEFAULT_SCALE[kind] if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"attack scale must be > 0, got {scale}")
    attackers = choose_attackers(seed, num_clients, fraction)
    if not attackers:
        raise ValueError(f"fraction {fraction} of {num_clients} clients selects no attacker")
    return AttackPlan(kind, fraction, scale, seed, tuple(attackers))


def _floating(trained: State, received: State):
    """Yield (key, trained value, received value or None) with None where nothing is attacked."""
    for key, value in trained.items():
        anchor = received.get(key)
        if not value.is_floating_point() or anchor is None:
            yield key, value, None
            continue
        if anchor.shape != value.shape:
            raise ValueError(
                f"key {key!r}: trained shape {tuple(value.shape)} != received {tuple(anchor.shape)}"
            )
        yield key, value, anchor


def sign_flip(trained: State, received: State, scale: float = 1.0) -> State:
    """g - scale (w - g): the client's update reversed (and scaled)."""
    return scale_update(trained, received, -scale)


def scale_update(trained: State, received: State, scale: float) -> State:
    """g + scale (w - g): the client's update multiplied by ``scale``."""
    out: State = {}
    for key, value, anchor in _floating(trained, received):
        if anchor is None:
            out[key] = value
            continue
        base = anchor.detach().to(value.device, torch.float64)
        moved = base + scale * (value.detach().to(torch.float64) - base)
        out[key] = moved.to(value.dtype)
    return out


def add_noise(trained: State, received: State, std: float, seed: int) -> State:
    """w + e with e ~ N(0, std^2) on every attacked coordinate, drawn from ``seed`` in key order."""
    generator = torch.Generator().manual_seed(seed)
    out: State = {}
    for key, value, anchor in _floating(trained, received):
        if anchor is None:
            out[key] = value
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        out[key] = (value.detach().to(torch.float64) + std * noise.to(value.device)).to(value.dtype)
    return out


def noise_seed(seed: int, rnd: int, cid: int, *stream: int) -> int:
    """The noise attack's seed for one client's fit in one round."""
    return int(
        np.random.SeedSequence([seed, _ATTACK_STREAM, rnd, cid, *stream]).generate_state(1)[0]
    )


def poison_update(
    plan: AttackPlan, trained: State, received: State, rnd: int, cid: int, *stream: int
) -> State:
    """What an attacking client uploads instead of ``trained`` (update attacks only)."""
    if plan.kind == "sign_flip":
        return sign_flip(trained, received, plan.scale)
    if plan.kind == "scale":
        return scale_update(trained, received, plan.scale)
    if plan.kind == "noise":
        return add_noise(trained, received, plan.scale, noise_seed(plan.seed, rnd, cid, *stream))
    raise ValueError(f"{plan.kind!r} is not an update attack ({', '.join(UPDATE_ATTACKS)})")


def flip_labels(data: TokenizedData, num_labels: int) -> TokenizedData:
    """The same rows with labels y -> num_labels - 1 - y (token tensors are shared, not copied)."""
    labels = data.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels outside [0, {num_labels}) cannot be flipped")
    return replace(data, labels=(num_labels - 1) - labels)
