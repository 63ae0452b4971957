"""Tokenise a dataset once into padded tensors, cache them on disk, and serve trimmed batches.

Clients train on many small batches of the same rows across rounds, so the text is tokenised once
(in chunks, with the fast tokenizer) into right-padded [N, max_len] tensors. `TokenizedData.batch`
gathers rows and cuts the padding to the longest row of that batch (dynamic padding), which keeps
short-text batches cheap on a CPU.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpeft.data.sources import TextDataset
from fedpeft.paths import cache_dir

CHUNK_ROWS = 4096
"""Rows per tokenizer call: big enough for the fast tokenizer's batching, small enough for memory."""
_CACHE_FORMAT = "tokens-v2"


@dataclass
class TokenizedData:
    """Right-padded token tensors for a whole dataset."""

    input_ids: torch.Tensor  # [N, max_len] int64, right-padded
    attention_mask: torch.Tensor  # [N, max_len] int64
    token_type_ids: torch.Tensor  # [N, max_len] int64
    labels: torch.Tensor  # [N] int64
    lengths: torch.Tensor  # [N] number of real tokens

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at `indices`, columns trimmed to the longest of these rows."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        width = max(int(self.lengths[idx].max()), 1) if idx.numel() else 1
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": self.attention_mask[idx, :width],
            "token_type_ids": self.token_type_ids[idx, :width],
            "labels": self.labels[idx],
        }


def tokenize(
    ds: TextDataset, tokenizer, max_len: int, *, cache_key: str | None = None
) -> TokenizedData:
    """Tokenise `ds` (pairs with 'longest_first' truncation); cache on disk when `cache_key` is set.

    The cache file name hashes `cache_key` with the tokenizer's name, vocabulary size and
    `max_len`, so the caller's key only has to name the data (e.g. source fingerprint + split +
    subsample seed). Writes are atomic: a temp file is renamed into place.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    path = _cache_path(cache_key, tokenizer, max_len) if cache_key is not None else None
    if path is not None:
        cached = _load_cached(path, len(ds))
        if cached is not None:
            return cached
    data = _tokenize_all(ds, tokenizer, max_len)
    if path is not None:
        _save_atomic(data, path)
    return data


def iter_batches(
    n_or_indices: int | Sequence[int] | np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield int64 index tensors of `batch_size` (the last one shorter unless `drop_last`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(n_or_indices, int):
        indices = torch.arange(n_or_indices, dtype=torch.long)
    else:
        indices = torch.as_tensor(np.asarray(n_or_indices), dtype=torch.long).reshape(-1)
    if shuffle:
        indices = indices[torch.randperm(indices.numel(), generator=generator)]
    stop = indices.numel() - indices.numel() % batch_size if drop_last else indices.numel()
    for start in range(0, stop, batch_size):
        yield indices[start : start + batch_size]


def _tokenize_all(ds: TextDataset, tokenizer, max_len: int) -> TokenizedData:
    """Tokenise in chunks into [N, max_len] arrays, then trim to the longest row overall."""
    n = len(ds)
    input_ids = np.full((n, max_len), _pad_id(tokenizer), dtype=np.int64)
    token_types = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for start in range(0, n, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n)
        pairs = ds.text_pairs[start:stop] if ds.text_pairs is not None else None
        encoded = tokenizer(
            ds.texts[start:stop],
            pairs,
            truncation=True,
            max_length=max_len,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        types = encoded.get("token_type_ids")
        for row, ids in enumerate(encoded["input_ids"]):
            input_ids[start + row, : len(ids)] = ids
            if types is not None:
                token_types[start + row, : len(ids)] = types[row]
            lengths[start + row] = len(ids)
    width = max(int(lengths.max()) if n else 1, 1)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return TokenizedData(
        input_ids=torch.from_numpy(np.ascontiguousarray(input_ids[:, :width])),
        attention_mask=torch.from_numpy(mask),
        token_type_ids=torch.from_numpy(np.ascontiguousarray(token_types[:, :width])),
        labels=torch.as_tensor(ds.labels, dtype=torch.long),
        lengths=torch.from_numpy(lengths),
    )


def _pad_id(tokenizer) -> int:
    """Padding positions are masked out, so any id works when the tokenizer defines none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _cache_path(cache_key: str, tokenizer, max_len: int) -> Path:
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    parts = [_CACHE_FORMAT, cache_key, str(name), str(len(tokenizer)), str(max_len)]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    return cache_dir() / "tokens" / f"{digest}.safetensors"


def _load_cached(path: Path, expected_rows: int) -> TokenizedData | None:
    """The cached tensors, or None when absent, unreadable or for a different row count."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        data = TokenizedData(**{f.name: tensors[f.name] for f in fields(TokenizedData)})
    except Exception as err:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable token cache {path}: {err}", stacklevel=3)
        return None
    return data if len(data) == expected_rows else None


def _save_atomic(data: TokenizedData, path: Path) -> None:
    """Write to a temp file in the same folder, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f.name: getattr(data, f.name) for f in fields(TokenizedData)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
