"""C2A's generated adapters: shapes, conditioning, tying, identity, padding, gradients, state."""

from __future__ import annotations

import copy

import pytest
import torch

from fedpeft.models import load_model
from fedpeft.peft import hyperadapter
from fedpeft.peft.base import count_trainable, load_trainable_state, trainable_state
from fedpeft.peft.hyperadapter import C2ASettings, HyperAdaptedLinear, set_condition

HIDDEN, LAYERS, LABELS = 64, 2, 4  # the tiny random BERT
TEXTS = ["a football match today", "stock prices fell sharply after the report"]


def tiny(**settings):
    model, tok = load_model("tiny", LABELS, seed=0)
    torch.manual_seed(1)
    model = hyperadapter.inject(model, C2ASettings(**settings))
    return model.eval(), tok


def batch(tok, **padding):
    return dict(tok(TEXTS, padding=padding.pop("padding", True), return_tensors="pt", **padding))


def logits(model, inputs, label_dist=None):
    set_condition(model, label_dist)
    with torch.no_grad():
        return model(**inputs).logits


def sites(model) -> list[HyperAdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, HyperAdaptedLinear)]


def test_generated_adapter_shapes_and_sites():
    model, _ = tiny(r=4)
    hyper = hyperadapter.hypernetwork_of(model)
    w1, w2 = hyper.generate(torch.randn(3, 5, HIDDEN), layer=1)
    assert w1.shape == (HIDDEN, 4) and w2.shape == (4, HIDDEN)
    assert hyper.basis().shape == (8, HIDDEN * 4)
    assert len(sites(model)) == 2 * LAYERS
    assert len(sites(tiny(sites="ffn")[0])) == LAYERS
    only_top = sites(tiny(sites="attention", layers=[1])[0])
    assert [s.layer for s in only_top] == [1]
    assert hyperadapter.num_sites(C2ASettings(layers=[1]), LAYERS) == 2


def test_trainable_tensors_are_the_hypernetwork_and_head():
    model, _ = tiny()
    r, c, k = 16, 32, 8
    hyper = (
        k * r * c  # lower
        + c * HIDDEN  # higher
        + HIDDEN * r  # bias
        + (LABELS * k + k)  # label embedding
        + (HIDDEN * k + k)  # context embedding
        + LAYERS * k  # layer embedding
        + r  # b1
        + HIDDEN  # b2
    )
    assert count_trainable(model) == hyper + HIDDEN * LABELS + LABELS
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("LayerNorm" in n for n in frozen)
    assert all(n.startswith(("c2a.", "classifier.")) for n in trainable_state(model))


