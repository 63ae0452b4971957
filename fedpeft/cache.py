"""Activation cache: run a model's frozen bottom layers once per sample, then train only the top.

When every layer below layer ``k`` is frozen (layer freezing, top-``d`` adapters or LoRA, head-only
training), the hidden states entering layer ``k`` are a fixed function of the input. A client that
trains on the same samples for several epochs or rounds can therefore compute them once, with the
frozen bottom in eval mode (no dropout), and feed them straight into layers ``k..L-1``, the pooler
and the classifier. AutoFedNLP (Cai et al., MobiCom 2023) proposed this and only modelled its
savings; here it is real.

Layout and validity
- One store per start layer ``k``, each holding, per training row, the hidden states of its real
  tokens (``[len_i, hidden]``, padding dropped; batches are re-padded with zeros, which attention and
  the masked mean pooler ignore). Several stores can live side by side, so AutoFedNLP's shallow and
  deep candidates, which start at different layers, do not evict each other.
- A store is keyed by ``k`` and by a fingerprint of the bottom: the identity and in-place version
  counter of every parameter (and the identity of every module) in the embeddings and layers
  ``0..k-1``. Any change there (a depth change moves ``k``; an adapter added below ``k``; an
  in-place write into a frozen weight) gives a new fingerprint and the old store is dropped before
  it could be served. Width changes only touch layers ``>= k`` and leave the store valid.
- In the embedded engine the frozen bottom is the same for every client, so one cache serves all
  clients; each row belongs to one client, so this equals a per-client cache of its own samples.

Memory bound: ``max_bytes`` caps the stored tensors. When a new row does not fit, stores for other
start layers are evicted first (least recently used); if it still does not fit, the row is not
stored and is recomputed through the frozen bottom whenever it is needed (a *miss*, counted), so
the bound costs speed, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from fedpeft.data.tokenize import TokenizedData
from fedpeft.models import MaskedMeanPooler
from fedpeft.peft.base import encoder_layers, lowest_trainable_layer

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _bert(model: nn.Module) -> nn.Module:
    bert = getattr(model, "bert", None)
    if bert is None or not hasattr(model, "classifier"):
        raise ValueError("the activation cache needs a BertForSequenceClassification-style model")
    return bert


def cache_start_layer(model: nn.Module) -> int | None:
    """The layer whose input can be cached, or None when nothing below the top trains frozen.

    None when layer 0 or the embeddings train (full fine-tuning, prompt/prefix tuning) or the model
    is wrapped (peft's PeftModel): there is no frozen bottom to skip.
    """
    if not hasattr(model, "bert"):
        return None
    num_layers = len(encoder_layers(model))
    start = lowest_trainable_layer(model, num_layers)
    return start if start > 0 else None


def _layer_out(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _mask4d(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    return create_bidirectional_mask(
        config=_bert(model).config, inputs_embeds=hidden, attention_mask=attention_mask
    )


@torch.no_grad()
def bottom_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor], start: int) -> torch.Tensor:
    """Hidden states entering layer ``start``: embeddings and layers ``0..start-1`` in eval mode."""
    bert = _bert(model)
    layers = encoder_layers(model)
    modules = [bert.embeddings, *layers[:start]]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        hidden = bert.embeddings(
            input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")
        )
        mask = _mask4d(model, hidden, batch["attention_mask"])
        for layer in layers[:start]:
            hidden = _layer_out(layer(hidden, mask))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return hidden


def top_logits(
    model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Logits from the hidden states entering layer ``start``: layers ``start..``, pooler, head.

    Gives the same logits as ``model(**batch).logits`` when ``hidden`` is ``bottom_hidden``'s output
    and the bottom is deterministic (eval mode); the mean pooler gets the mask the pre-hook on the
    full forward would have handed it.
    """
    bert = _bert(model)
    mask = _mask4d(model, hidden, attention_mask)
    for layer in encoder_layers(model)[start:]:
        hidden = _layer_out(layer(hidden, mask))
    if isinstance(bert.pooler, MaskedMeanPooler):
        bert.pooler.mask = attention_mask
    pooled = bert.pooler(hidden) if bert.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


@dataclass
class _Store:
    fingerprint: tuple
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class CacheStats:
    hits: int = 0  # rows served from the cache
    misses: int = 0  # rows run through the frozen bottom (first use, or not stored: bound hit)
    rebuilds: int = 0  # stores dropped because their bottom changed (e.g. depth)
    evictions: int = 0  # stores dropped to make room under max_bytes
    not_stored: int = 0  # rows that did not fit under max_bytes


class ActivationCache:
    """Hidden states at the lowest trainable layer, per row of one tokenised dataset."""

    def __init__(self, data: TokenizedData, dtype: str = "fp16", max_bytes: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.data = data
        self.dtype = DTYPES[dtype]
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._stores: OrderedDict[int, _Store] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self._stores.values())

    def clear(self) -> None:
        self._stores.clear()

    @staticmethod
    def fingerprint(model: nn.Module, start: int) -> tuple:
        bert = _bert(model)
        modules = [bert.embeddings, *encoder_layers(model)[:start]]
        return (
            start,
            tuple(id(m) for top in modules for m in top.modules()),
            tuple((id(p), p._version) for top in modules for p in top.parameters()),
        )

    def _store(self, model: nn.Module, start: int) -> _Store:
        fingerprint = self.fingerprint(model, start)
        store = self._stores.get(start)
        if store is not None and store.fingerprint != fingerprint:
            del self._stores[start]
            self.stats.rebuilds += 1
            store = None
        if store is None:
            store = self._stores[start] = _Store(fingerprint)
        self._stores.move_to_end(start)
        return store

    def _room_for(self, nbytes: int, keep: int) -> bool:
        if self.max_bytes is None:
            return True
        while self.nbytes + nbytes > self.max_bytes:
            others = [k for k in self._stores if k != keep]
            if not others:
                return False
            del self._stores[others[0]]  # least recently used first
            self.stats.evictions += 1
        return True

    def hidden(self, model: nn.Module, rows: np.ndarray, start: int) -> torch.Tensor:
        """``[B, width, hidden]`` fp32 hidden states entering ``start`` for these rows."""
        rows = np.asarray(rows)
        store = self._store(model, start)
        missing = [int(r) for r in rows if int(r) not in store.rows]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            computed = bottom_hidden(model, self.data.batch(missing), start)
            lengths = self.data.lengths[missing]
            for i, row in enumerate(missing):
                tensor = computed[i, : int(lengths[i])].to(self.dtype).clone()
                fresh[row] = tensor
                size = tensor.numel() * tensor.element_size()
                if self._room_for(size, keep=start):
                    store.rows[row] = tensor
                    store.nbytes += size
                else:
                    self.stats.not_stored += 1
        self.stats.misses += len(missing)
        self.stats.hits += len(rows) - len(missing)
        seqs = [fresh.get(int(r), store.rows.get(int(r))) for r in rows]
        width = max(int(self.data.lengths[rows].max()), 1)
        out = torch.zeros(len(rows), width, seqs[0].shape[-1], dtype=torch.float32)
        for i, seq in enumerate(seqs):
            out[i, : seq.shape[0]] = seq
        return out

    def logits(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], rows: np.ndarray
    ) -> torch.Tensor:
        """The model's logits for ``rows`` (whose trimmed ``batch`` is given), via the cache."""
        start = cache_start_layer(model)
        if start is None:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return model(**inputs).logits
        hidden = self.hidden(model, rows, start)
        return top_logits(model, hidden, batch["attention_mask"], start)
