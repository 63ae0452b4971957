"""Each model family on a tiny random model: where its parts are, pooling, the activation cache,
the cost model, and loading (unsupported architectures, heads of another size, pad tokens)."""

from __future__ import annotations

import copy
import importlib
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPTNeoConfig

from fedpeft import registry
from fedpeft.cache import ActivationCache, cache_start_layer
from fedpeft.client import forward_logits
from fedpeft.cost import ModelDims, _head_flops, _matmul_flops
from fedpeft.data.sources import load_source
from fedpeft.data.tokenize import tokenize
from fedpeft.models import FAMILIES, ModelError, family_of, load_model, minilm_path
from fedpeft.models.families import TinySpec
from fedpeft.models.loading import _set_pad_token
from fedpeft.peft.adapter import AdaptedLinear
from fedpeft.peft.base import encoder_layers, trainable_parameters

NAMES = [family.name for family in FAMILIES]
SPEC = TinySpec(layers=3)


def tiny(name: str, pooling: str | None = None, labels: int = 4):
    return load_model(
        "tiny" if name == "bert" else f"tiny-{name}", labels, pooling=pooling, tiny=SPEC
    )


def inject(model, method: str, **settings):
    unit = importlib.import_module(f"fedpeft.peft.{method}")
    return unit.inject(model, registry.get(method).settings(**settings))


@pytest.mark.parametrize("name", NAMES)
def test_the_family_describes_the_model(name):
    model, tokenizer = tiny(name)
    family = family_of(model)
    assert family.name == name
    layers = encoder_layers(model)
    assert len(layers) == SPEC.layers
    for path in (*family.embeddings, *family.head, family.final_norm):
        if path is not None:
            model.get_submodule(path)  # exists
    names = {n.rpartition(".")[2] for n, _ in layers[0].named_modules()}
    assert set(family.lora_targets) <= names
    for which in ("attention", "ffn"):
        parent, attr = family.site(layers[0], which)
        weight = getattr(parent, attr).weight
        assert model.config.hidden_size in weight.shape  # projects back to the residual width
    if family.decoder:
        assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
        assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("name", NAMES)
def test_adapter_sites_sit_where_the_family_says(name):
    model, _ = tiny(name)
    family = family_of(model)
    model = inject(model, "adapter", width=4, placement="houlsby")
    for index in range(SPEC.layers):
        for path in (family.attention_output, family.ffn_output):
            site = model.get_submodule(f"{family.layers}.{index}.{path}")
            assert isinstance(site, AdaptedLinear), (index, path)
    adapted = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(adapted) == 2 * SPEC.layers


def _batch(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=True))


@pytest.mark.parametrize(
    "name,pooling", [(n, None) for n in NAMES] + [("gpt2", "mean"), ("roberta", "cls")]
)
def test_pooling_ignores_padding(name, pooling):
    """A row's logits do not depend on the padding its batch gives it (right padding)."""
    model, tokenizer = tiny(name, pooling)
    model.eval()
    texts = ["a football match", "stock prices fell sharply after the long report today"]
    together = model(**_batch(tokenizer, texts)).logits
    alone = model(**_batch(tokenizer, texts[:1])).logits
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_decoders_pool_the_last_real_token():
    model, tokenizer = tiny("llama")
    model.eval()
    batch = _batch(tokenizer, ["a football match", "stock prices fell sharply after it"])
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    pooled = hidden.last_hidden_state[torch.arange(2), last]
    assert torch.allclose(model(**batch).logits, model.score(pooled), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "method,settings",
    [("adapter", {"depth": 2, "width": 8, "placement": "houlsby"}), ("lora", {"depth": 1})],
)
def test_cached_forward_matches_whole_model(toy_data, name, method, settings):
    model, tokenizer = tiny(name)
    model = inject(model, method, **settings)
    for p in trainable_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    assert cache_start_layer(model) == SPEC.layers - settings["depth"]
    data = tokenize(load_source(str(toy_data)).train, tokenizer, 24)
    cache = ActivationCache(data, dtype="fp32")
    rows = np.array([3, 17, 5, 40, 11, 2])
    batch = data.batch(rows)

    def loss_and_grads(logits):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}

    ref_loss, ref_grads = loss_and_grads(forward_logits(model, batch))
    for _ in range(2):  # fills, then serves
        loss, grads = loss_and_grads(cache.logits(model, batch, rows))
        assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=1e-4)
        for key, grad in ref_grads.items():
            assert torch.allclose(grads[key], grad, atol=1e-5, rtol=1e-4), key
    assert cache.stats.hits == len(rows)


