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

Bookkeeping only (``store_hidden=False``): every decision above is taken the same way (which
rows would be stored, evicted or missed, and so what the device is charged), but no hidden state
is kept and each batch's bottom is recomputed, rounded to ``dtype`` as a stored row would be. The
simulated run is the same as with the cache (weights equal up to float rounding: a row's bottom
is computed in another batch); only the wall-clock differs. ``nbytes`` then counts what would be
stored.

Memory bound: ``max_bytes`` caps the stored tensors. When a new row does not fit, stores for other
start layers are evicted first (least recently used); if it still does not fit, the row is not
stored and is recomputed through the frozen bottom whenever it is needed (a *miss*, counted), so
the bound costs speed, never correctness.

Resume (``state_dict`` / ``load_state_dict``): a checkpoint keeps, per store and in LRU order, its
start layer, which rows it holds, the bottom forwards that computed them (the rows of each batch,
so a refill pads and batches exactly as the first computation did and gives the same bits), its
byte count, and a content hash of the frozen bottom the rows were computed with; plus the
counters. The hidden states themselves are not saved: they are recomputed. Object identities do
not survive a restart, so a restored store is checked by content instead, once, at its first use:
if the bottom then hashes as when the store was made, the store is refilled (not counted as
misses) and adopts the current model's identity fingerprint; otherwise it is rebuilt and counted
as such, as an uninterrupted run would have done (its bottom changed). Until that first use a
restored store occupies its bytes and its place in the LRU order, so evictions and misses happen
as in the uninterrupted run. (Identity and content checks differ only when a bottom module is
replaced by a new object with the very same weights, which no method here does.)
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.data.tokenize import TokenizedData
from fedpeft.models.families import task_model
from fedpeft.peft.base import encoder_layers, lowest_trainable_layer

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
log = logging.getLogger("fedpeft.cache")


class _Stop(Exception):
    """Ends a forward pass once the wanted hidden states are captured."""


def _task(model: nn.Module):
    family, task = task_model(model)
    if task is not model:
        raise ValueError("the activation cache needs an unwrapped sequence-classification model")
    return family, task


def cache_start_layer(model: nn.Module) -> int | None:
    """The layer whose input can be cached, or None when nothing below the top trains frozen.

    None when layer 0 or the embeddings train (full fine-tuning, prompt/prefix tuning) or the model
    is wrapped (peft's PeftModel): there is no frozen bottom to skip.
    """
    try:
        _task(model)
    except ValueError:
        return None
    num_layers = len(encoder_layers(model))
    start = lowest_trainable_layer(model, num_layers)
    return start if start > 0 else None


