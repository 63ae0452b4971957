"""PEFT units, one file each with the same surface: a settings class, ``inject(model, settings)``
and a ``SPEC`` that registers it (``fedpeft.registry``).

After ``inject`` exactly the method's tensors and the task head have ``requires_grad``; reading and
writing that trainable state is shared (``fedpeft.peft.base``). Adding a unit is one new file here.
"""

from __future__ import annotations

from fedpeft.peft.base import (
    State,
    count_trainable,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_parameters,
    trainable_state,
)

__all__ = [
    "State",
    "count_trainable",
    "load_trainable_state",
    "lowest_trainable_layer",
    "trainable_parameters",
    "trainable_state",
]
