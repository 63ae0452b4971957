"""The activation cache gives the model's own logits, loss and gradients, and is never stale."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpeft.cache import ActivationCache, cache_start_layer
from fedpeft.client import LocalTraining, forward_logits, train_local
from fedpeft.data.sources import load_source
from fedpeft.data.tokenize import tokenize
from fedpeft.models import TinySpec, load_model
from fedpeft.peft.adapter import AdapterSettings, grow_width, set_layout
from fedpeft.peft.base import trainable_parameters

TINY4 = TinySpec(layers=4)

from fedpeft import registry  # noqa: E402


def _setup(toy_data, method="adapter", pooling="mean", **settings):
    model, tokenizer = load_model("tiny", 4, pooling=pooling, tiny=TINY4)
    model = importlib.import_module("fedpeft.peft." + method).inject(
        model, registry.get(method).settings(**settings)
    )
    data = tokenize(load_source(str(toy_data)).train, tokenizer, 24)
    return model, data


def _loss_and_grads(model, logits, labels):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


@pytest.mark.parametrize(
    "method,pooling,settings",
    [
        ("adapter", "mean", {"depth": 2, "width": 8}),
        ("adapter", "cls", {"depth": 1, "width": 8}),
        ("adapter", "mean", {"depth": 0}),
        ("lora", "mean", {"depth": 2}),
        ("full", "mean", {"depth": 1}),
    ],
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cached_forward_matches_whole_model(toy_data, method, pooling, settings, dtype):
    model, data = _setup(toy_data, method, pooling, **settings)
    for p in trainable_parameters(model).values():  # non-trivial adapters / LoRA
        torch.nn.init.normal_(p, std=0.05)
    model.eval()  # the cache runs the bottom without dropout; compare like with like
    cache = ActivationCache(data, dtype=dtype)
    rows = np.array([3, 17, 5, 40, 11, 2])
    batch = data.batch(rows)
    ref_loss, ref_grads = _loss_and_grads(model, forward_logits(model, batch), batch["labels"])
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == "fp32" else {"atol": 2e-3, "rtol": 2e-2}
    for _ in range(2):  # first call fills the cache, second serves it
        loss, grads = _loss_and_grads(model, cache.logits(model, batch, rows), batch["labels"])
        assert torch.allclose(loss, ref_loss, **tol)
        for name, grad in ref_grads.items():
            assert torch.allclose(grads[name], grad, **tol), name
    assert cache.stats.misses == len(rows) and cache.stats.hits == len(rows)
    bytes_per_value = 2 if dtype == "fp16" else 4
    expected = int(data.lengths[rows].sum()) * model.config.hidden_size * bytes_per_value
    assert cache.nbytes == expected


def test_depth_change_invalidates_and_width_change_does_not(toy_data):
    settings = AdapterSettings(depth=1, width=8)
    model, data = _setup(toy_data, depth=1, width=8)
    model.eval()
    cache = ActivationCache(data, dtype="fp32")
    rows = np.arange(8)
    batch = data.batch(rows)
    cache.logits(model, batch, rows)
    assert cache_start_layer(model) == 3 and cache.stats.misses == 8

    grow_width(model, 16)  # trainable layers only: the store stays valid
    cache.logits(model, batch, rows)
    assert cache.stats.hits == 8 and cache.stats.rebuilds == 0

    set_layout(model, 2, 16, settings)  # deeper: a new start layer, a new store
    logits = cache.logits(model, batch, rows)
    assert cache_start_layer(model) == 2 and cache.stats.misses == 16
    assert torch.allclose(logits, forward_logits(model, batch), atol=1e-5)

    # An in-place change to a frozen bottom weight: the store is dropped, never served stale.
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(1.5)
    logits = cache.logits(model, batch, rows)
    assert cache.stats.rebuilds == 1 and cache.stats.misses == 24
    assert torch.allclose(logits, forward_logits(model, batch), atol=1e-5)


def test_memory_bound_evicts_other_depths_then_stops_storing(toy_data):
    model, data = _setup(toy_data, depth=1, width=8)
    model.eval()
    row_bytes = int(data.lengths[:4].max()) * model.config.hidden_size * 4
    cache = ActivationCache(data, dtype="fp32", max_bytes=3 * row_bytes)
    rows = np.arange(6)
    batch = data.batch(rows)
    ref = forward_logits(model, batch)
    for _ in range(2):
        assert torch.allclose(cache.logits(model, batch, rows), ref, atol=1e-5)
    assert cache.nbytes <= 3 * row_bytes
    assert cache.stats.not_stored > 0 and cache.stats.hits < 6  # bound hit: recomputed, still right

    set_layout(model, 2, 8, AdapterSettings())
    cache.logits(model, batch, rows[:2])
    assert cache.stats.evictions == 1  # the other depth's store made room


def test_train_local_through_the_cache_matches_training_without_it(toy_data):
    """Same seed, dropout off: local training via the cache ends at the same weights."""
    results = []
    for use_cache in (False, True):
        model, data = _setup(toy_data, depth=1, width=8)
        model.config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        cache = ActivationCache(data, dtype="fp32") if use_cache else None
        training = LocalTraining(epochs=2, batch_size=8, lr=1e-2)
        result = train_local(
            model,
            data,
            np.arange(32),
            training,
            seed=3,
            forward=cache.logits if cache else None,
        )
        results.append((result.mean_loss, trainable_parameters(model)))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for name, p in params_a.items():
        assert torch.allclose(p, params_b[name], atol=1e-5), name


def test_no_cache_when_nothing_is_frozen_below(toy_data):
    model, _ = _setup(toy_data, "full")
    assert cache_start_layer(model) is None
    model, _ = _setup(toy_data, "adapter")  # adapters in every layer
    assert cache_start_layer(model) is None


def test_engine_uses_the_cache_for_fixed_depth_runs(tmp_path, toy_data):
    """adapter with a depth and the cache on: later epochs hit, and the device is charged less."""
    from tests.conftest import tiny_config
    from tests.engine.test_local import metrics, run_once

    config = tiny_config(
        toy_data, method="adapter", adapter={"depth": 1, "width": 8}, rounds=1, local_epochs=3
    )
    _, plain = run_once(tmp_path / "plain", **config)
    _, cached = run_once(
        tmp_path / "cached", **config, activation_cache={"enabled": True, "dtype": "fp32"}
    )
    row_plain, row_cached = metrics(plain)[0], metrics(cached)[0]
    assert row_cached["cache_hits"] > row_cached["cache_misses"] > 0
    assert row_cached["sim_time_s"] < row_plain["sim_time_s"]
    assert row_cached["bytes_up"] == row_plain["bytes_up"]
    assert "cache_hits" not in row_plain


def _checkpointed(cache: ActivationCache, tmp_path) -> dict:
    """The cache's state as a checkpoint stores it: JSON values + safetensors, read back."""
    import json

    from safetensors.torch import load_file, save_file

    from fedpeft.runs import join_tensors, split_tensors

    value, tensors = split_tensors(cache.state_dict())
    assert all(t.dtype == torch.int64 for t in tensors.values())  # row ids, never hidden states
    (tmp_path / "cache.json").write_text(json.dumps(value))
    save_file(tensors, str(tmp_path / "cache.safetensors"))
    value = json.loads((tmp_path / "cache.json").read_text())
    return join_tensors(value, load_file(str(tmp_path / "cache.safetensors")))


