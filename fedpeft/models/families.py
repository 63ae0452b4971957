"""Model families: where each architecture keeps the parts fedpeft reaches into.

Adapter sites, LoRA targets, the layers an activation cache skips, the task head that always
trains and the sizes the cost model counts all come from the model's ``Family`` instead of a
BERT layout written into the code. Adding an architecture is one ``Family(...)`` entry in
``FAMILIES`` (plus its tests). Module paths are attribute paths from the task model
(``BertForSequenceClassification``, ``LlamaForSequenceClassification``, ...); the two adapter
sites are paths inside one transformer layer: the attention block's and the feed-forward block's
output projection, whose output is added to the residual stream (post-LN encoders normalise it
right after, pre-LN decoders add it as is).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class TinySpec:
    """The sizes of the small randomly initialised models used by tests and quick checks."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    kv_heads: int = 1  # key/value heads of decoders with grouped-query attention


@dataclass(frozen=True)
class Family:
    """One architecture's layout; see the module docstring."""

    name: str
    model_types: tuple[str, ...]  # ``config.model_type`` values this entry covers
    backbone: str  # the base model inside the task model
    layers: str  # the ModuleList of transformer layers
    embeddings: tuple[str, ...]  # modules before layer 0; the last one's output enters layer 0
    final_norm: str | None  # the norm after the last layer (pre-LN decoders)
    attention_output: str  # in a layer: the attention block's output projection
    ffn_output: str  # in a layer: the feed-forward block's output projection
    head: tuple[str, ...]  # the task head's modules: they always train
    lora_targets: tuple[str, ...]  # default LoRA target modules (the query/value projections)
    pooling: str  # default pooling: "mean" (sentence encoders) or "last" (decoders)
    tiny: Callable[[TinySpec, int, int, int], PretrainedConfig]  # (spec, vocab, pad id, labels)
    intermediate_size: Callable[[Any], int] = lambda config: config.intermediate_size
    pooler: str | None = None  # a [CLS] pooler module that mean/last pooling replaces
    decoder: bool = False  # causal attention
    token_types: bool = False  # the model reads token_type_ids (else they are dropped)
    prefix_tuning: bool = True  # attention takes past key/values (peft's prefix-tuning)
    gated_mlp: bool = False  # the feed-forward block has a gate projection (3 matrices)
    head_dense: bool = True  # the head has an h x h layer before the classifier

    def task_layers(self, task: nn.Module) -> nn.ModuleList:
        return task.get_submodule(self.layers)

    def embedding_modules(self, task: nn.Module) -> list[nn.Module]:
        return [task.get_submodule(path) for path in self.embeddings]

    def site(self, layer: nn.Module, which: str) -> tuple[nn.Module, str]:
        """(parent module, attribute) of a layer's ``attention`` or ``ffn`` output projection."""
        path = {"attention": self.attention_output, "ffn": self.ffn_output}[which]
        parent, _, attr = path.rpartition(".")
        return (layer.get_submodule(parent) if parent else layer), attr


def _bert(spec: TinySpec, vocab: int, pad: int, labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=512,
        pad_token_id=pad,
        num_labels=labels,
    )


def _roberta(spec: TinySpec, vocab: int, pad: int, labels: int):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=514 + pad,  # positions start after the padding index
        pad_token_id=pad,
        type_vocab_size=1,
        num_labels=labels,
    )


def _distilbert(spec: TinySpec, vocab: int, pad: int, labels: int):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=vocab,
        dim=spec.hidden,
        n_layers=spec.layers,
        n_heads=spec.heads,
        hidden_dim=spec.intermediate,
        max_position_embeddings=512,
        pad_token_id=pad,
        num_labels=labels,
    )


def _gpt2(spec: TinySpec, vocab: int, pad: int, labels: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_embd=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        n_inner=spec.intermediate,
        n_positions=512,
        pad_token_id=pad,
        bos_token_id=None,
        eos_token_id=None,
        num_labels=labels,
    )


