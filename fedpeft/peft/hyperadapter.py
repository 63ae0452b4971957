"""C2A adapters (Kim et al., "Client-Customized Adaptation for Parameter-Efficient Federated
Learning", Findings of ACL 2023): adapter weights generated per batch by one small hypernetwork.

Every chosen layer gets Houlsby-placed adapters, on the attention output and on the feed-forward
output, each applied to the dense sub-layer's output before its residual LayerNorm::

    adapter(x) = x + scale * GELU(x W1 + b1) W2 + b2        (no dropout; scale = 1 in the paper)

W1 [d x r] and W2 [r x d] are not parameters: one hypernetwork, shared by all layers and both
sites, generates them for every forward from a condition vector e (dimension 8)::

    e = label_emb(label distribution) + context_emb(context) + layer_emb(layer index)
    B = (lower [8r x c] @ higher [c x d]).view(8, d*r) + bias [1, d*r];  each row of B L2-normalised
    a = e @ B   [d*r];   W1 = a.view(d, r),   W2 = a.view(r, d)   (a reshape: the two are tied)

The context is the batch mean of the L2-normalised token mean of the hidden state entering the
adapter (padding excluded unless ``context_padding='unmasked'``, the reference's behaviour). The
label distribution is set per batch by the seed system (``set_condition``); the attention mask is
taken from the model's own forward call, so it can never be stale. b1 [r] and b2 [d] are learned
directly, shared by all layers and sites. Trainable: the hypernetwork and the task head.

The row normalisation means a fresh adapter is not the identity (the generated weights have norm
about |e|); ``scale`` shrinks the generated branch (``docs/c2a.md`` reports what it changes).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.models.families import Family, family_of
from fedpeft.peft.base import encoder_layers, freeze_all, resolve_layers, unfreeze_head

HYPERNETWORK = "c2a"  # attribute of the model holding the hypernetwork (its parameters' prefix)


class C2ASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="rank of the generated adapters (bottleneck size)")
    inner_dim: int = Field(32, ge=1, description="c: inner dimension of the factorised generator")
    cond_dim: int = Field(8, ge=1, description="dimension of the condition vector e")
    label_input: Literal["batch", "client"] = Field(
        "batch",
        description="label distribution fed to the hypernetwork in training: the batch's "
        "normalised label histogram (the paper) or the client's own training label histogram",
    )
    sites: Literal["attention", "ffn", "both"] = Field(
        "both", description="adapter sites per layer: attention output, FFN output, or both"
    )
    layers: list[int] | None = Field(None, description="layer indices with adapters (all)")
    context_padding: Literal["masked", "unmasked"] = Field(
        "masked",
        description="masked: the token mean ignores padding; unmasked: averages padding too "
        "(the reference code)",
    )
    init_std: float = Field(0.01, gt=0, description="std of the generator factors lower/higher")
    scale: float = Field(
        1.0,
        ge=0,
        description="multiplier on the generated branch GELU(x W1 + b1) W2; 1 = the paper, "
        "smaller starts closer to the identity",
    )


class HyperNetwork(nn.Module):
    """Generates (W1, W2) for one adapter site from the current batch's condition."""

    def __init__(
        self, hidden: int, num_labels: int, num_layers: int, settings: C2ASettings
    ) -> None:
        super().__init__()
        r, c, k = settings.r, settings.inner_dim, settings.cond_dim
        self.hidden, self.r, self.cond_dim = hidden, r, k
        self.masked = settings.context_padding == "masked"
        self.scale = settings.scale
        self.num_labels = num_labels
        self.label_emb = nn.Linear(num_labels, k)
        self.context_emb = nn.Linear(hidden, k)
        self.layer_emb = nn.Embedding(num_layers, k)
        self.lower = nn.Parameter(torch.randn(k * r, c) * settings.init_std)
        self.higher = nn.Parameter(torch.randn(c, hidden) * settings.init_std)
        self.bias = nn.Parameter(torch.zeros(1, hidden * r))
        self.b1 = nn.Parameter(torch.zeros(r))
        self.b2 = nn.Parameter(torch.zeros(hidden))
        # The current batch's condition: not parameters, never saved.
        self.label_dist: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def basis(self) -> torch.Tensor:
        """B [cond_dim, d*r], rows L2-normalised (a zero row stays zero)."""
        rows = (self.lower @ self.higher).view(self.cond_dim, -1) + self.bias
        return F.normalize(rows, dim=1)

    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """Batch mean of the L2-normalised token mean of ``hidden`` [batch, tokens, d] -> [d]."""
        mask = self.attention_mask
        if self.masked and mask is not None and mask.shape == hidden.shape[:2]:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            token_mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            token_mean = hidden.mean(1)
        return F.normalize(token_mean, dim=-1).mean(0)

    def condition(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """e [cond_dim] for one site."""
        dist = self.label_dist
        if dist is None:
            dist = torch.full((self.num_labels,), 1.0 / self.num_labels)
        dist = dist.to(device=hidden.device, dtype=hidden.dtype)
        index = torch.tensor(layer, device=hidden.device)
        return self.label_emb(dist) + self.context_emb(self.context(hidden)) + self.layer_emb(index)

    def generate(self, hidden: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [d, r], W2 [r, d]) for the site whose adapter input is ``hidden``; W1, W2 share values."""
        a = self.condition(hidden, layer) @ self.basis()
        return a.view(self.hidden, self.r), a.view(self.r, self.hidden)

    def adapt(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        w1, w2 = self.generate(hidden, layer)
        return hidden + self.scale * (F.gelu(hidden @ w1 + self.b1) @ w2) + self.b2


class HyperAdaptedLinear(nn.Module):
    """A frozen sub-layer output projection followed by the generated adapter of its layer."""

    def __init__(self, linear: nn.Linear, hypernetwork: HyperNetwork, layer: int) -> None:
        super().__init__()
        self.linear = linear
        self.layer = layer
        self._hypernetwork = (hypernetwork,)  # a tuple: shared, registered once on the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hypernetwork[0].adapt(self.linear(x), self.layer)


def _site_modules(family: Family, layer: nn.Module, sites: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the sub-layer output projections that get an adapter."""
    which = ["attention", "ffn"] if sites == "both" else [sites]
    return [family.site(layer, site) for site in which]


def _remember_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the call's attention mask is the one the contexts use (None: no padding).

    A plain function reading the model's own hypernetwork, so a deep copy of the model stays
    self-contained.
    """
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    getattr(model, HYPERNETWORK).attention_mask = mask


def inject(model: nn.Module, settings: C2ASettings) -> nn.Module:
    """Freeze the model, add the hypernetwork and wrap the chosen sites; head + hypernetwork train."""
    if isinstance(getattr(model, HYPERNETWORK, None), HyperNetwork):
        raise ValueError("model already has C2A adapters")
    layers = encoder_layers(model)
    chosen = resolve_layers(settings.layers, None, len(layers))
    freeze_all(model)
    hidden = model.config.hidden_size
    hypernetwork = HyperNetwork(hidden, model.config.num_labels, len(layers), settings)
    setattr(model, HYPERNETWORK, hypernetwork)
    family = family_of(model)
    for index in chosen:
        for parent, attr in _site_modules(family, layers[index], settings.sites):
            setattr(parent, attr, HyperAdaptedLinear(getattr(parent, attr), hypernetwork, index))
    model.register_forward_pre_hook(_remember_mask, with_kwargs=True)
    hypernetwork.requires_grad_(True)
    unfreeze_head(model)
    return model


def hypernetwork_of(model: nn.Module) -> HyperNetwork:
    found = getattr(model, HYPERNETWORK, None)
    if not isinstance(found, HyperNetwork):
        raise ValueError("model has no C2A hypernetwork (inject it first)")
    return found


def set_condition(model: nn.Module, label_dist: torch.Tensor | None) -> None:
    """The label distribution [num_labels] for the next forwards; None = uniform (evaluation)."""
    hypernetwork = hypernetwork_of(model)
    if label_dist is not None:
        label_dist = torch.as_tensor(label_dist, dtype=torch.float32)
        if label_dist.shape != (hypernetwork.num_labels,):
            raise ValueError(
                f"label distribution has shape {tuple(label_dist.shape)}, "
                f"expected ({hypernetwork.num_labels},)"
            )
    hypernetwork.label_dist = label_dist


def label_distribution(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The normalised label histogram of a batch (or of a client's rows)."""
    counts = torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_labels)
    return counts.float() / counts.sum().clamp(min=1)