def test_restored_cache_continues_as_the_uninterrupted_one(toy_data, tmp_path):
    """Checkpoint a cache with two stores (one stale: an adapter sits below its start), restore it
    beside a copy of the model (new objects, same weights, as after a restart), then do the same
    things to both: every hit, miss, eviction and rebuild, the bytes and the bits agree."""
    import copy
    from dataclasses import asdict

    settings = AdapterSettings(depth=1, width=8)
    model, data = _setup(toy_data, depth=1, width=8)
    for p in trainable_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()

    def nbytes(rows):
        return int(data.lengths[rows].sum()) * model.config.hidden_size * 2

    bound = nbytes(np.r_[0:24, 40:43]) + nbytes(np.r_[4:20]) + 2 * nbytes([0])
    cache = ActivationCache(data, dtype="fp16", max_bytes=bound)

    def use(model, cache, rows):
        rows = np.asarray(rows)
        return cache.logits(model, data.batch(rows), rows)

    use(model, cache, np.arange(0, 16))  # store for layer 3, three bottom forwards
    use(model, cache, np.arange(8, 24))
    use(model, cache, np.arange(40, 43))
    set_layout(model, 2, 8, settings)  # an adapter in layer 2: the layer-3 store goes stale
    use(model, cache, np.arange(4, 20))  # store for layer 2
    assert list(cache._stores) == [3, 2] and cache.stats.misses == 43

    state = _checkpointed(cache, tmp_path)
    restored_model = copy.deepcopy(model)
    restored = ActivationCache(data, dtype="fp16", max_bytes=bound)
    restored.load_state_dict(state, restored_model)
    assert asdict(restored.stats) == asdict(cache.stats) and restored.nbytes == cache.nbytes
    again = restored.state_dict()  # a checkpoint taken before any use says the same
    for entry, original in zip(again["stores"], state["stores"], strict=True):
        assert entry.keys() == original.keys()
        for key, value in entry.items():
            same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
            assert same(value, original[key]), key

    def step(action):
        out = [action(m, c) for m, c in ((model, cache), (restored_model, restored))]
        assert asdict(restored.stats) == asdict(cache.stats)
        assert restored.nbytes == cache.nbytes and list(restored._stores) == list(cache._stores)
        if isinstance(out[0], torch.Tensor):
            assert torch.equal(out[0], out[1])
        return out[0]

    hits = cache.stats.hits
    step(lambda m, c: use(m, c, np.arange(4, 12)))  # served from the restored layer-2 store
    assert cache.stats.hits == hits + 8
    # back to depth 1: layer 2 is pristine again, the layer-3 store valid again (refilled, no misses)
    step(lambda m, c: set_layout(m, 1, 8, settings))
    misses = cache.stats.misses
    step(lambda m, c: use(m, c, [0, 9, 23, 41]))
    assert cache.stats.misses == misses and cache.stats.rebuilds == 0
    step(lambda m, c: use(m, c, np.arange(24, 40)))  # new rows: the layer-2 store is evicted
    assert cache.stats.evictions == 1 and list(cache._stores) == [3]
    step(lambda m, c: use(m, c, np.arange(44, 80)))  # over the bound: rows not stored
    assert cache.stats.not_stored > 0

    # a frozen bottom weight changes: the store is rebuilt in both, never served stale
    def bump(m, c):
        with torch.no_grad():
            m.bert.embeddings.word_embeddings.weight.mul_(1.5)

    step(bump)
    step(lambda m, c: use(m, c, np.arange(0, 8)))
    assert cache.stats.rebuilds == 1


