"""PEFT methods, one unit each with the same surface: ``Settings`` and ``inject(model, settings)``.

After ``inject`` exactly the method's tensors and the task head have ``requires_grad``; reading and
writing that trainable state is shared (``fedpeft.peft.base``). Adding a method touches this table.
"""

from __future__ import annotations

from types import ModuleType

from fedpeft.peft import adapter, bitfit, full, lora, prefix, prompt
from fedpeft.peft.base import (
    State,
    count_trainable,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_parameters,
    trainable_state,
)

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "bitfit": bitfit,
    "full": full,
}

SETTINGS = {
    "lora": lora.LoraSettings,
    "adapter": adapter.AdapterSettings,
    "prefix": prefix.PrefixSettings,
    "prompt": prompt.PromptSettings,
    "bitfit": bitfit.BitfitSettings,
    "full": full.FullSettings,
}

__all__ = [
    "METHODS",
    "SETTINGS",
    "State",
    "count_trainable",
    "load_trainable_state",
    "lowest_trainable_layer",
    "trainable_parameters",
    "trainable_state",
]
