"""What travels between server and clients: trainable tensors serialised with safetensors.

Both engines encode every message with these functions, so the bytes counted are the bytes sent.
A payload that does not decode, or whose tensors do not match what the receiver expects, is
rejected with ``PayloadError`` instead of being averaged into the global model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

State = dict[str, torch.Tensor]


class PayloadError(ValueError):
    """A corrupted or mismatched update, said in one line."""


def encode(state: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({name: t.detach().contiguous().cpu() for name, t in state.items()})


def decode(data: bytes, expected: Mapping[str, torch.Tensor] | None = None) -> State:
    """Bytes -> tensors; with ``expected``, keys, shapes and dtypes must match it exactly."""
    try:
        state = st_load(data)
    except Exception as err:
        raise PayloadError(f"payload does not decode as safetensors ({len(data)} bytes)") from err
    if expected is not None:
        check_matches(state, expected)
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PayloadError(f"payload tensor '{name}' holds NaN or inf")
    return state


def check_matches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = expected.keys() - state.keys()
    extra = state.keys() - expected.keys()
    if missing:
        raise PayloadError(f"payload lacks tensor '{sorted(missing)[0]}'")
    if extra:
        raise PayloadError(f"payload has unexpected tensor '{sorted(extra)[0]}'")
    for name, ref in expected.items():
        got = state[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise PayloadError(
                f"payload tensor '{name}' is {got.dtype} {tuple(got.shape)}, "
                f"expected {ref.dtype} {tuple(ref.shape)}"
            )