def test_restored_store_whose_bottom_changed_is_rebuilt_on_first_use(toy_data, tmp_path):
    settings = AdapterSettings(depth=1, width=8)
    model, data = _setup(toy_data, depth=1, width=8)
    model.eval()
    cache = ActivationCache(data, dtype="fp32")
    cache.logits(model, data.batch(np.arange(8)), np.arange(8))
    set_layout(model, 2, 8, settings)  # at the checkpoint the layer-3 store is stale ...
    state = _checkpointed(cache, tmp_path)

    fresh, _ = _setup(toy_data, depth=2, width=8)  # ... and stays so: the adapter is still there
    fresh.eval()
    restored = ActivationCache(data, dtype="fp32", max_bytes=cache.nbytes)
    restored.load_state_dict(state, fresh)
    assert restored.nbytes == cache.nbytes  # it still holds its bytes until it is used or evicted
    with torch.no_grad():  # force layer 3 as the start: the store was made without this adapter
        hidden = restored.hidden(fresh, np.arange(8), 3)
    assert restored.stats.rebuilds == 1 and restored.stats.misses == 16
    from fedpeft.cache import bottom_hidden

    expected = bottom_hidden(fresh, data.batch(np.arange(8)), 3)
    assert torch.equal(hidden[:, : expected.shape[1]], expected)

    other = ActivationCache(data, dtype="fp16")  # a checkpoint of another cache setup: start empty
    other.load_state_dict(state, fresh)
    assert other.nbytes == 0 and other.stats.misses == 8


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_bookkeeping_only_decides_and_computes_as_the_cache(toy_data, dtype):
    """store_hidden=False keeps no hidden state but counts hits, misses, evictions and bytes as
    the cache does, and serves the same hidden states (rounded to the cache's dtype)."""
    model, data = _setup(toy_data, "adapter", depth=2, width=8)
    for p in trainable_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    width = model.config.hidden_size * (2 if dtype == "fp16" else 4)
    size = int(data.lengths[[3, 17, 5]].sum()) * width  # room for about six rows
    kept = ActivationCache(data, dtype=dtype, max_bytes=size * 2)
    bookkeeping = ActivationCache(data, dtype=dtype, max_bytes=size * 2, store_hidden=False)
    batches = [[3, 17, 5], [5, 40, 11, 2], [3, 2], [1, 3, 17, 40], [7, 8]]
    for depth in (2, 1):  # a depth change: a new store beside the old one, evictions
        set_layout(model, depth, 8, AdapterSettings())
        start = cache_start_layer(model)
        for rows in batches:
            rows = np.array(rows)
            a = kept.hidden(model, rows, start)
            b = bookkeeping.hidden(model, rows, start)
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-3 if dtype == "fp16" else 1e-5)
            assert kept.stats == bookkeeping.stats and kept.nbytes == bookkeeping.nbytes
    assert kept.stats.hits > 0 and kept.stats.misses > 0 and kept.stats.evictions > 0
    assert all(t is None for s in bookkeeping._stores.values() for t in s.rows.values())
    state = bookkeeping.state_dict()  # checkpoints like the cache; nothing to refill on resume
    again = ActivationCache(data, dtype=dtype, max_bytes=size * 2, store_hidden=False)
    again.load_state_dict(state)
    rows = np.array([1, 3])
    assert torch.allclose(
        again.hidden(model, rows, start), kept.hidden(model, rows, start), atol=1e-3
    )