def _layer_out(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _bottom_modules(model: nn.Module, start: int) -> list[nn.Module]:
    """The frozen bottom below ``start``: the embeddings and layers ``0..start-1``."""
    family, task = _task(model)
    return [*family.embedding_modules(task), *family.task_layers(task)[:start]]


@torch.no_grad()
def bottom_digest(model: nn.Module, start: int) -> str:
    """A content hash of the bottom below ``start``: module tree, and every parameter's and
    buffer's name, dtype, shape and bytes. Equal digests mean ``bottom_hidden`` computes the same."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"start {start}\n".encode())
    for index, top in enumerate(_bottom_modules(model, start)):
        for name, module in top.named_modules():
            digest.update(f"{index}.{name}: {type(module).__qualname__}\n".encode())
        for name, tensor in itertools.chain(top.named_parameters(), top.named_buffers()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{index}.{name}: {flat.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def bottom_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor], start: int) -> torch.Tensor:
    """Hidden states entering layer ``start``: embeddings and layers ``0..start-1`` in eval mode.

    The model's own forward runs (so masks, positions and rotary embeddings are its own) and is
    stopped as soon as layer ``start - 1`` (or the embeddings, for 0) has produced its output.
    """
    family, task = _task(model)
    modules = _bottom_modules(model, start)
    last = family.task_layers(task)[start - 1] if start > 0 else modules[-1]
    captured: list[torch.Tensor] = []

    def stop(_module, _args, output):
        captured.append(_layer_out(output))
        raise _Stop

    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    hook = last.register_forward_hook(stop)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    except _Stop:
        pass
    finally:
        hook.remove()
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return captured[0]


def top_logits(
    model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Logits from the hidden states entering layer ``start``: layers ``start..``, pooler, head.

    Gives the same logits as ``model(**batch).logits`` when ``hidden`` is ``bottom_hidden``'s output
    and the bottom is deterministic (eval mode). The model's own forward runs with the embeddings'
    output replaced by ``hidden`` and its layer list cut to layers ``start..`` for the call, so
    masks, positions, the final norm, the pooler and the head are the model's own.
    """
    family, task = _task(model)
    parent_path, _, attr = family.layers.rpartition(".")
    parent = task.get_submodule(parent_path)
    layers = getattr(parent, attr)
    embeddings = family.embedding_modules(task)
    modes = [m.training for m in embeddings]
    for m in embeddings:  # their output is replaced: no dropout draws from the RNG
        m.eval()
    hook = embeddings[-1].register_forward_hook(lambda _module, _args, _output: hidden)
    setattr(parent, attr, layers[start:])
    try:
        ids = torch.zeros(attention_mask.shape, dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, attention_mask=attention_mask).logits
    finally:
        setattr(parent, attr, layers)
        hook.remove()
        for m, mode in zip(embeddings, modes, strict=True):
            m.train(mode)


@dataclass
class _Store:
    # identity fingerprint of the bottom; None for a store restored from a checkpoint and not yet
    # checked against the model (its rows are then None until refilled)
    fingerprint: tuple | None
    digest: str  # content hash of the bottom its rows were computed with
    rows: dict[int, torch.Tensor | None] = field(default_factory=dict)
    nbytes: int = 0
    # the fingerprinted modules and parameters, kept alive so that no new object can take their id
    keep: tuple = ()
    # the rows of each bottom forward that stored rows here, and each stored row's forward
    groups: list[np.ndarray] = field(default_factory=list)
    group_of: dict[int, int] = field(default_factory=dict)


@dataclass
class CacheStats:
    hits: int = 0  # rows served from the cache
    misses: int = 0  # rows run through the frozen bottom (first use, or not stored: bound hit)
    rebuilds: int = 0  # stores dropped because their bottom changed (e.g. depth)
    evictions: int = 0  # stores dropped to make room under max_bytes
    not_stored: int = 0  # rows that did not fit under max_bytes


class ActivationCache:
    """Hidden states at the lowest trainable layer, per row of one tokenised dataset."""

    def __init__(
        self,
        data: TokenizedData,
        dtype: str = "fp16",
        max_bytes: int | None = None,
        store_hidden: bool = True,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.data = data
        self.store_hidden = store_hidden
        self.dtype_name = dtype
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
        modules = _bottom_modules(model, start)
        return (
            start,
            tuple(id(m) for top in modules for m in top.modules()),
            tuple((id(p), p._version) for top in modules for p in top.parameters()),
        )

    @staticmethod
    def _keep(model: nn.Module, start: int) -> tuple:
        modules = _bottom_modules(model, start)
        return tuple(m for top in modules for m in top.modules()) + tuple(
            p for top in modules for p in top.parameters()
        )

    def _store(self, model: nn.Module, start: int) -> _Store:
        fingerprint = self.fingerprint(model, start)
        store = self._stores.get(start)
        if store is not None and store.fingerprint is None:  # restored: check it by content, once
            if store.digest == bottom_digest(model, start):
                if self.store_hidden:
                    self._refill(model, start, store)
                store.fingerprint, store.keep = fingerprint, self._keep(model, start)
        if store is not None and store.fingerprint != fingerprint:
            del self._stores[start]
            self.stats.rebuilds += 1
            store = None
        if store is None:
            store = self._stores[start] = _Store(
                fingerprint, bottom_digest(model, start), keep=self._keep(model, start)
            )
        self._stores.move_to_end(start)
        return store

    def _refill(self, model: nn.Module, start: int, store: _Store) -> None:
        """Recompute a restored store's rows, each in the batch that first computed it."""
        for index, group in enumerate(store.groups):
            computed = bottom_hidden(model, self.data.batch(group), start)
            for i, row in enumerate(group.tolist()):
                if store.group_of.get(row) == index:
                    length = int(self.data.lengths[row])
                    store.rows[row] = computed[i, :length].to(self.dtype).clone()
        if any(tensor is None for tensor in store.rows.values()):
            raise ValueError("activation cache checkpoint: a stored row has no batch to recompute")

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
        if not self.store_hidden:  # bookkeeping only: every row of the batch is recomputed
            computed = bottom_hidden(model, self.data.batch(rows), start)
            for i, row in enumerate(rows.tolist()):
                length = int(self.data.lengths[row])
                fresh[int(row)] = computed[i, :length].to(self.dtype).clone()
        if missing:
            if self.store_hidden:
                computed = bottom_hidden(model, self.data.batch(missing), start)
            lengths = self.data.lengths[missing]
            group, stored = len(store.groups), False
            for i, row in enumerate(missing):
                if self.store_hidden:
                    tensor = computed[i, : int(lengths[i])].to(self.dtype).clone()
                    fresh[row] = tensor
                else:
                    tensor = fresh[row]
                size = tensor.numel() * tensor.element_size()
                if self._room_for(size, keep=start):
                    store.rows[row] = tensor if self.store_hidden else None
                    store.group_of[row] = group
                    store.nbytes += size
                    stored = True
                else:
                    self.stats.not_stored += 1
            if stored:
                store.groups.append(np.asarray(missing, dtype=np.int64))
        self.stats.misses += len(missing)
        self.stats.hits += len(rows) - len(missing)
        seqs = [fresh.get(int(r), store.rows.get(int(r))) for r in rows]
        width = max(int(self.data.lengths[rows].max()), 1)
        out = torch.zeros(len(rows), width, seqs[0].shape[-1], dtype=torch.float32)
        for i, seq in enumerate(seqs):
            out[i, : seq.shape[0]] = seq
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The counters and, per store in LRU order, which rows it holds and how they were
        computed (JSON values and int64 tensors; no hidden states)."""
        stores = []
        for start, store in self._stores.items():
            rows = list(store.rows)
            sizes = [len(group) for group in store.groups]
            flat = np.concatenate(store.groups) if store.groups else np.zeros(0, dtype=np.int64)
            stores.append(
                {
                    "start": start,
                    "nbytes": store.nbytes,
                    "digest": store.digest,
                    "rows": torch.tensor(rows, dtype=torch.int64),
                    "group_of": torch.tensor([store.group_of[r] for r in rows], dtype=torch.int64),
                    "groups": torch.from_numpy(flat.astype(np.int64)),
                    "group_sizes": torch.tensor(sizes, dtype=torch.int64),
                }
            )
        return {
            "dtype": self.dtype_name,
            "num_rows": len(self.data),
            "stats": asdict(self.stats),
            "stores": stores,
        }

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Restore the counters and the stores as they were (rows are recomputed at each store's
        first use, see the module docstring). ``model`` is not needed: stores are checked lazily."""
        self.stats = CacheStats(**state["stats"])
        self._stores.clear()
        if state["dtype"] != self.dtype_name or state["num_rows"] != len(self.data):
            log.warning(
                "activation cache checkpoint is for %s rows in %s, this cache holds %d rows in %s: "
                "starting with empty stores",
                state["num_rows"],
                state["dtype"],
                len(self.data),
                self.dtype_name,
            )
            return
        for entry in state["stores"]:
            rows = [int(r) for r in _ints(entry["rows"])]
            sizes = _ints(entry["group_sizes"])
            flat = _ints(entry["groups"])
            groups = np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []
            self._stores[int(entry["start"])] = _Store(
                None,
                str(entry["digest"]),
                dict.fromkeys(rows),
                int(entry["nbytes"]),
                groups=[np.asarray(g, dtype=np.int64) for g in groups],
                group_of=dict(zip(rows, (int(g) for g in _ints(entry["group_of"])), strict=True)),
            )

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


def _ints(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.numpy().astype(np.int64)
    return np.asarray(value, dtype=np.int64)
