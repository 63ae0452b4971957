"""Prefix-tuning (Li & Liang, 2021) through HF peft: trained key/value vectors in every layer."""

from __future__ import annotations

from peft import PrefixTuningConfig, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.models import ModelError, family_of
from fedpeft.peft.base import model_sizes, unfreeze_head
from fedpeft.registry import MethodSpec


class PrefixSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, description="prefix length")
    projection: bool = Field(
        False, description="reparameterise the prefix through an MLP (more parameters to send)"
    )
    hidden_size: int = Field(128, ge=1, description="MLP width when projection is on")


def inject(model: nn.Module, settings: PrefixSettings) -> nn.Module:
    family = family_of(model)
    if not family.prefix_tuning:
        raise ModelError(
            f"prefix-tuning needs attention that takes past keys/values; {family.name}'s does not"
        )
    config = PrefixTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.projection,
        encoder_hidden_size=settings.hidden_size,
        **model_sizes(model),
    )
    model = get_peft_model(model, config)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="prefix",
    summary="prefix-tuning (Li & Liang, 2021): trained key/value vectors in every layer",
    settings=PrefixSettings,
    inject=lambda model, config: inject(model, config.prefix),
    default_lr=0.01,  # the FedPETuning study's validation-only lr selection
    extra_kv=lambda s: s.num_virtual_tokens,
)