def _matrices(module: torch.nn.Module) -> int:
    return sum(
        p.numel() for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2
    )


@pytest.mark.parametrize("name", NAMES)
def test_cost_model_counts_each_familys_matrices(name):
    """Per token, a layer's matmuls cost 2 FLOPs per weight of its matrices; the head likewise."""
    model, _ = tiny(name, labels=3)
    family = family_of(model)
    dims = ModelDims.from_hf_config(model.config, num_labels=3)
    layer = encoder_layers(model)[0]
    assert _matmul_flops(dims, 5) == 2 * _matrices(layer) * 5
    head = sum(_matrices(model.get_submodule(path)) for path in family.head)
    if family.pooler is not None:  # BERT: the cost model counts its [CLS] pooler regardless
        head += SPEC.hidden * SPEC.hidden
    assert _head_flops(dims) == 2 * head


def test_llama_cost_by_hand():
    """h 64, 2 heads, 1 key/value head (width 32), gated MLP i 128, 3 labels."""
    model, _ = tiny("llama", labels=3)
    dims = ModelDims.from_hf_config(model.config, num_labels=3)
    assert (dims.heads, dims.kv_heads, dims.kv_width, dims.gated_mlp) == (2, 1, 32, True)
    # q, o: 64x64 each; k, v: 64x32 each; gate, up, down: 64x128 each
    assert _matmul_flops(dims, 1) == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert _head_flops(dims) == 2 * 64 * 3  # score only: no h x h layer


# per token, one layer's matrices (h 64, i 128; LLaMA: 1 key/value head of width 32, a gate)
# and the head's (3 labels): the numbers written out, family by family
BY_HAND = {
    "bert": (4 * 64 * 64 + 2 * 64 * 128, 64 * 64 + 64 * 3),  # pooler counted (docs)
    "roberta": (4 * 64 * 64 + 2 * 64 * 128, 64 * 64 + 64 * 3),  # classifier.dense + out_proj
    "distilbert": (4 * 64 * 64 + 2 * 64 * 128, 64 * 64 + 64 * 3),  # pre_classifier + classifier
    "gpt2": (4 * 64 * 64 + 2 * 64 * 128, 64 * 3),  # fused c_attn is 64 x 192; score only
    "llama": (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128, 64 * 3),
}


@pytest.mark.parametrize("name", NAMES)
def test_cost_by_hand_for_each_family(name):
    model, _ = tiny(name, labels=3)
    dims = ModelDims.from_hf_config(model.config, num_labels=3)
    layer, head = BY_HAND[name]
    assert _matmul_flops(dims, 1) == 2 * layer
    assert _head_flops(dims) == 2 * head


def test_cost_of_real_sized_decoders_by_hand():
    """GPT-2 small (n_inner unset: 4h) and a SmolLM2-135M-shaped LLaMA (9 heads, 3 key/value
    heads, gated MLP), per token and layer, against the counts written out."""
    from transformers import GPT2Config, LlamaConfig

    gpt2 = ModelDims.from_hf_config(GPT2Config(), num_labels=4)
    assert (gpt2.num_layers, gpt2.hidden, gpt2.intermediate) == (12, 768, 3072)
    assert _matmul_flops(gpt2, 1) == 2 * (4 * 768**2 + 2 * 768 * 3072)
    llama = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    dims = ModelDims.from_hf_config(llama, num_labels=4)
    assert dims.kv_width == 192
    assert _matmul_flops(dims, 1) == 2 * (2 * 576**2 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert _matmul_flops(dims, 1) == 7_077_888


def test_unsupported_architecture_is_refused_in_one_line(tmp_path):
    GPTNeoConfig(
        num_layers=2, hidden_size=32, num_heads=2, attention_types=[[["global"], 2]]
    ).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path), 2)
    message = str(err.value)
    assert "\n" not in message and "gpt_neo" in message
    for family in FAMILIES:
        assert family.name in message


