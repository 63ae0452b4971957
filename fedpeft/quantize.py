"""8-bit quantisation of the tensors a message carries (FTQ: full fine-tuning, quantised updates).

Each floating tensor ``t`` is sent as int8 codes ``q = round(t / s)`` in ``[-127, 127]`` plus fp32
scales ``s = max|t| / 127``, one per row for matrices (per output unit: rows of a weight differ in
range) and one per tensor otherwise. The receiver rebuilds ``q * s``; the error per value is at
most ``s / 2``. Uploads quantise the *update* ``trained - received`` (small, zero-centred values)
and the server adds it back to what it sent; downloads, when quantised, carry the weights
themselves. Packed states are ordinary tensors, so ``payload.encode`` serialises them and the
counted bytes are the real int8 bytes (about a quarter of fp32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]
SCALE_SUFFIX = ".__scale__"
MODES = ("none", "int8")


def _scale(t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 2:
        peak = t.abs().reshape(t.shape[0], -1).amax(dim=1)
        peak = peak.reshape(-1, *([1] * (t.dim() - 1)))
    else:
        peak = t.abs().amax()
    return (peak / 127.0).clamp(min=1e-12).float()


def pack_int8(state: Mapping[str, torch.Tensor]) -> State:
    """Floating tensors -> int8 codes + ``<name>.__scale__``; other tensors pass through."""
    packed: State = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            packed[name] = t
            continue
        scale = _scale(t.float())
        packed[name] = torch.round(t.float() / scale).clamp(-127, 127).to(torch.int8)
        packed[name + SCALE_SUFFIX] = scale
    return packed


def unpack_int8(packed: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> State:
    """Inverse of ``pack_int8``; ``dtypes`` gives each tensor's original dtype."""
    state: State = {}
    for name, t in packed.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = packed.get(name + SCALE_SUFFIX)
        value = t.float() * scale if scale is not None else t
        state[name] = value.to(dtypes.get(name, value.dtype))
    return state


def encode_update(
    trained: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> State:
    """What a client sends: int8 of ``trained - reference`` (of ``trained`` where no reference)."""
    delta = {
        name: t - reference[name] if name in reference and t.is_floating_point() else t
        for name, t in trained.items()
    }
    return pack_int8(delta)


def decode_update(
    packed: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
) -> State:
    """What the server rebuilds: ``reference + dequantised delta``, in the expected dtypes."""
    delta = unpack_int8(packed, {name: t.dtype for name, t in expected.items()})
    return {
        name: reference[name] + d if name in reference and d.is_floating_point() else d
        for name, d in delta.items()
    }
