"""Device and network cost model: FLOPs of local training, turned into simulated seconds.

We run every client on one CPU, but the systems we reproduce (AutoFedNLP above all) judge a run by
time-to-accuracy on phones and embedded boards over slow links. So each client is given a device and
a network profile, and a round costs what the slowest sampled client would need there:

    client time = train FLOPs / device FLOP/s + bytes up / up-rate + bytes down / down-rate
    round time  = max over the round's clients

FLOPs per sample, one transformer layer (hidden h, feed-forward i, sequence s, extra prefix keys
p, key/value width k = h * kv_heads / heads, m = 3 feed-forward matrices with a gate, else 2):

    matmuls    2 * (2 h^2 + 2 h k + m h i) * s  Q and O, K and V, the feed-forward matrices
    attention  2 * 2 * s * (s + p) * h          scores Q K^T and the weighted sum of V
    head       2 * (h^2 + h * num_labels)       pooler and classifier, on one token (decoder
                                                heads have no h x h layer: 2 h num_labels)

A BERT layer (k = h, m = 2) is 2 * (4 h^2 + 2 h i) * s; a LLaMA layer with grouped-query
attention has k < h and m = 3. Causal attention is counted in full (eager attention computes the
whole score matrix).

A training step costs the forward pass, the backward pass for activations and the weight gradients:

    forward    all layers, or only layers >= the lowest trainable one when their input is cached
    act. grad  layers >= the lowest trainable one (all layers if embeddings train): their matmuls
               once more, attention twice (both operands are activations), the head once more
    weight grad  2 * trainable_params * s  (a matmul weight's gradient costs what its forward did)

With everything trainable this is 3x the forward pass, the usual rule of thumb (Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", Sec. 2.1). Cheaper PEFT configurations save the frozen
layers' backward, and AutoFedNLP's activation cache also saves their forward. LayerNorm, softmax,
GELU, biases and the optimiser update are left out (a few per cent). Sources and assumptions for
the profiles are in docs/cost_model.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GIGA = 1e9
MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    """A client device; ``flops_per_s`` is sustained fp32 FLOP/s for transformer training, not peak."""

    name: str
    flops_per_s: float
    note: str


@dataclass(frozen=True)
class NetworkProfile:
    """A client's link to the server, in bytes per second each way."""

    name: str
    up_bytes_per_s: float
    down_bytes_per_s: float
    note: str


DEVICES: dict[str, DeviceProfile] = {
    profile.name: profile
    for profile in (
        DeviceProfile(
            "jetson_tx2",
            200 * GIGA,
            "Pascal GPU, 256 CUDA cores x 2 FLOP x 1.30 GHz = 666 GFLOP/s fp32 peak; 30% sustained",
        ),
        DeviceProfile(
            "raspberry_pi4",
            10 * GIGA,
            "4x Cortex-A72 @ 1.5 GHz x 8 fp32 FLOP/cycle = 48 GFLOP/s peak; ~20% sustained",
        ),
        DeviceProfile(
            "phone",
            30 * GIGA,
            "Snapdragon 865 big cores (4x Cortex-A77, 1x2.84 + 3x2.42 GHz) x 16 FLOP/cycle "
            "= 162 GFLOP/s peak; ~20% sustained under thermal limits",
        ),
        DeviceProfile(
            "laptop",
            80 * GIGA,
            "2-core x86 CPU like the dev box: 150-185 GFLOP/s measured fp32 matmul, "
            "79-95 GFLOP/s measured training a MiniLM-L6-shaped BERT",
        ),
    )
}

