"""Client-level differential privacy: DP-FedAvg with optional adaptive clipping, or local DP.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, https://arxiv.org/abs/1710.06963). With g the global state a client
received, w_k what it trained, C the clip norm, z the noise multiplier and n the updates averaged:

    d_k  = (w_k - g) * min(1, C / ||w_k - g||)        (all exchanged float tensors together)
    g'   = g + (1/n) sum_k d_k + N(0, (z C / n)^2)     per coordinate, seeded per round

Weights are uniform (a client's sample count would leak and would break the sensitivity bound of
C / n). Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021, https://arxiv.org/abs/1905.03871) tracks the
``target_quantile`` gamma of update norms: each client also reports b_k = [||w_k - g|| <= C],
the server noises the count with std sigma_b and updates

    C' = C * exp(-eta_C * (b_bar - gamma)),   b_bar = (sum_k b_k + N(0, sigma_b^2)) / n

and, so that both releases together cost what z alone costs, the update noise uses
z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (their Theorem 1). sigma_b defaults to the expected
clients per round / 20, the paper's choice (``dp.count_noise``).

Privacy accounting: the RDP accountant of Google's ``dp-accounting`` library, one Poisson-
subsampled Gaussian event of noise multiplier z per round at sampling rate q =
clients_per_round / num_clients. fedpeft samples a fixed number of clients without replacement;
treating it as Poisson sampling is the usual approximation (as in TensorFlow Federated).

Local DP (``dp.mode: local``) trusts no server. Each client randomises its own upload before it
leaves the device, with its own seeded noise:

    u_k  = g + (w_k - g) * min(1, C / ||w_k - g||) + N(0, (z C)^2)   per coordinate

and the server aggregates the noised uploads with the configured algorithm as if they were
ordinary ones (anything done to them afterwards is post-processing: robust rules, int8 and
sample-count weights change nothing of the guarantee, though the counts themselves travel
unprotected). What differs from the central mode above:

- who is trusted: central DP-FedAvg trusts the server with each clipped update and protects the
  released model; local DP protects every upload from the server itself;
- the noise: the mean of n uploads carries noise of std z C / sqrt(n), sqrt(n) times the
  central z C / n at the same z (and the same epsilon for one client), so local DP costs far
  more accuracy, the more so the fewer clients a round averages;
- the neighbouring relation: a local guarantee compares any two datasets of one client, whose
  clipped updates differ by up to 2 C, so one upload is a Gaussian mechanism of noise multiplier
  z / 2 (central DP-FedAvg adds or removes a whole client: sensitivity C / n on the mean);
- the accounting: no amplification by subsampling (the server knows whom it sampled); epsilon
  is per client, the composition of z / 2 Gaussian mechanisms over the rounds that client sent
  an upload, and a run reports the largest (``epsilon``: the client who took part most often).
  A round where some client could pass ``max_epsilon`` is not run.

Pure functions over ``{name: tensor}`` states, float64 arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.algorithms.fedavg import State

_DP_STREAM = 0x64702D66  # keeps the noise apart from every other seeded draw of a run


def update_of(received: State, trained: State) -> dict[str, torch.Tensor]:
    """trained - received over the floating tensors, in float64."""
    return {
        key: trained[key].detach().to(torch.float64) - ref.detach().to(torch.float64)
        for key, ref in received.items()
        if ref.is_floating_point()
    }


def global_norm(update: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in update.values()))


def clip(update: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """The update scaled by min(1, clip_norm / ||update||)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(update)
    if norm <= clip_norm:
        return dict(update)
    return {key: t * (clip_norm / norm) for key, t in update.items()}


def noise_std(noise_multiplier: float, clip_norm: float, num_updates: int) -> float:
    """The per-coordinate std of the noise added to the mean of ``num_updates`` clipped updates."""
    if num_updates < 1:
        raise ValueError("DP-FedAvg needs at least one update")
    return noise_multiplier * clip_norm / num_updates


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_delta of adaptive clipping: what is left for the update once the clipped count is noised
    with std ``count_std`` (Andrew et al., Theorem 1)."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"dp: noise_multiplier {noise_multiplier} is too large for adaptive clipping with "
            f"count noise {count_std} (needs 2 x count noise > noise_multiplier)"
        )
    return rest**-0.5


