"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), written here.

An adapter is ``x + up(act(down(x)))`` applied to a sub-layer's output projection before the
residual add (and, in post-LN encoders, its LayerNorm); the model's family says where that is. ``pfeiffer`` places one after the feed-forward block of each chosen layer; ``houlsby``
also places one after the attention block. *Depth* d puts adapters in the top d layers only (all
layers below stay frozen, which is what lets a client cache their activations); *width* is the
bottleneck size. The up-projection starts at zero, so a fresh adapter is the identity and adding
layers or bottleneck units mid-training leaves the model's output unchanged (AutoFedNLP upgrades).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.models.families import Family, family_of, out_features
from fedpeft.peft.base import encoder_layers, freeze_all, resolve_layers, unfreeze_head
from fedpeft.registry import MethodSpec

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class AdapterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(64, ge=1, description="bottleneck size")
    depth: int | None = Field(None, ge=0, description="adapters in the top `depth` layers only")
    layers: list[int] | None = Field(None, description="explicit layer indices (instead of depth)")
    placement: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer",
        description="pfeiffer: after the FFN; houlsby: after attention and after the FFN",
    )
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="bottleneck activation")
    init_std: float = Field(1e-2, gt=0, description="std of the down-projection's initial weights")


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))`` with a zero-initialised up-projection."""

    def __init__(self, hidden: int, width: int, activation: str = "relu", init_std: float = 1e-2):
        super().__init__()
        self.init_std = init_std
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        self.act = _ACTIVATIONS[activation]()
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def width(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    @torch.no_grad()
    def grow(self, new_width: int) -> None:
        """Add bottleneck units; the new up-projection columns are zero, so outputs do not change."""
        old = self.width
        if new_width < old:
            raise ValueError(f"adapter width can only grow ({old} -> {new_width})")
        if new_width == old:
            return
        hidden = self.down.in_features
        down, up = nn.Linear(hidden, new_width), nn.Linear(new_width, hidden)
        nn.init.normal_(down.weight, std=self.init_std)
        down.weight[:old] = self.down.weight
        down.bias.zero_()
        down.bias[:old] = self.down.bias
        up.weight.zero_()
        up.weight[:, :old] = self.up.weight
        up.bias.copy_(self.up.bias)
        requires_grad = self.down.weight.requires_grad
        self.down, self.up = down, up
        for p in self.parameters():
            p.requires_grad_(requires_grad)


class AdaptedLinear(nn.Module):
    """A frozen sub-layer output projection (a linear map) followed by an adapter."""

    def __init__(self, linear: nn.Linear, adapter: Bottleneck):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


def _sites(family: Family, layer: nn.Module, placement: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the sub-layer output projections that get an adapter."""
    which = ["attention", "ffn"] if placement == "houlsby" else ["ffn"]
    return [family.site(layer, site) for site in which]


def add_adapters(model: nn.Module, layer_indices: list[int], settings: AdapterSettings) -> None:
    """Put trainable adapters into the given layers (skipping any that already have one)."""
    family = family_of(model)
    layers = encoder_layers(model)
    for index in layer_indices:
        for parent, attr in _sites(family, layers[index], settings.placement):
            projection = getattr(parent, attr)
            if isinstance(projection, AdaptedLinear):
                continue
            hidden = out_features(projection)
            adapter = Bottleneck(hidden, settings.width, settings.activation, settings.init_std)
            setattr(parent, attr, AdaptedLinear(projection, adapter))


def adapters(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def grow_width(model: nn.Module, new_width: int) -> None:
    """Widen every adapter in the model to ``new_width`` bottleneck units (output unchanged)."""
    for adapter in adapters(model):
        adapter.grow(new_width)


def set_layout(model: nn.Module, depth: int, width: int, settings: AdapterSettings) -> None:
    """Make the model carry adapters of ``width`` in exactly its top ``depth`` layers.

    Adapters in kept layers keep their weights (grown if narrower, re-made if wider); adapters
    below are removed, restoring the original frozen sub-layer, so the frozen bottom is the
    pristine backbone again. Afterwards exactly the adapters and the head train. AutoFedNLP uses
    this to move the one resident model between candidate configurations; the caller then loads
    the candidate's trainable state.
    """
    family = family_of(model)
    layers = encoder_layers(model)
    keep = set(resolve_layers(None, depth, len(layers)))
    for index, layer in enumerate(layers):
        for parent, attr in _sites(family, layer, "houlsby"):
            adapted = getattr(parent, attr)
            if not isinstance(adapted, AdaptedLinear):
                continue
            if index not in keep:
                setattr(parent, attr, adapted.linear)
            elif adapted.adapter.width > width:
                hidden = out_features(adapted.linear)
                adapted.adapter = Bottleneck(hidden, width, settings.activation, settings.init_std)
            else:
                adapted.adapter.grow(width)
    add_adapters(model, sorted(keep), settings.model_copy(update={"width": width}))
    freeze_all(model)
    for adapter in adapters(model):
        adapter.requires_grad_(True)
    unfreeze_head(model)


def inject(model: nn.Module, settings: AdapterSettings) -> nn.Module:
    num_layers = len(encoder_layers(model))
    chosen = resolve_layers(settings.layers, settings.depth, num_layers)
    freeze_all(model)
    add_adapters(model, chosen, settings)
    for adapter in adapters(model):
        adapter.requires_grad_(True)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="adapter",
    summary="bottleneck adapters (Houlsby/Pfeiffer) after sub-layer outputs, any depth and width",
    settings=AdapterSettings,
    inject=lambda model, config: inject(model, config.adapter),
    default_lr=0.01,  # the FedPETuning study's validation-only lr selection
)
