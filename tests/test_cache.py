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