def _llama(spec: TinySpec, vocab: int, pad: int, labels: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=512,
        pad_token_id=pad,
        num_labels=labels,
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=("bert",),
        backbone="bert",
        layers="bert.encoder.layer",
        embeddings=("bert.embeddings",),
        final_norm=None,
        attention_output="attention.output.dense",
        ffn_output="output.dense",
        head=("classifier",),
        lora_targets=("query", "value"),
        pooling="mean",
        pooler="bert.pooler",
        token_types=True,
        tiny=_bert,
    ),
    Family(
        name="roberta",
        model_types=("roberta",),
        backbone="roberta",
        layers="roberta.encoder.layer",
        embeddings=("roberta.embeddings",),
        final_norm=None,
        attention_output="attention.output.dense",
        ffn_output="output.dense",
        head=("classifier",),  # dense + out_proj on the pooled token
        lora_targets=("query", "value"),
        pooling="mean",
        tiny=_roberta,
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        backbone="distilbert",
        layers="distilbert.transformer.layer",
        embeddings=("distilbert.embeddings",),
        final_norm=None,
        attention_output="attention.out_lin",
        ffn_output="ffn.lin2",
        head=("pre_classifier", "classifier"),
        lora_targets=("q_lin", "v_lin"),
        pooling="mean",
        prefix_tuning=False,  # its attention takes no past key/values
        intermediate_size=lambda config: config.hidden_dim,
        tiny=_distilbert,
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        backbone="transformer",
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe", "transformer.drop"),
        final_norm="transformer.ln_f",
        attention_output="attn.c_proj",
        ffn_output="mlp.c_proj",
        head=("score",),
        lora_targets=("c_attn",),  # fused query/key/value projection
        pooling="last",
        decoder=True,
        head_dense=False,
        intermediate_size=lambda config: config.n_inner or 4 * config.n_embd,
        tiny=_gpt2,
    ),
    Family(
        name="llama",  # also Qwen2 and Mistral: the same layout
        model_types=("llama", "qwen2", "mistral"),
        backbone="model",
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        attention_output="self_attn.o_proj",
        ffn_output="mlp.down_proj",
        head=("score",),
        lora_targets=("q_proj", "v_proj"),
        pooling="last",
        decoder=True,
        gated_mlp=True,
        head_dense=False,
        tiny=_llama,
    ),
)

TINY_PREFIX = "tiny"  # ``tiny`` is the tiny BERT, ``tiny-<family>`` any other family's


class UnsupportedModel(ValueError):
    """A model of an architecture no family describes."""


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModel(f"unknown model family '{name}'; supported: {supported()}")


def family_for_config(config: Any) -> Family:
    """The family of a transformers config, or one line naming the supported families."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModel(
        f"model type '{model_type}' is not supported; supported families: {supported()}"
    )


def task_model(model: nn.Module) -> tuple[Family, nn.Module]:
    """(family, the transformers task model) of ``model``, also inside a peft wrapper."""
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):  # a peft wrapper forwards attributes
            continue
        try:
            family = family_for_config(module.config)
        except UnsupportedModel:
            continue
        if isinstance(getattr(module, family.backbone, None), nn.Module):
            return family, module
    raise UnsupportedModel(f"model is not a supported task model; supported: {supported()}")


def family_of(model: nn.Module) -> Family:
    return task_model(model)[0]


def layers_of(model: nn.Module) -> nn.ModuleList:
    family, task = task_model(model)
    return family.task_layers(task)


def out_features(module: nn.Module) -> int:
    """Output width of a projection: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight [in, out])."""
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.nf)


_LAYER_LISTS = sorted({f.layers.rpartition(".")[2] for f in FAMILIES})
_LAYER_INDEX = re.compile(rf"(?:^|\.)(?:{'|'.join(map(re.escape, _LAYER_LISTS))})\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer index in a parameter name (None for embeddings, head, others)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def head_prefixes() -> tuple[str, ...]:
    """Name prefixes of every family's task head (``classifier.``, ``score.``, ...)."""
    return tuple(sorted({f"{module}." for f in FAMILIES for module in f.head}))
