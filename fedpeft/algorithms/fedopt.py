"""FedAdagrad, FedAdam, FedYogi: an adaptive optimiser on the server, driven by the clients' mean update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295
(Algorithm 2).

Each round the server treats the averaged client change as a pseudo-gradient and takes one step of
an adaptive optimiser with it, element-wise per tensor:

    delta = fedavg(client states) - x                      (pseudo-gradient)
    m     = beta1 * m + (1 - beta1) * delta
    v     = v + delta^2                                    FedAdagrad
    v     = beta2 * v + (1 - beta2) * delta^2              FedAdam
    v     = v - (1 - beta2) * delta^2 * sign(v - delta^2)  FedYogi
    x     = x + eta * m / (sqrt(v) + tau)

There is no bias correction, as in the paper. The paper initialises m = 0 and requires
v >= tau^2; we take v = tau^2 exactly, the smallest allowed value. tau bounds how large a step a
coordinate with a tiny update history can take (the "degree of adaptivity").

Defaults: beta1 = 0.9 and beta2 = 0.99 are the values the paper fixes in its experiments; eta = 1e-2
and tau = 1e-3 are Flower's FedYogi defaults. The paper tunes eta and tau per task, and so should we.

A tensor seen for the first time (an empty state at the start, or a layer that a method such as
AutoFedNLP adds mid-run) starts from m = 0, v = tau^2; tensors no longer exchanged are dropped.
Maths runs in float64; m and v are kept in at least float32.
"""

from __future__ import annotations

import torch

from fedpeft.algorithms.fedavg import State, check_same_keys

FEDOPT_KINDS = ("fedadagrad", "fedadam", "fedyogi")
DEFAULT_ETA = 1e-2
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.99
DEFAULT_TAU = 1e-3


def check_fedopt_hparams(kind: str, eta: float, beta1: float, beta2: float, tau: float) -> None:
    """Reject settings outside the paper's ranges before a run starts rather than mid-run."""
    if kind not in FEDOPT_KINDS:
        raise ValueError(f"unknown server optimiser {kind!r}; valid: {', '.join(FEDOPT_KINDS)}")
    if eta <= 0:
        raise ValueError(f"server learning rate eta must be > 0, got {eta}")
    if not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
        raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {beta1}, {beta2}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _second_moment(
    kind: str, v: torch.Tensor, delta_sq: torch.Tensor, beta2: float
) -> torch.Tensor:
    if kind == "fedadagrad":
        return v + delta_sq
    if kind == "fedadam":
        return beta2 * v + (1 - beta2) * delta_sq
    return v - (1 - beta2) * delta_sq * torch.sign(v - delta_sq)


def fedopt_step(
    global_state: State,
    averaged_state: State,
    opt_state: dict,
    kind: str,
    eta: float = DEFAULT_ETA,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    tau: float = DEFAULT_TAU,
) -> tuple[State, dict]:
    """One server step: returns (new global state, new {"m": State, "v": State}); inputs untouched.

    ``averaged_state`` is the FedAvg of this round's client states; ``opt_state`` may be empty.
    Non-float tensors are not optimised: they take the averaged state's value.
    """
    check_fedopt_hparams(kind, eta, beta1, beta2, tau)
    check_same_keys(global_state, averaged_state, "averaged state")
    old_m: State = opt_state.get("m", {})
    old_v: State = opt_state.get("v", {})

    new_global: State = {}
    new_m: State = {}
    new_v: State = {}
    for key, x in global_state.items():
        if not x.is_floating_point():
            new_global[key] = averaged_state[key].clone()
            continue
        keep_dtype = torch.promote_types(x.dtype, torch.float32)
        x64 = x.detach().to(torch.float64)
        delta = averaged_state[key].detach().to(x.device, torch.float64) - x64
        m = old_m[key].to(x.device, torch.float64) if key in old_m else torch.zeros_like(delta)
        v = (
            old_v[key].to(x.device, torch.float64)
            if key in old_v
            else torch.full_like(delta, tau**2)
        )

        m = beta1 * m + (1 - beta1) * delta
        v = _second_moment(kind, v, delta * delta, beta2)
        new_global[key] = (x64 + eta * m / (v.sqrt() + tau)).to(x.dtype)
        new_m[key] = m.to(keep_dtype)
        new_v[key] = v.to(keep_dtype)
    return new_global, {"m": new_m, "v": new_v}
