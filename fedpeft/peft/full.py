"""Full fine-tuning: the baseline every PEFT method is measured against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.peft.base import encoder_layers, freeze_all, resolve_layers, unfreeze_head
from fedpeft.registry import MethodSpec


class FullSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int | None = Field(
        None,
        ge=0,
        description="layer freezing: train only the top `depth` layers (default: all + embeddings)",
    )


def inject(model: nn.Module, settings: FullSettings) -> nn.Module:
    if settings.depth is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    layers = encoder_layers(model)
    freeze_all(model)
    for index in resolve_layers(None, settings.depth, len(layers)):
        for p in layers[index].parameters():
            p.requires_grad_(True)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="full",
    summary="full fine-tuning (or layer freezing with depth): the baseline",
    settings=FullSettings,
    inject=lambda model, config: inject(model, config.full),
    default_lr=0.0005,  # the FedPETuning study's validation-only lr selection
)
