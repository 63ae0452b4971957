"""Cost model: FLOP counts worked out by hand for a tiny model, times, profile assignment."""

import pytest
from transformers import BertConfig, BertForSequenceClassification

from fedpeft.cost import (
    DEVICES,
    NETWORKS,
    DeviceProfile,
    ModelDims,
    NetworkProfile,
    assign_profiles,
    comm_time_s,
    compute_time_s,
    eval_flops,
    forward_flops,
    layer_forward_flops,
    round_time_s,
    train_flops,
)

# L=2 layers, h=4, i=8, 2 labels, sequence length 3.
TINY = ModelDims(num_layers=2, hidden=4, intermediate=8, vocab_size=10, num_labels=2)
SEQ = 3
# matmuls per layer: 2 * (4*4^2 + 2*4*8) * 3 = 2 * 128 * 3 = 768
# attention per layer: 2 * 2 * 3 * 3 * 4 = 144
# head: 2 * (4^2 + 4*2) = 48
MATMUL, ATTN, HEAD = 768, 144, 48


def test_layer_forward_by_hand():
    assert layer_forward_flops(TINY, SEQ) == MATMUL + ATTN == 912
    # two prefix keys: attention 2 * 2 * 3 * (3 + 2) * 4 = 240, matmuls unchanged
    assert layer_forward_flops(TINY, SEQ, extra_kv=2) == 768 + 240


def test_forward_by_hand():
    assert forward_flops(TINY, SEQ) == 2 * 912 + HEAD == 1872
    assert forward_flops(TINY, SEQ, start_layer=1) == 912 + HEAD == 960
    assert forward_flops(TINY, SEQ, start_layer=2) == HEAD
    assert eval_flops(TINY, SEQ, num_samples=5) == 5 * 1872


def test_train_full_by_hand():
    flops = train_flops(TINY, SEQ, 1, lowest_trainable_layer=0, trainable_params=100)
    # forward 1872 + activation grads 2 * (768 + 2 * 144) + 48 = 2160 + weight grads 2 * 100 * 3 = 600
    assert flops == 1872 + 2160 + 600 == 4632
    assert train_flops(TINY, SEQ, 4, lowest_trainable_layer=0, trainable_params=100) == 4 * 4632


def test_train_top_layer_only_by_hand():
    flops = train_flops(TINY, SEQ, 1, lowest_trainable_layer=1, trainable_params=50)
    # forward 1872 + activation grads 1 * (768 + 288) + 48 = 1104 + weight grads 2 * 50 * 3 = 300
    assert flops == 1872 + 1104 + 300 == 3276


def test_cached_below_saves_exactly_the_skipped_layers_forward():
    for lowest in range(TINY.num_layers + 1):
        kwargs = {"lowest_trainable_layer": lowest, "trainable_params": 40, "extra_kv": 1}
        full = train_flops(TINY, SEQ, 7, **kwargs)
        cached = train_flops(TINY, SEQ, 7, cached_below=True, **kwargs)
        assert full - cached == pytest.approx(
            7 * lowest * layer_forward_flops(TINY, SEQ, extra_kv=1)
        )


def test_trainable_embeddings_need_gradients_through_every_layer():
    top_only = train_flops(TINY, SEQ, 1, lowest_trainable_layer=2, trainable_params=10)
    with_embeddings = train_flops(
        TINY, SEQ, 1, lowest_trainable_layer=2, trainable_params=10, embeddings_trainable=True
    )
    assert with_embeddings - top_only == 2 * (768 + 288)
    with pytest.raises(ValueError):
        train_flops(
            TINY,
            SEQ,
            1,
            lowest_trainable_layer=1,
            trainable_params=1,
            embeddings_trainable=True,
            cached_below=True,
        )


def test_full_fine_tuning_is_about_three_forwards():
    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        vocab_size=100,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    per_token = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." not in n)
    dims = ModelDims.from_hf_config(config, num_labels=3)
    assert dims == ModelDims(2, 64, 256, 100, 3, heads=4, kv_heads=4)
    for seq in (16, 128):
        train = train_flops(dims, seq, 1, lowest_trainable_layer=0, trainable_params=per_token)
        assert train / forward_flops(dims, seq) == pytest.approx(3.0, rel=0.03)


