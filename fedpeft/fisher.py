"""Per-sample Fisher information and per-layer sensitivity of a LoRA model (FibecFed's measures).

For a row (x, y) and trainable tensors theta, the per-sample gradient g = d log p(y|x) / d theta
gives the row's empirical Fisher g g^T. Two numbers come from it:

    score(x)     = ||g||^2 = trace of the row's Fisher          (difficulty: larger = harder)
    diagonal[j]  = mean over rows of g_j^2                        (diagonal of the empirical Fisher)

Per-sample gradients are vectorised with torch.func (``functional_call`` + ``vmap(grad(...))``)
over chunks of rows: no Python loop over samples, and memory bounded by the chunk. Each row is run
as its own batch of one inside ``vmap``, with a ready-made 4-D additive attention mask (HF's mask
builder inspects the mask's contents, which ``vmap`` forbids) and eager attention (SDPA's CPU
backward has no batching rule). Scoring runs in eval mode: no dropout.

Layer sensitivity: the relative change of an encoder layer's output when its input is perturbed,

    s_l = mean over rows of ||f_l(h + d) - f_l(h)||_F / ||f_l(h)||_F,
    d_t = scale * (||h_t|| / sqrt(hidden)) * e_t,   e_t ~ N(0, I)   for each token t

with norms over the row's real tokens. One forward captures every layer's input; each layer is
then re-run once on its perturbed input. These definitions are ours (FibecFed's paper gives no
formula we could use); docs/fibecfed.md collects them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedpeft.data.tokenize import TokenizedData
from fedpeft.models.families import family_of, layer_index
from fedpeft.models.pooling import TOKEN_POOLERS
from fedpeft.peft.base import encoder_layers

State = dict[str, torch.Tensor]


def layer_of(name: str) -> int | None:
    """The transformer layer index of a parameter name (None for the head and embeddings)."""
    return layer_index(name)


def lora_names(model: nn.Module) -> list[str]:
    """The trainable LoRA tensors (A and B of every adapted linear layer), in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]


@dataclass
class FisherPass:
    scores: torch.Tensor  # [n] per-row ||grad log p(y|x)||^2, in the order of the rows given
    diagonal: State  # name -> mean over the rows of the squared per-row gradient


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and eager attention for the duration of a scoring pass; restored afterwards."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    if attention is not None:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if attention is not None:
            config._attn_implementation = attention
        model.train(was_training)


