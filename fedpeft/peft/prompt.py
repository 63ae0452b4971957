"""Prompt-tuning (Lester et al., 2021) through HF peft: trained input embeddings before the text."""

from __future__ import annotations

from peft import PromptTuningConfig, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.peft.base import model_sizes, unfreeze_head
from fedpeft.registry import MethodSpec


class PromptSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, description="number of soft prompt tokens")


def inject(model: nn.Module, settings: PromptSettings) -> nn.Module:
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=settings.num_virtual_tokens,
        **model_sizes(model),
    )
    model = get_peft_model(model, config)
    unfreeze_head(model)
    return model


SPEC = MethodSpec(
    name="prompt",
    summary="prompt-tuning (Lester et al., 2021): trained soft tokens before the text",
    settings=PromptSettings,
    inject=lambda model, config: inject(model, config.prompt),
    default_lr=0.05,  # the FedPETuning study's validation-only lr selection
    extra_tokens=lambda s: s.num_virtual_tokens,
)
