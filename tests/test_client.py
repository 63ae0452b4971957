"""Local training and evaluation: schedules, determinism, extra loss hooks, metrics."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fedpeft import (
    peft,
    registry,  # noqa: E402
)
from fedpeft.client import LocalTraining, batch_order, evaluate, macro_f1, train_local
from fedpeft.data.sources import load_source
from fedpeft.data.tokenize import tokenize
from fedpeft.models import load_model
from fedpeft.peft.base import trainable_state


def setup(toy_data):
    model, tok = load_model("tiny", 4, seed=0)
    model = importlib.import_module("fedpeft.peft." + "lora").inject(
        model, registry.get("lora").settings(r=4)
    )
    data = tokenize(load_source(str(toy_data)).train, tok, 24)
    return model, data


def test_num_steps_from_epochs_or_steps():
    assert LocalTraining(epochs=1, batch_size=32).num_steps(100) == 4
    assert LocalTraining(epochs=0.5, batch_size=32).num_steps(100) == 2
    assert LocalTraining(epochs=2, batch_size=32).num_steps(10) == 2
    assert LocalTraining(steps=7).num_steps(3) == 7


def test_batch_order_reshuffles_each_epoch_and_covers_rows():
    rows = np.arange(10, 20)
    batches = batch_order(rows, 4, 6, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(batches[:3])) == list(rows)
    assert sorted(np.concatenate(batches[3:])) == list(rows)


def test_training_is_deterministic_for_a_seed_and_lowers_loss(toy_data):
    model, data = setup(toy_data)
    start = trainable_state(model)
    rows = np.arange(64)
    training = LocalTraining(epochs=3, batch_size=16, lr=1e-2)
    first = train_local(model, data, rows, training, seed=3)
    after_first = trainable_state(model)
    peft.load_trainable_state(model, start)
    second = train_local(model, data, rows, training, seed=3)
    assert first.mean_loss == pytest.approx(second.mean_loss)
    assert all(torch.equal(after_first[k], v) for k, v in trainable_state(model).items())
    assert first.steps == 12 and first.samples_seen == 192
    before = evaluate(model, data, rows).loss
    train_local(model, data, rows, LocalTraining(epochs=5, batch_size=16, lr=1e-2), seed=4)
    assert evaluate(model, data, rows).loss < before


def test_extra_loss_and_gradient_hook_are_applied(toy_data):
    model, data = setup(toy_data)
    calls = {"extra": 0, "after": 0}

    def extra(params):
        calls["extra"] += 1
        return None

    def zero_grads(m):
        calls["after"] += 1
        for p in m.parameters():
            if p.grad is not None:
                p.grad.zero_()

    before = trainable_state(model)
    train_local(
        model,
        data,
        np.arange(32),
        LocalTraining(steps=3, batch_size=16, weight_decay=0.0, lr=1e-2),
        seed=0,
        extra_loss=extra,
        after_backward=zero_grads,
    )
    assert calls == {"extra": 3, "after": 3}
    assert all(torch.equal(before[k], v) for k, v in trainable_state(model).items())


def test_macro_f1_golden():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fn1 -> 0
    assert macro_f1(labels, preds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_evaluate_counts_every_row(toy_data):
    model, data = setup(toy_data)
    result = evaluate(model, data, np.arange(50), batch_size=16)
    assert result.num_samples == 50
    assert 0.0 <= result.accuracy <= 1.0


def test_a_deep_copy_of_a_mean_pooled_model_pools_with_its_own_mask():
    import copy

    from fedpeft.models import load_model

    model, _tok = load_model("tiny", 3)
    twin = copy.deepcopy(model)
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    mask = (ids != 0).long()
    model.eval()
    twin.eval()
    other = mask.clone()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = twin(input_ids=ids, attention_mask=other).logits
    assert torch.allclose(expected, got, atol=1e-6)
    assert model.bert.pooler.mask is mask and twin.bert.pooler.mask is other
