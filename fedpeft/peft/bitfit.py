"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the backbone, plus the head."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.peft.base import encoder_layers, freeze_all, resolve_layers, unfreeze_head
from fedpeft.registry import MethodSpec


class BitfitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="layers whose biases train (default: all)")
    depth: int | None = Field(None, ge=0, description="train biases of the top `depth` layers only")
    include_embeddings: bool = Field(False, description="also train embedding LayerNorm bias")


def inject(model: nn.Module, settings: BitfitSettings) -> nn.Module:
    layers = encoder_layers(model)
    chosen = resolve_layers(settings.layers, settings.depth, len(layers))
    freeze_all(model)
    for index in chosen:
        for name, p in layers[index].named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    if settings.include_embeddings:
        for name, p in model.named_parameters():
            if "embeddings" in name and name.endswith("bias"):
                p.requires_grad_(True)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="bitfit",
    summary="BitFit (Ben Zaken et al., 2022): only the backbone's bias terms train",
    settings=BitfitSettings,
    inject=lambda model, config: inject(model, config.bitfit),
    default_lr=0.005,  # the FedPETuning study's validation-only lr selection
)
