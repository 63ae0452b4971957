"""Backbones: loading (``loading``), the model families fedpeft knows (``families``: where each
architecture keeps its layers, adapter sites, embeddings, norm and head) and pooling."""

from __future__ import annotations

from fedpeft.models.families import (
    FAMILIES,
    Family,
    TinySpec,
    UnsupportedModel,
    family_of,
    layers_of,
    task_model,
)
from fedpeft.models.loading import (
    ModelError,
    check_model_spec,
    load_model,
    load_tokenizer,
    minilm_path,
    tiny_family,
)
from fedpeft.models.pooling import TOKEN_POOLERS, LastTokenPooler, MaskedMeanPooler

__all__ = [
    "FAMILIES",
    "TOKEN_POOLERS",
    "Family",
    "LastTokenPooler",
    "MaskedMeanPooler",
    "ModelError",
    "TinySpec",
    "UnsupportedModel",
    "check_model_spec",
    "family_of",
    "layers_of",
    "load_model",
    "load_tokenizer",
    "minilm_path",
    "task_model",
    "tiny_family",
]
