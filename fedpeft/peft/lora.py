"""LoRA (Hu et al., 2022) through HF peft: low-rank updates B·A beside chosen linear layers."""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.models.families import family_of
from fedpeft.peft.base import encoder_layers, freeze_all, resolve_layers, unfreeze_head
from fedpeft.registry import MethodSpec


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(
        16.0, gt=0, description="scaling numerator: the update is scaled by alpha/r"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        None,
        description="names of the linear layers to adapt (default: the model family's "
        "query/value projections, e.g. query+value for BERT, q_proj+v_proj for LLaMA)",
    )
    layers: list[int] | None = Field(None, description="layer indices to adapt (default: all)")
    depth: int | None = Field(None, ge=0, description="adapt only the top `depth` layers")


def inject(model: nn.Module, settings: LoraSettings) -> nn.Module:
    num_layers = len(encoder_layers(model))
    layers = resolve_layers(settings.layers, settings.depth, num_layers)
    freeze_all(model)
    if layers:
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules or family_of(model).lora_targets),
            layers_to_transform=layers,
        )
        model = inject_adapter_in_model(config, model)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="lora",
    summary="LoRA (Hu et al., 2022): low-rank updates beside the query/value projections",
    settings=LoraSettings,
    inject=lambda model, config: inject(model, config.lora),
    default_lr=0.01,  # the FedPETuning study's validation-only lr selection
)
