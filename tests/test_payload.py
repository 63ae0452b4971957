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


def test_decoder_never_crashes_on_arbitrary_bytes():
    """Fuzz: random blobs, truncations and bit flips of a real payload either decode to a
    state that passes the checks or raise PayloadError, never anything else."""
    import numpy as np

    rng = np.random.default_rng(0)
    good = encode(state())
    blobs = [rng.bytes(int(n)) for n in rng.integers(0, 400, size=300)]
    blobs += [good[:n] for n in range(0, len(good), 3)]
    for _ in range(300):
        flipped = bytearray(good)
        for pos in rng.integers(0, len(good), size=int(rng.integers(1, 4))):
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
        blobs.append(bytes(flipped))
    blobs += [
        b"",
        b"\x00" * 8,
        (2**63).to_bytes(8, "little") + b"{}",
        b"\x08" + b"\x00" * 7 + b"{}",
    ]
    outcomes = {"ok": 0, "rejected": 0}
    for blob in blobs:
        for expected in (None, state()):
            try:
                decoded = decode(blob, expected=expected)
            except PayloadError as err:
                assert "\n" not in str(err)
                outcomes["rejected"] += 1
            else:
                assert all(isinstance(t, torch.Tensor) for t in decoded.values())
                outcomes["ok"] += 1
    assert outcomes["rejected"] > 500 and outcomes["ok"] >= 1