def num_sites(settings: C2ASettings, num_layers: int) -> int:
    per_layer = 2 if settings.sites == "both" else 1
    return per_layer * len(resolve_layers(settings.layers, None, num_layers))


def generation_flops(
    settings: C2ASettings,
    *,
    hidden: int,
    num_labels: int,
    num_layers: int,
    batch_size: int,
    seq_len: float,
    training: bool,
) -> float:
    """FLOPs the C2A adapters add to one batch, beyond what the generic cost model counts.

    Per site and batch, generation: B = lower @ higher (2 * k r * c * d), its row norms (3 k d r),
    the context (token mean and row norms, 4 * batch * seq * d), the three embeddings
    (2 k (labels + d)) and a = e @ B (2 k d r). Per site and token, application: x W1 and h W2
    (2 * 2 d r). Training adds the backward pass, counted as twice the forward (activation and
    weight gradients). The generic model charges 2 * trainable * seq for weight gradients, a loose
    stand-in here because the hypernetwork's parameters do not act per token.
    """
    d, r, c, k = hidden, settings.r, settings.inner_dim, settings.cond_dim
    generate = 2 * k * r * c * d + 3 * k * d * r + 2 * k * (num_labels + d) + 2 * k * d * r
    context = 4 * batch_size * seq_len * d
    apply = 2 * 2 * d * r * batch_size * seq_len
    forward = num_sites(settings, num_layers) * (generate + context + apply)
    return float(forward * (3 if training else 1))