def test_weights_depend_on_the_condition_and_only_on_it():
    model, _ = tiny()
    hyper = hyperadapter.hypernetwork_of(model)
    hidden = torch.randn(2, 5, HIDDEN)
    set_condition(model, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    w1, _ = hyper.generate(hidden, 0)
    assert torch.equal(hyper.generate(hidden.clone(), 0)[0], w1)
    assert not torch.allclose(hyper.generate(hidden, 1)[0], w1)  # another layer
    assert not torch.allclose(hyper.generate(torch.randn(2, 5, HIDDEN), 0)[0], w1)  # context
    set_condition(model, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert not torch.allclose(hyper.generate(hidden, 0)[0], w1)  # label distribution
    set_condition(model, None)
    uniform = hyper.generate(hidden, 0)[0]
    set_condition(model, torch.full((LABELS,), 0.25))
    assert torch.equal(hyper.generate(hidden, 0)[0], uniform)


def test_w1_and_w2_hold_the_same_numbers():
    model, _ = tiny(r=4)
    w1, w2 = hyperadapter.hypernetwork_of(model).generate(torch.randn(2, 3, HIDDEN), 0)
    assert torch.equal(w1.flatten(), w2.flatten())  # a reshape of one vector...
    assert not torch.equal(w1.T.contiguous(), w2)  # ...not a transpose


def test_gradients_reach_every_hypernetwork_parameter():
    model, tok = tiny()
    model.train()
    inputs = batch(tok)
    labels = torch.tensor([0, 1])
    set_condition(model, hyperadapter.label_distribution(labels, LABELS))
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
    loss.backward()
    for name, p in hyperadapter.hypernetwork_of(model).named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_zeroed_generator_is_the_frozen_backbone_plus_head():
    plain, tok = load_model("tiny", LABELS, seed=0)
    plain.eval()
    model, _ = tiny()
    hyper = hyperadapter.hypernetwork_of(model)
    with torch.no_grad():
        for p in (hyper.lower, hyper.higher, hyper.bias, hyper.b2):
            p.zero_()
        hyper.b1.fill_(0.3)  # b1 alone cannot move the output: W2 is zero
    inputs = batch(tok)
    with torch.no_grad():
        expected = plain(**inputs).logits
    torch.testing.assert_close(logits(model, inputs, torch.tensor([1.0, 0, 0, 0])), expected)
    # and scale 0 switches a trained generator off the same way
    model, _ = tiny(scale=0.0)
    with torch.no_grad():
        hyperadapter.hypernetwork_of(model).b2.zero_()
    torch.testing.assert_close(logits(model, inputs), expected)


@pytest.mark.parametrize("padding, same", [("masked", True), ("unmasked", False)])
def test_padding_changes_the_context_only_when_unmasked(padding, same):
    model, tok = tiny(context_padding=padding)
    hyper = hyperadapter.hypernetwork_of(model)
    generate, weights = hyper.generate, []

    def recording(hidden, layer):
        generated = generate(hidden, layer)
        weights.append(generated[0])
        return generated

    hyper.generate = recording
    short = batch(tok)
    long = batch(tok, padding="max_length", max_length=short["input_ids"].shape[1] + 9)
    a, b = logits(model, short), logits(model, long)
    assert len(weights) == 2 * 2 * LAYERS
    half = len(weights) // 2
    for w_short, w_long in zip(weights[:half], weights[half:], strict=True):
        assert torch.allclose(w_short, w_long, atol=1e-6) == same
    if same:
        torch.testing.assert_close(a, b)


def test_mask_comes_from_each_call_also_in_a_deep_copy():
    model, tok = tiny()
    inputs = batch(tok)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone(**inputs)
    assert hyperadapter.hypernetwork_of(model).attention_mask is None
    assert torch.equal(hyperadapter.hypernetwork_of(clone).attention_mask, inputs["attention_mask"])
    assert sites(clone)[0]._hypernetwork[0] is hyperadapter.hypernetwork_of(clone)


def test_trainable_state_round_trip_reproduces_logits():
    model, tok = tiny()
    inputs = batch(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    saved = trainable_state(model)
    before = logits(model, inputs, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    assert not torch.allclose(logits(model, inputs, torch.tensor([0.1, 0.2, 0.3, 0.4])), before)
    load_trainable_state(model, saved)
    assert torch.equal(logits(model, inputs, torch.tensor([0.1, 0.2, 0.3, 0.4])), before)


def test_label_distribution_and_condition_checks():
    dist = hyperadapter.label_distribution(torch.tensor([0, 0, 3, 1]), LABELS)
    assert dist.tolist() == [0.5, 0.25, 0.0, 0.25]
    model, _ = tiny()
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        set_condition(model, torch.ones(3))
    with pytest.raises(ValueError, match="already"):
        hyperadapter.inject(model, C2ASettings())
    with pytest.raises(ValueError, match="extra"):
        C2ASettings(rank=3)


def test_generation_flops():
    settings = dict(hidden=384, num_labels=4, num_layers=6, batch_size=32, seq_len=64)
    both = hyperadapter.generation_flops(C2ASettings(), training=False, **settings)
    ffn = hyperadapter.generation_flops(C2ASettings(sites="ffn"), training=False, **settings)
    assert both == pytest.approx(2 * ffn)
    assert hyperadapter.generation_flops(C2ASettings(), training=True, **settings) == 3 * both
    # the per-token application dominates: 12 sites x 2 matmuls x 2 FLOPs x d x r per token
    assert both > 12 * 2 * 2 * 384 * 16 * 32 * 64