def _chunks(data: TokenizedData, rows: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
    """Positions into ``rows``, grouped by similar length so a chunk carries little padding."""
    order = np.argsort(data.lengths[rows].numpy(), kind="stable")
    for start in range(0, len(order), chunk_rows):
        yield order[start : start + chunk_rows]


def fisher_pass(
    model: nn.Module,
    data: TokenizedData,
    rows: np.ndarray,
    names: Sequence[str],
    *,
    chunk_rows: int = 32,
) -> FisherPass:
    """Per-row Fisher scores and the Fisher diagonal of the tensors ``names`` on ``data[rows]``."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("fisher_pass needs at least one row")
    params = dict(model.named_parameters())
    theta = {n: params[n].detach() for n in names}
    poolers = [m for m in model.modules() if isinstance(m, TOKEN_POOLERS)]
    causal = family_of(model).decoder

    def log_likelihood(theta, input_ids, attention_mask, token_type_ids, label):
        # one row, as a batch of one; the additive mask is built here, per row
        blocked = 1.0 - attention_mask[None, None, None, :].to(torch.float32)
        if causal:  # decoders: no key after the query either
            size = attention_mask.shape[0]
            future = torch.ones(size, size, device=blocked.device).triu(diagonal=1)
            blocked = torch.maximum(blocked, future[None, None])
        additive = blocked * torch.finfo(torch.float32).min

        def hand_mask(pooler, _args):  # mean pooling over this row's real tokens
            pooler.mask = attention_mask[None]

        hooks = [p.register_forward_pre_hook(hand_mask) for p in poolers]
        try:
            inputs = {
                "input_ids": input_ids[None],
                "attention_mask": additive,
                "token_type_ids": token_type_ids[None],
            }
            logits = functional_call(model, theta, (), inputs, strict=False).logits
        finally:
            for hook in hooks:
                hook.remove()
        return -F.cross_entropy(logits, label[None])

    per_row_grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0, 0, 0))
    scores = torch.zeros(len(rows))
    diagonal = {n: torch.zeros_like(t) for n, t in theta.items()}
    with _scoring_mode(model):
        for positions in _chunks(data, rows, chunk_rows):
            batch = data.batch(rows[positions])
            grads = per_row_grads(
                theta,
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                batch["labels"],
            )
            squared = {n: g.pow(2) for n, g in grads.items()}
            scores[torch.as_tensor(positions)] = sum(
                s.flatten(1).sum(dim=1) for s in squared.values()
            )
            for n, s in squared.items():
                diagonal[n] += s.sum(dim=0)
    release_freed_memory()
    return FisherPass(scores, {n: d / len(rows) for n, d in diagonal.items()})


def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _libc_trim()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc only; a no-op elsewhere).

    The vectorised per-row pass allocates many short-lived tensors of varying shapes (rows of
    different lengths); glibc keeps the freed blocks, and a client process's resident memory
    grew by ~0.8 GB per scored client on MiniLM (to ~11 GB in a 10-round study cell). Trimming
    after each pass keeps it at ~1.2 GB. Memory use, not results, is what this changes.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def layer_sensitivity(
    model: nn.Module,
    data: TokenizedData,
    rows: np.ndarray,
    layers: Sequence[int],
    *,
    scale: float,
    generator: torch.Generator,
    chunk_rows: int = 32,
) -> dict[int, float]:
    """Mean relative change of each layer's output under a Gaussian perturbation of its input."""
    rows = np.asarray(rows)
    blocks = encoder_layers(model)
    totals = {i: 0.0 for i in layers}
    with _scoring_mode(model), torch.no_grad():
        for positions in _chunks(data, rows, chunk_rows):
            batch = data.batch(rows[positions])
            captured = _capture_layers(model, blocks, layers, batch)
            real = batch["attention_mask"].to(torch.float32).unsqueeze(-1)  # [B, S, 1]
            for i in layers:
                args, kwargs, out = captured[i]
                hidden = args[0] if args else kwargs["hidden_states"]
                size = hidden.norm(dim=-1, keepdim=True) / math.sqrt(hidden.shape[-1])
                noise = torch.randn(hidden.shape, generator=generator) * scale * size
                if args:
                    moved = blocks[i](hidden + noise, *args[1:], **kwargs)
                else:
                    moved = blocks[i](**{**kwargs, "hidden_states": hidden + noise})
                moved = moved[0] if isinstance(moved, tuple) else moved
                change = ((moved - out) * real).pow(2).sum(dim=(1, 2)).sqrt()
                norm = (out * real).pow(2).sum(dim=(1, 2)).sqrt().clamp(min=1e-12)
                totals[i] += float((change / norm).sum())
    return {i: totals[i] / len(rows) for i in layers}


def _capture_layers(
    model: nn.Module, blocks: nn.ModuleList, layers: Sequence[int], batch: dict[str, torch.Tensor]
) -> dict[int, tuple[tuple, dict, torch.Tensor]]:
    """One forward pass; for each wanted layer its (args, kwargs) and its output."""
    captured: dict[int, tuple[tuple, dict, torch.Tensor]] = {}

    def keep(i: int):
        def hook(_module, args, kwargs, output):
            output = output[0] if isinstance(output, tuple) else output
            captured[i] = (args, kwargs, output)

        return hook

    hooks = [blocks[i].register_forward_hook(keep(i), with_kwargs=True) for i in layers]
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def fisher_layer_sensitivity(diagonal: State, layers: Sequence[int]) -> dict[int, float]:
    """The option to ``layer_sensitivity``: mean Fisher diagonal over each layer's tensors."""
    result = {}
    for i in layers:
        values = [d.flatten() for n, d in diagonal.items() if layer_of(n) == i]
        result[i] = float(torch.cat(values).mean()) if values else 0.0
    return result


def neuron_scores(diagonal: State) -> State:
    """Per neuron: the Fisher diagonal summed over its parameters.

    A neuron is an output unit of a linear map, i.e. a row of its weight: row k of LoRA's
    A [r x in] (rank component k, ``in`` parameters) and row j of B [out x r] (output unit j of
    the adapted layer, ``r`` parameters).
    """
    return {n: d.flatten(1).sum(dim=1) if d.dim() > 1 else d.clone() for n, d in diagonal.items()}


def momentum(previous: State | None, new: State, beta: float) -> State:
    """m <- beta * m + (1 - beta) * new, with m = 0 before the first measurement."""
    if previous is None:
        return {n: (1.0 - beta) * v for n, v in new.items()}
    return {n: beta * previous[n] + (1.0 - beta) * v for n, v in new.items()}


def top_rows_mask(scores: torch.Tensor, fraction: float, shape: torch.Size) -> torch.Tensor:
    """A bool mask of ``shape`` selecting the ceil(fraction * rows) rows (>= 1) with the largest
    scores; ties go to the lower row index."""
    count = min(len(scores), max(1, math.ceil(fraction * len(scores))))
    order = torch.argsort(-scores, stable=True)[:count]
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[order] = True
    return mask


def top_layers(sensitivity: dict[int, float], count: int) -> list[int]:
    """The ``count`` most sensitive layers, ascending; ties go to the lower layer index."""
    ranked = sorted(sensitivity, key=lambda i: (-sensitivity[i], i))
    return sorted(ranked[:count])
