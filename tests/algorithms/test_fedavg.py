"""FedAvg arithmetic against numbers worked out by hand."""

import pytest
import torch

from fedpeft.algorithms.fedavg import fedavg, weighted_average


def test_weighted_average_two_states_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = weighted_average([a, b], [1.0, 3.0])
    # fractions 1/4 and 3/4: w = 0.25*[1, 2] + 0.75*[3, 6] = [0.25 + 2.25, 0.5 + 4.5]
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    # b = 0.25*0 + 0.75*4
    assert torch.equal(out["b"], torch.tensor([3.0]))


def test_weighted_average_three_states_by_hand():
    states = [
        {"x": torch.tensor([[1.0]])},
        {"x": torch.tensor([[2.0]])},
        {"x": torch.tensor([[6.0]])},
    ]
    out = weighted_average(states, [1, 1, 2])
    # (1*1 + 1*2 + 2*6) / 4 = 15 / 4
    assert out["x"].shape == (1, 1)
    assert out["x"].item() == 3.75


def test_weights_need_not_be_normalised():
    states = [{"x": torch.tensor([0.0])}, {"x": torch.tensor([10.0])}]
    assert weighted_average(states, [2, 8])["x"].item() == pytest.approx(8.0)
    assert weighted_average(states, [0.2, 0.8])["x"].item() == pytest.approx(8.0)


def test_zero_weight_client_is_ignored():
    states = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([100.0])}]
    assert weighted_average(states, [1, 0])["x"].item() == 1.0


def test_mismatched_keys_name_the_key():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match="'b'"):
        weighted_average([a, {"w": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="'extra'"):
        weighted_average([a, {**a, "extra": torch.zeros(1)}], [1, 1])


def test_mismatched_shapes_name_the_key():
    with pytest.raises(ValueError, match="'w'"):
        weighted_average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1])


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [-1, -1]])
def test_bad_weights_rejected(weights):
    states = [{"x": torch.zeros(1)}, {"x": torch.ones(1)}]
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average(states, weights)


def test_length_mismatch_and_empty_rejected():
    with pytest.raises(ValueError):
        weighted_average([{"x": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([], [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    states = [
        {"x": torch.tensor([1.0, 3.0], dtype=dtype)},
        {"x": torch.tensor([3.0, 5.0], dtype=dtype)},
    ]
    out = weighted_average(states, [1, 1])
    assert out["x"].dtype == dtype
    assert torch.equal(out["x"], torch.tensor([2.0, 4.0], dtype=dtype))


def test_float64_accumulation_keeps_small_contributions_in_half_precision():
    # 1000 clients at 1.0 and one at 2048, equal weights: (1000 + 2048) / 1001 = 3.04496...
    # Summing weight * value in float16 drifts to 3.025; the float64 sum lands on the nearest
    # float16 to the true mean.
    states = [{"x": torch.tensor([1.0], dtype=torch.float16)} for _ in range(1000)]
    states.append({"x": torch.tensor([2048.0], dtype=torch.float16)})
    out = weighted_average(states, [1] * 1001)
    assert out["x"].item() == torch.tensor(3048 / 1001, dtype=torch.float16).item()


def test_integer_buffers_take_the_first_state():
    a = {"w": torch.tensor([0.0]), "ids": torch.tensor([0, 1, 2])}
    b = {"w": torch.tensor([2.0]), "ids": torch.tensor([7, 7, 7])}
    out = weighted_average([a, b], [1, 1])
    assert torch.equal(out["ids"], torch.tensor([0, 1, 2]))
    assert out["ids"].dtype == torch.int64
    assert out["w"].item() == 1.0


def test_inputs_not_mutated_and_result_not_aliased():
    a = {"w": torch.tensor([1.0])}
    b = {"w": torch.tensor([3.0])}
    out = weighted_average([a, b], [1, 1])
    out["w"] += 10
    assert a["w"].item() == 1.0 and b["w"].item() == 3.0


def test_fedavg_weights_by_num_samples():
    glob = {"w": torch.tensor([0.0])}
    clients = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
    # (10*1 + 30*4) / 40 = 130 / 40
    assert fedavg(glob, clients, [10, 30])["w"].item() == 3.25


def test_fedavg_equal_weights_is_the_mean():
    torch.manual_seed(0)
    clients = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(5)]
    out = fedavg({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, clients, [7] * 5)
    for key in ("w", "b"):
        mean = torch.stack([c[key] for c in clients]).mean(0)
        torch.testing.assert_close(out[key], mean)


def test_fedavg_clients_must_match_global_keys():
    glob = {"w": torch.zeros(1), "lora_B": torch.zeros(1)}
    with pytest.raises(ValueError, match="'lora_B'"):
        fedavg(glob, [{"w": torch.zeros(1)}], [1])