def test_unknown_tiny_family_is_refused():
    with pytest.raises(ModelError, match="tiny-gpt2"):
        load_model("tiny-bart", 2)


def test_a_head_of_another_size_starts_fresh_with_a_note(tmp_path, caplog):
    model, tokenizer = tiny("roberta", labels=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedpeft.models"):
        same, _ = load_model(str(tmp_path), 3)
    assert not caplog.records
    assert torch.equal(same.classifier.out_proj.weight, model.classifier.out_proj.weight)
    with caplog.at_level(logging.WARNING, logger="fedpeft.models"):
        other, _ = load_model(str(tmp_path), 5)
    assert len(caplog.records) == 1 and "starts fresh" in caplog.records[0].getMessage()
    assert other.classifier.out_proj.weight.shape == (5, SPEC.hidden)
    assert torch.equal(
        other.roberta.embeddings.word_embeddings.weight,
        model.roberta.embeddings.word_embeddings.weight,
    )


def test_a_half_precision_checkpoint_trains_in_fp32(tmp_path):
    """Decoder checkpoints are often saved in bfloat16; fedpeft computes (and counts bytes) in
    fp32, so the weights are widened on load instead of kept in the checkpoint's dtype."""
    model, tokenizer = tiny("llama", labels=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), 3)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    weight = loaded.get_submodule("model.embed_tokens").weight
    assert torch.equal(weight, model.get_submodule("model.embed_tokens").weight.float())


def test_a_decoder_tokenizer_without_pad_token_pads_with_its_end_token():
    model, tokenizer = tiny("gpt2")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    tokenizer.padding_side = "left"
    _set_pad_token(tokenizer, model, "tiny-gpt2")
    assert tokenizer.pad_token == "[SEP]" and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.sep_token_id


def test_prefix_tuning_is_refused_where_attention_takes_no_past_keys():
    model, _ = tiny("distilbert")
    with pytest.raises(ModelError, match="distilbert"):
        inject(model, "prefix")


@pytest.mark.parametrize("name", ["roberta", "distilbert", "gpt2", "llama"])
def test_fisher_scores_equal_a_per_row_loop(toy_data, name):
    """FibecFed's vectorised per-row gradients (with the family's own additive mask: causal for
    decoders) equal plain autograd on each unpadded row."""
    from fedpeft.fisher import fisher_pass, lora_names
    from tests.methods.test_fibecfed import _slow_per_row_grads

    model, tokenizer = tiny(name)
    model = inject(model, "lora", r=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    data = tokenize(load_source(str(toy_data)).train, tokenizer, 24)
    rows = np.array([4, 0, 2, 5, 1])
    names = lora_names(model)
    result = fisher_pass(model, data, rows, names, chunk_rows=2)
    slow = _slow_per_row_grads(model, data, rows, names)
    expected = torch.stack([sum(g.pow(2).sum() for g in row.values()) for row in slow])
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("model", "pooler"), [("tiny-gpt2", "LastTokenPooler"), ("tiny-roberta", "MaskedMeanPooler")]
)
def test_a_config_without_pooling_gets_the_familys_default(model, pooler):
    from fedpeft.config import build_config
    from fedpeft.job import build_model
    from fedpeft.models.pooling import ATTACHED

    config = build_config({"model": model, "method": "lora"})
    assert config.pooling is None
    built, _tokenizer = build_model(config, 3)
    backbone = built.get_submodule(family_of(built).backbone)
    assert type(getattr(backbone, ATTACHED)).__name__ == pooler
