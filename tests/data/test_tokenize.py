"""Tokenisation: pairs, dynamic padding, the on-disk cache, batching of indices."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.data import TextDataset, iter_batches, load_source, tokenize

# `fedpeft.data.tokenize` the attribute is the function; the module has to be fetched by name.
tokenize_module = importlib.import_module("fedpeft.data.tokenize")

SHORT_AND_LONG = TextDataset(
    texts=["hi", "a much longer sentence with quite a few more words in it", "ok then"],
    labels=np.array([0, 1, 0], dtype=np.int64),
    label_names=["no", "yes"],
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch) -> None:
    """Keep every test's token cache in its own temporary folder."""
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))


def test_single_texts_are_right_padded(minilm_tokenizer) -> None:
    data = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=32)
    assert len(data) == 3
    assert data.input_ids.dtype == torch.int64 and data.labels.tolist() == [0, 1, 0]
    assert data.input_ids.shape[1] == int(data.lengths.max())  # trimmed to the longest row
    assert torch.equal(data.attention_mask.sum(dim=1), data.lengths)
    assert (
        data.attention_mask[0, : data.lengths[0]].all()
        and not data.attention_mask[0, data.lengths[0] :].any()
    )
    assert data.input_ids[0, 0] == minilm_tokenizer.cls_token_id
    assert not data.token_type_ids.any()


def test_truncation_respects_max_len(minilm_tokenizer) -> None:
    data = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=6)
    assert data.input_ids.shape[1] == 6 and int(data.lengths[1]) == 6
    assert data.input_ids[1, 5] == minilm_tokenizer.sep_token_id


def test_pairs_have_second_segment(minilm_tokenizer) -> None:
    ds = TextDataset(
        texts=["the cat sat", "a premise that goes on and on and on"],
        labels=np.array([0, 1], dtype=np.int64),
        label_names=["e", "n"],
        text_pairs=["a cat sat", "short hypothesis"],
    )
    data = tokenize(ds, minilm_tokenizer, max_len=10)
    assert (data.token_type_ids == 1).any(dim=1).all()  # every row has a second segment
    assert int(data.lengths.max()) == 10
    row = data.input_ids[1, : data.lengths[1]].tolist()
    assert row.count(minilm_tokenizer.sep_token_id) == 2  # both segments kept (longest_first)


def test_batch_trims_to_longest_row_in_batch(minilm_tokenizer) -> None:
    data = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=32)
    short = data.batch([0, 2])
    assert set(short) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert short["input_ids"].shape == (2, int(data.lengths[[0, 2]].max()))
    assert short["input_ids"].shape[1] < data.input_ids.shape[1]
    assert torch.equal(short["labels"], torch.tensor([0, 0]))
    full = data.batch(torch.tensor([1, 0]))
    assert full["input_ids"].shape[1] == data.input_ids.shape[1]


def test_cache_round_trip_gives_identical_tensors(
    minilm_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    first = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=16, cache_key="tiny:train")
    files = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("should have been served from the cache")

    monkeypatch.setattr(tokenize_module, "_tokenize_all", refuse)
    second = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=16, cache_key="tiny:train")
    for name in ("input_ids", "attention_mask", "token_type_ids", "labels", "lengths"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    monkeypatch.undo()
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=8, cache_key="tiny:train")
    # max_len is in the key
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 2


def test_broken_cache_file_is_rebuilt(minilm_tokenizer, tmp_path: Path) -> None:
    tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=16, cache_key="k")
    (cached,) = (tmp_path / "cache" / "tokens").glob("*.safetensors")
    cached.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable token cache"):
        data = tokenize(SHORT_AND_LONG, minilm_tokenizer, max_len=16, cache_key="k")
    assert len(data) == 3


def test_iter_batches_covers_indices_once() -> None:
    batches = list(iter_batches(10, 4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in iter_batches(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    subset = np.array([7, 3, 11, 5, 2])
    seen = torch.cat(
        list(iter_batches(subset, 2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    )
    assert sorted(seen.tolist()) == sorted(subset.tolist())
    again = torch.cat(
        list(iter_batches(subset, 2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    )
    assert torch.equal(seen, again)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(5, 0, shuffle=False))


def test_shared_rte_pairs_smoke(minilm_tokenizer, shared_dataset) -> None:
    rte = load_source(str(shared_dataset("rte")))
    data = tokenize(rte.test, minilm_tokenizer, max_len=128)
    assert len(data) == len(rte.test) and data.input_ids.shape[1] <= 128
    assert (data.token_type_ids == 1).any(dim=1).all()
    batch = data.batch(np.arange(8))
    assert batch["input_ids"].shape[0] == 8
