"""int8 update quantisation: bounded round-trip error, real byte savings, end to end in the engine."""

from __future__ import annotations

import torch

from fedpeft import payload, quantize
from tests.conftest import tiny_config
from tests.engine.test_local import metrics, run_once


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(64, 128, generator=g),
        "layer.bias": torch.randn(64, generator=g) * 0.01,
        "head.weight": torch.randn(4, 64, generator=g) * 3,
        "step": torch.tensor([7], dtype=torch.int64),
    }


def test_round_trip_error_is_at_most_half_a_step():
    state = _state()
    packed = quantize.pack_int8(state)
    assert packed["layer.weight"].dtype == torch.int8
    back = quantize.unpack_int8(packed, {k: t.dtype for k, t in state.items()})
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        if not t.is_floating_point():
            assert torch.equal(back[name], t)
            continue
        if t.dim() >= 2:  # one scale per row
            step = t.abs().amax(dim=1, keepdim=True) / 127
        else:
            step = t.abs().amax() / 127
        assert ((back[name] - t).abs() <= step / 2 + 1e-7).all(), name


def test_update_is_quantised_relative_to_what_was_received():
    received = _state(0)
    trained = {
        k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in received.items()
    }
    packed = quantize.encode_update(trained, received)
    rebuilt = quantize.decode_update(packed, received, trained)
    for name, t in trained.items():
        if t.is_floating_point():
            delta = (t - received[name]).abs().max()
            assert (rebuilt[name] - t).abs().max() <= delta / 127  # error scales with the update


def test_real_bytes_shrink_about_four_times():
    state = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    plain = len(payload.encode(state))
    packed = len(payload.encode(quantize.pack_int8(state)))
    assert plain / packed > 3.5


def test_engine_counts_quantised_bytes_and_still_learns(tmp_path, toy_data):
    config = tiny_config(toy_data, method="full", rounds=1)
    plain, plain_run = run_once(tmp_path / "plain", **config)
    q, q_run = run_once(tmp_path / "q", **config, quantize="int8", quantize_download=True)
    up_plain, up_q = metrics(plain_run)[0]["bytes_up"], metrics(q_run)[0]["bytes_up"]
    down_plain, down_q = metrics(plain_run)[0]["bytes_down"], metrics(q_run)[0]["bytes_down"]
    assert 3.5 < up_plain / up_q < 4.1 and 3.5 < down_plain / down_q < 4.1
    assert abs(q["final_accuracy"] - plain["final_accuracy"]) <= 0.15