NETWORKS: dict[str, NetworkProfile] = {
    profile.name: profile
    for profile in (
        NetworkProfile(
            "reference_1mbps", 1e6, 1e6, "1 MB/s both ways, AutoFedNLP/FedAdapter's default"
        ),
        NetworkProfile("wifi", 20 * MBIT, 50 * MBIT, "assumed home Wi-Fi: 50 Mbit/s down, 20 up"),
        NetworkProfile("lte", 5 * MBIT, 20 * MBIT, "assumed typical LTE: 20 Mbit/s down, 5 up"),
        NetworkProfile(
            "3g", 0.384 * MBIT, 2 * MBIT, "assumed HSPA: 2 Mbit/s down, 384 kbit/s (UMTS) up"
        ),
    )
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that its FLOPs depend on.

    ``heads``/``kv_heads``: attention heads and key/value heads (grouped-query attention has
    fewer of the latter); None for both means keys and values are as wide as the hidden state.
    ``gated_mlp``: the feed-forward block has a gate projection (LLaMA: 3 matrices, not 2).
    ``head_dense``: the head has an h x h layer (BERT's pooler, RoBERTa's and DistilBERT's
    dense layer) before the classifier.
    """

    num_layers: int
    hidden: int
    intermediate: int
    vocab_size: int
    num_labels: int
    heads: int | None = None
    kv_heads: int | None = None
    gated_mlp: bool = False
    head_dense: bool = True

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden", "intermediate", "vocab_size", "num_labels"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelDims.{field} must be positive, got {getattr(self, field)}")
        if (self.heads is None) != (self.kv_heads is None):
            raise ValueError("ModelDims.heads and kv_heads are given together or not at all")

    @property
    def kv_width(self) -> int:
        """Output width of the key (and of the value) projection."""
        if self.heads is None or self.kv_heads is None:
            return self.hidden
        return self.hidden * self.kv_heads // self.heads

    @classmethod
    def from_hf_config(cls, config: Any, num_labels: int) -> ModelDims:
        """From a transformers config of a supported family (``fedpeft.models.families``)."""
        from fedpeft.models.families import family_for_config

        family = family_for_config(config)
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=family.intermediate_size(config),
            vocab_size=config.vocab_size,
            num_labels=num_labels,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            gated_mlp=family.gated_mlp,
            head_dense=family.head_dense,
        )


def _matmul_flops(dims: ModelDims, seq_len: int) -> float:
    """One layer's weight matmuls per sample: Q and O (2 h^2), K and V (2 h k) and the FFN
    (2 or, with a gate, 3 h i), 2 FLOPs per multiply-add."""
    h, i, k = dims.hidden, dims.intermediate, dims.kv_width
    ffn = 3 if dims.gated_mlp else 2
    return 2.0 * (2 * h * h + 2 * h * k + ffn * h * i) * seq_len


def _attention_flops(dims: ModelDims, seq_len: int, extra_kv: int) -> float:
    """One layer's Q K^T and attention-weighted V per sample; prefix tuning adds extra_kv keys."""
    return 2.0 * 2 * seq_len * (seq_len + extra_kv) * dims.hidden


def _head_flops(dims: ModelDims) -> float:
    """Pooler (h x h, when the head has one) and classifier (h x labels), on one pooled vector."""
    dense = dims.hidden * dims.hidden if dims.head_dense else 0
    return 2.0 * (dense + dims.hidden * dims.num_labels)


def _check_layer(dims: ModelDims, layer: int, what: str) -> None:
    if not 0 <= layer <= dims.num_layers:
        raise ValueError(f"{what} must be in [0, {dims.num_layers}], got {layer}")


def layer_forward_flops(dims: ModelDims, seq_len: int, extra_kv: int = 0) -> float:
    """Forward FLOPs of one transformer layer for one sample."""
    return _matmul_flops(dims, seq_len) + _attention_flops(dims, seq_len, extra_kv)


def forward_flops(
    dims: ModelDims, seq_len: int, *, extra_kv: int = 0, start_layer: int = 0
) -> float:
    """Forward FLOPs for one sample through layers start_layer..L-1 and the classifier head.

    start_layer > 0 when the lower layers are skipped because their output is cached.
    """
    _check_layer(dims, start_layer, "start_layer")
    layers = dims.num_layers - start_layer
    return layers * layer_forward_flops(dims, seq_len, extra_kv) + _head_flops(dims)


def train_flops(
    dims: ModelDims,
    seq_len: int,
    num_samples: int,
    *,
    lowest_trainable_layer: int,
    trainable_params: int,
    embeddings_trainable: bool = False,
    extra_kv: int = 0,
    cached_below: bool = False,
) -> float:
    """FLOPs to train on num_samples samples (one pass): forward, activation and weight gradients.

    ``lowest_trainable_layer``: index of the lowest layer holding a trainable tensor (L when only the
    head trains). ``trainable_params``: trainable parameters that act per token (matmul weights,
    biases, LoRA/adapter/prefix weights), excluding embedding tables, whose gradient is a cheap
    sparse row update. ``cached_below``: the input of the lowest trainable layer comes from a cache,
    so the frozen layers below it are not run at all.
    """
    _check_layer(dims, lowest_trainable_layer, "lowest_trainable_layer")
    if trainable_params < 0 or num_samples < 0:
        raise ValueError("trainable_params and num_samples must be >= 0")
    if cached_below and embeddings_trainable:
        raise ValueError("cannot cache below the trainable layers when the embeddings train")

    start = lowest_trainable_layer if cached_below else 0
    forward = forward_flops(dims, seq_len, extra_kv=extra_kv, start_layer=start)
    grad_from = 0 if embeddings_trainable else lowest_trainable_layer
    per_layer_backward = _matmul_flops(dims, seq_len) + 2 * _attention_flops(
        dims, seq_len, extra_kv
    )
    activation_grads = (dims.num_layers - grad_from) * per_layer_backward + _head_flops(dims)
    weight_grads = 2.0 * trainable_params * seq_len
    return num_samples * (forward + activation_grads + weight_grads)


def eval_flops(dims: ModelDims, seq_len: int, num_samples: int, extra_kv: int = 0) -> float:
    """FLOPs to evaluate num_samples samples: forward passes only."""
    return num_samples * forward_flops(dims, seq_len, extra_kv=extra_kv)


def compute_time_s(flops: float, device: DeviceProfile) -> float:
    """Simulated seconds for the device to compute flops."""
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops}")
    return flops / device.flops_per_s


