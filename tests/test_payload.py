"""Payload codec: round trips, honest byte counts, and rejection of corrupted updates."""

from __future__ import annotations

import pytest
import torch

from fedpeft.payload import PayloadError, decode, encode


def state():
    return {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(4)}


def test_round_trip_is_exact_and_bytes_cover_the_tensors():
    blob = encode(state())
    back = decode(blob, expected=state())
    assert all(torch.equal(back[k], v) for k, v in state().items())
    assert len(blob) >= (6 + 4) * 4  # the raw float32 data, plus a small header
    assert len(blob) < (6 + 4) * 4 + 256


def test_corrupted_bytes_are_rejected():
    blob = bytearray(encode(state()))
    with pytest.raises(PayloadError, match="does not decode"):
        decode(bytes(blob[:20]))
    blob[-4:] = b"\xff\xff\xff\x7f"  # a NaN in the last float
    with pytest.raises(PayloadError, match="NaN or inf"):
        decode(bytes(blob))


def test_mismatched_update_is_rejected():
    expected = state()
    other = dict(expected)
    other["b.bias"] = torch.ones(5)
    with pytest.raises(PayloadError, match="b.bias"):
        decode(encode(other), expected=expected)
    with pytest.raises(PayloadError, match="lacks"):
        decode(encode({"a.weight": expected["a.weight"]}), expected=expected)
    with pytest.raises(PayloadError, match="unexpected"):
        decode(encode({**expected, "c": torch.zeros(1)}), expected=expected)
