"""Each PEFT unit: injection, trainable counts, state round trips, and adapter identity upgrades."""

from __future__ import annotations

import importlib

import pytest
import torch

from fedpeft import (
    registry,  # noqa: E402
)
from fedpeft.models import load_model
from fedpeft.peft import adapter
from fedpeft.peft.base import (
    count_trainable,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_state,
)

PEFT_UNITS = [name for name, spec in registry.methods().items() if spec.system is None]


def tiny(method: str, **settings):
    model, tok = load_model("tiny", 4, seed=0)
    unit = importlib.import_module("fedpeft.peft." + method)
    model = unit.inject(model, registry.get(method).settings(**settings))
    return model.eval(), tok


def batch(tok):
    enc = tok(
        ["a football match today", "stock prices fell sharply after the report"],
        padding=True,
        return_tensors="pt",
    )
    return dict(enc)


HEAD = 64 * 4 + 4  # tiny hidden 64 -> 4 labels


@pytest.mark.parametrize(
    "method, settings, expected",
    [
        # 2 layers x (query, value) x (A: r*64 + B: 64*r), r=4
        ("lora", {"r": 4}, 2 * 2 * (4 * 64 + 64 * 4) + HEAD),
        ("lora", {"r": 4, "depth": 1}, 1 * 2 * (4 * 64 + 64 * 4) + HEAD),
        # pfeiffer: 1 adapter per layer: down 64*8+8, up 8*64+64
        ("adapter", {"width": 8}, 2 * (64 * 8 + 8 + 8 * 64 + 64) + HEAD),
        ("adapter", {"width": 8, "placement": "houlsby"}, 4 * (64 * 8 + 8 + 8 * 64 + 64) + HEAD),
        ("adapter", {"width": 8, "depth": 1}, 1 * (64 * 8 + 8 + 8 * 64 + 64) + HEAD),
        # prefix: tokens x layers x 2 (k, v) x hidden
        ("prefix", {"num_virtual_tokens": 5}, 5 * 2 * 2 * 64 + HEAD),
        ("prompt", {"num_virtual_tokens": 5}, 5 * 64 + HEAD),
    ],
)
def test_trainable_counts(method, settings, expected):
    model, _ = tiny(method, **settings)
    assert count_trainable(model) == expected


def test_bitfit_trains_only_biases_and_head():
    model, _ = tiny("bitfit")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("bias") or n.startswith("classifier.") for n in names)
    # per layer: q,k,v,o(4x64) + attn LN 64 + intermediate 128 + output 64 + output LN 64
    assert count_trainable(model) == 2 * (4 * 64 + 64 + 128 + 64 + 64) + HEAD


def test_full_trains_everything_and_depth_freezes_below():
    model, _ = tiny("full")
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())
    model, _ = tiny("full", depth=1)
    assert lowest_trainable_layer(model, 2) == 1
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embeddings" in n)


@pytest.mark.parametrize("method", PEFT_UNITS)
def test_state_round_trip_reproduces_outputs(method):
    model, tok = tiny(method)
    inputs = batch(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    saved = trainable_state(model)
    before = model(**inputs).logits
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    assert not torch.allclose(model(**inputs).logits, before)
    load_trainable_state(model, saved)
    assert torch.allclose(model(**inputs).logits, before)


def test_load_rejects_mismatched_state():
    model, _ = tiny("lora")
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, {k: v for k, v in state.items() if k != name})
    bad = dict(state)
    bad[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, bad)


def test_methods_train_their_tensors_only():
    for method in PEFT_UNITS:
        model, tok = tiny(method)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        logits = model(**batch(tok)).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), method
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen), method


def test_adapter_starts_as_identity():
    plain, tok = load_model("tiny", 4, seed=0)
    plain.eval()
    adapted, _ = tiny("adapter", width=8, placement="houlsby")
    inputs = batch(tok)
    assert torch.allclose(plain(**inputs).logits, adapted(**inputs).logits, atol=1e-6)


def test_adapter_width_and_depth_upgrades_keep_outputs():
    model, tok = tiny("adapter", width=8, depth=1)
    inputs = batch(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    before = model(**inputs).logits
    adapter.grow_width(model, 16)
    assert all(a.width == 16 for a in adapter.adapters(model))
    assert torch.allclose(model(**inputs).logits, before, atol=1e-6)
    adapter.add_adapters(model, [0], registry.get("adapter").settings(width=16))
    for a in adapter.adapters(model):
        a.requires_grad_(True)
    assert lowest_trainable_layer(model, 2) == 0
    assert torch.allclose(model(**inputs).logits, before, atol=1e-6)
    with pytest.raises(ValueError, match="only grow"):
        adapter.grow_width(model, 4)


def test_layer_selection_errors():
    with pytest.raises(ValueError, match="does not exist"):
        tiny("lora", layers=[5])
    with pytest.raises(ValueError, match="outside"):
        tiny("adapter", depth=3)


def test_mean_pooling_ignores_padding():
    model, tok = load_model("tiny", 4, seed=0, pooling="mean")
    model.eval()
    short = tok(["football match"], return_tensors="pt")
    padded = tok(["football match"], padding="max_length", max_length=12, return_tensors="pt")
    assert torch.allclose(model(**dict(short)).logits, model(**dict(padded)).logits, atol=1e-5)