def comm_time_s(bytes_up: int, bytes_down: int, network: NetworkProfile) -> float:
    """Simulated seconds to upload and download; transfers are sequential, latency ignored."""
    if bytes_up < 0 or bytes_down < 0:
        raise ValueError("byte counts must be >= 0")
    return bytes_up / network.up_bytes_per_s + bytes_down / network.down_bytes_per_s


def _lookup(names: Sequence[str], table: dict, what: str) -> list:
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown!r}; valid: {', '.join(table)}")
    return [table[name] for name in names]


def _proportional_counts(total: int, weights: Sequence[float] | None, size: int) -> list[int]:
    """Split total into size integer counts proportional to weights (largest remainder)."""
    weights = [1.0] * size if weights is None else [float(w) for w in weights]
    if len(weights) != size:
        raise ValueError(f"got {len(weights)} weights for {size} profiles")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(size), key=lambda k: exact[k] - counts[k], reverse=True)
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def assign_profiles(
    num_clients: int,
    devices: Sequence[str],
    networks: Sequence[str],
    seed: int,
    device_weights: Sequence[float] | None = None,
    network_weights: Sequence[float] | None = None,
) -> list[tuple[DeviceProfile, NetworkProfile]]:
    """A (device, network) pair per client: a heterogeneous population, the same for a given seed.

    Each profile gets its share of clients in proportion to its weight (equal when None), rounded
    by largest remainder, so 10 clients over two devices are exactly 5 and 5. Devices and networks
    are then shuffled independently with the seed.
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    device_profiles = _lookup(devices, DEVICES, "device")
    network_profiles = _lookup(networks, NETWORKS, "network")
    rng = random.Random(seed)

    def spread(profiles: list, weights: Sequence[float] | None) -> list:
        counts = _proportional_counts(num_clients, weights, len(profiles))
        pool = [p for p, count in zip(profiles, counts, strict=True) for _ in range(count)]
        rng.shuffle(pool)
        return pool

    return list(
        zip(
            spread(device_profiles, device_weights),
            spread(network_profiles, network_weights),
            strict=True,
        )
    )


def round_time_s(client_times: Sequence[float]) -> float:
    """A synchronous round lasts as long as its slowest sampled client."""
    if not client_times:
        raise ValueError("round_time_s needs at least one client time")
    return max(client_times)
