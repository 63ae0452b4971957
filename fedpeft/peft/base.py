"""The surface every PEFT method shares: which tensors train, and how they are read and written.

A method's trainable state is exactly the parameters with ``requires_grad`` set after injection
(the PEFT module's tensors plus the task head). That state is what a client trains, what travels
to the server, and what the embedded engine swaps in and out of the one resident backbone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedpeft.models.families import head_prefixes, layer_index, layers_of

State = dict[str, torch.Tensor]

HEAD_PREFIXES = head_prefixes()  # every family's task head: classifier., score., ...


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter that trains, in a stable order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module) -> State:
    """A detached copy of the trainable tensors (what a client would upload)."""
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def load_trainable_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Write ``state`` into the model's trainable parameters.

    ``strict``: keys must match exactly; otherwise ``state`` may cover a subset (a client keeps the
    rest locally). Shapes must always match.
    """
    params = trainable_parameters(model)
    missing = params.keys() - state.keys() if strict else set()
    extra = state.keys() - params.keys()
    if missing or extra:
        name = sorted(missing or extra)[0]
        kind = "missing" if missing else "unexpected"
        raise ValueError(f"trainable state does not fit the model: {kind} tensor '{name}'")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if value.shape != p.shape:
                raise ValueError(
                    f"trainable state does not fit the model: '{name}' has shape "
                    f"{tuple(value.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(value)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module) -> None:
    """The task head always trains (inside a peft wrapper: its trainable copy, not the original)."""
    for name, p in model.named_parameters():
        if _is_head(name):
            p.requires_grad_(True)


def _is_head(name: str) -> bool:
    if "original_module" in name:
        return False
    return any(name.startswith(prefix) or f".{prefix}" in name for prefix in HEAD_PREFIXES)


def lowest_trainable_layer(model: nn.Module, num_layers: int) -> int:
    """Index of the lowest transformer layer with trainable tensors (``num_layers`` = head only).

    Trainable embeddings or prompt/prefix encoders count as layer 0: gradients flow to the input.
    Backward work, and what an activation cache may skip, both follow from this number.
    """
    lowest = num_layers
    for name in trainable_parameters(model):
        if _is_head(name):
            continue
        index = layer_index(name)
        lowest = min(lowest, index if index is not None else 0)
    return lowest


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of the model's family (also inside a peft wrapper)."""
    return layers_of(model)


def model_sizes(model: nn.Module) -> dict[str, int]:
    """Layers, width and heads for peft's prompt-learning configs (read through the config's
    standard names, which peft does not find in every family's config, DistilBERT's say)."""
    config = model.config
    return {
        "num_layers": config.num_hidden_layers,
        "token_dim": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
    }


def resolve_layers(layers: list[int] | None, top: int | None, num_layers: int) -> list[int]:
    """Which layer indices a method touches: an explicit list, the top ``top`` layers, or all."""
    if layers is not None and top is not None:
        raise ValueError("give either 'layers' or 'depth', not both")
    if top is not None:
        if not 0 <= top <= num_layers:
            raise ValueError(f"depth {top} is outside 0..{num_layers}")
        return list(range(num_layers - top, num_layers))
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist (model has {num_layers} layers)")
    return sorted(set(layers))


def embedding_parameters(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def count_trainable_per_token(model: nn.Module) -> tuple[int, bool]:
    """(trainable parameters that act on every token, whether any embedding table trains).

    Embedding tables (word/position embeddings, prompt and prefix tables) are excluded: their
    gradient is a cheap row update, not a matmul. The cost model needs exactly this split.
    """
    tables = embedding_parameters(model)
    per_token = sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in tables
    )
    embeddings = any(p.requires_grad for p in model.parameters() if id(p) in tables)
    return per_token, embeddings