def next_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Geometric update of the clip norm towards the target quantile of update norms."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def round_generator(seed: int, rnd: int) -> torch.Generator:
    """The noise generator of round ``rnd``: depends only on (seed, round), so resume is exact."""
    value = int(np.random.SeedSequence([seed, _DP_STREAM, rnd]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


@dataclass(frozen=True)
class DPRound:
    """What one DP-FedAvg round did (it goes into the metrics row)."""

    clip_norm: float
    noise_std: float
    clipped_fraction: float  # share of updates whose norm exceeded clip_norm (not private)
    next_clip_norm: float


def dp_fedavg(
    global_state: State,
    client_states: Sequence[State],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    count_std: float | None = None,
) -> tuple[State, DPRound]:
    """The next global state from clipped, uniformly averaged and noised client updates.

    Keys the clients uploaded are aggregated (all of them hold the same keys); integer buffers
    keep the global value. Returns the new state and what the round did."""
    n = len(client_states)
    if n < 1:
        raise ValueError("DP-FedAvg needs at least one client state")
    keys = sorted(k for k in client_states[0] if k in global_state)  # decoded order varies
    anchor = {k: global_state[k] for k in keys}
    updates = [update_of(anchor, state) for state in client_states]
    norms = [global_norm(u) for u in updates]
    z = noise_multiplier
    if adaptive:
        count_std = n / 20 if count_std is None else count_std
        z = update_noise_multiplier(noise_multiplier, count_std)
    std = noise_std(z, clip_norm, n)
    clipped = [clip(u, clip_norm) for u in updates]
    new_state = dict(global_state)
    for key in sorted(updates[0]):  # a fixed order of noise draws
        mean = sum(c[key] for c in clipped) / n
        noise = torch.normal(0.0, 1.0, mean.shape, generator=generator, dtype=torch.float64)
        ref = global_state[key]
        new_state[key] = (ref.detach().to(torch.float64) + mean + std * noise).to(ref.dtype)
    unclipped = sum(norm <= clip_norm for norm in norms)
    next_norm = clip_norm
    if adaptive:
        noisy = unclipped + float(torch.normal(0.0, count_std, (1,), generator=generator))
        next_norm = next_clip_norm(clip_norm, noisy / n, target_quantile, clip_lr)
    return new_state, DPRound(clip_norm, std, 1 - unclipped / n, next_norm)


def client_generator(seed: int, rnd: int, cid: int) -> torch.Generator:
    """The local-DP noise generator of client ``cid`` in round ``rnd``."""
    value = int(np.random.SeedSequence([seed, _DP_STREAM, rnd, cid]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


def randomize_upload(
    received: State,
    trained: State,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[State, bool]:
    """Local DP: what a client uploads instead of ``trained``: the received state plus its update
    clipped to ``clip_norm`` and Gaussian noise of std noise_multiplier x clip_norm per coordinate.
    Tensors it did not receive and integer tensors travel unchanged. Returns (upload, clipped)."""
    anchor = {k: received[k] for k in trained if k in received}
    update = update_of(anchor, trained)
    clipped = clip(update, clip_norm)
    std = noise_multiplier * clip_norm
    upload = dict(trained)
    for key in sorted(clipped):  # a fixed order of noise draws
        noise = torch.normal(0.0, 1.0, clipped[key].shape, generator=generator, dtype=torch.float64)
        ref = received[key]
        value = ref.detach().to(torch.float64) + clipped[key] + std * noise
        upload[key] = value.to(trained[key].dtype)
    return upload, global_norm(update) > clip_norm


def local_epsilon(noise_multiplier: float, uploads: int, delta: float) -> float:
    """epsilon of one client after ``uploads`` locally randomised uploads: each a Gaussian
    mechanism of sensitivity 2 x clip_norm (any two datasets of the client), noise multiplier
    z / 2, no subsampling; by the RDP accountant of ``dp-accounting``; inf without noise."""
    if uploads == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier / 2), uploads)
    return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """epsilon after ``rounds`` Poisson-subsampled Gaussian rounds, by the RDP accountant of
    ``dp-accounting``; inf without noise."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(
        sampling_rate, dp_event.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class DPPlan:
    """DP-FedAvg as a run configures it (built by ``fedpeft.job``)."""

    noise_multiplier: float
    clip_norm: float
    adaptive: bool
    target_quantile: float
    clip_lr: float
    count_noise: float  # std of the noise on the count of unclipped updates (adaptive)
    delta: float
    max_epsilon: float | None
    sampling_rate: float
    seed: int
    mode: str = "central"  # or "local": each client randomises its own upload

    @property
    def local(self) -> bool:
        return self.mode == "local"

    def epsilon_after(self, rounds: int) -> float:
        """Central mode: epsilon after ``rounds`` rounds."""
        return epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta)

    def local_epsilon_after(self, uploads: int) -> float:
        """Local mode: one client's epsilon after ``uploads`` randomised uploads."""
        return local_epsilon(self.noise_multiplier, uploads, self.delta)

    def randomize(self, received: State, trained: State, rnd: int, cid: int) -> tuple[State, bool]:
        """Local mode: client ``cid``'s randomised upload of round ``rnd`` and whether it clipped."""
        return randomize_upload(
            received,
            trained,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            generator=client_generator(self.seed, rnd, cid),
        )