def test_fewer_trainable_layers_cost_less():
    dims = ModelDims(6, 384, 1536, 30522, 2)
    costs = [
        train_flops(
            dims, 128, 1, lowest_trainable_layer=k, trainable_params=10_000, cached_below=True
        )
        for k in range(7)
    ]
    assert costs == sorted(costs, reverse=True)


@pytest.mark.parametrize("bad", [-1, 3])
def test_layer_out_of_range(bad):
    with pytest.raises(ValueError, match="lowest_trainable_layer"):
        train_flops(TINY, SEQ, 1, lowest_trainable_layer=bad, trainable_params=1)
    with pytest.raises(ValueError, match="start_layer"):
        forward_flops(TINY, SEQ, start_layer=bad)


def test_bad_dims():
    with pytest.raises(ValueError, match="hidden"):
        ModelDims(num_layers=2, hidden=0, intermediate=8, vocab_size=10, num_labels=2)


def test_times_are_work_over_rate():
    device = DeviceProfile("d", flops_per_s=2e9, note="")
    assert compute_time_s(6e9, device) == 3.0
    net = NetworkProfile("n", up_bytes_per_s=1e6, down_bytes_per_s=4e6, note="")
    # 2 MB up at 1 MB/s + 8 MB down at 4 MB/s = 2 s + 2 s
    assert comm_time_s(2_000_000, 8_000_000, net) == 4.0
    with pytest.raises(ValueError):
        compute_time_s(-1.0, device)


def test_reference_network_is_one_megabyte_per_second():
    ref = NETWORKS["reference_1mbps"]
    assert comm_time_s(3_000_000, 1_000_000, ref) == 4.0


def test_required_profiles_present_and_ordered_sensibly():
    assert {"jetson_tx2", "raspberry_pi4", "phone", "laptop"} <= set(DEVICES)
    assert {"reference_1mbps", "wifi", "lte", "3g"} <= set(NETWORKS)
    assert DEVICES["raspberry_pi4"].flops_per_s < DEVICES["phone"].flops_per_s
    assert DEVICES["phone"].flops_per_s < DEVICES["jetson_tx2"].flops_per_s
    rates = [NETWORKS[n].down_bytes_per_s for n in ("3g", "lte", "wifi")]
    assert rates == sorted(rates)
    for profile in (*DEVICES.values(), *NETWORKS.values()):
        assert profile.note


def test_assignment_is_deterministic_and_proportional():
    a = assign_profiles(10, ["jetson_tx2", "raspberry_pi4"], ["wifi", "3g"], seed=3)
    b = assign_profiles(10, ["jetson_tx2", "raspberry_pi4"], ["wifi", "3g"], seed=3)
    c = assign_profiles(10, ["jetson_tx2", "raspberry_pi4"], ["wifi", "3g"], seed=4)
    assert a == b
    assert a != c
    assert [d.name for d, _ in a].count("jetson_tx2") == 5
    assert [n.name for _, n in a].count("3g") == 5


def test_assignment_weights():
    pairs = assign_profiles(
        10, ["phone", "laptop"], ["lte"], seed=0, device_weights=[0.7, 0.3], network_weights=None
    )
    assert [d.name for d, _ in pairs].count("phone") == 7
    assert all(n.name == "lte" for _, n in pairs)
    # 7 clients over three equal weights: 3, 2, 2 (largest remainder)
    names = [d.name for d, _ in assign_profiles(7, ["phone", "laptop", "jetson_tx2"], ["lte"], 1)]
    assert sorted(names.count(n) for n in ("phone", "laptop", "jetson_tx2")) == [2, 2, 3]
    with pytest.raises(ValueError, match="weights"):
        assign_profiles(4, ["phone", "laptop"], ["lte"], 0, device_weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        assign_profiles(4, ["phone", "laptop"], ["lte"], 0, device_weights=[0.0, 0.0])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="jetson_tx2, raspberry_pi4, phone, laptop"):
        assign_profiles(3, ["iphone"], ["wifi"], seed=0)
    with pytest.raises(ValueError, match="reference_1mbps, wifi, lte, 3g"):
        assign_profiles(3, ["phone"], ["5g"], seed=0)


def test_round_time_is_the_slowest_client():
    assert round_time_s([1.5, 7.25, 3.0]) == 7.25
    with pytest.raises(ValueError):
        round_time_s([])
