"""Local training and evaluation on one client's rows: the same code for every engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.data.tokenize import TokenizedData
from fedpeft.peft.base import trainable_parameters


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains: plain values taken from the run config."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def num_steps(self, num_samples: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(num_samples / self.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch))


@dataclass
class LocalResult:
    num_samples: int
    steps: int
    mean_loss: float
    samples_seen: int
    tokens_seen: int

    @property
    def mean_seq_len(self) -> float:
        return self.tokens_seen / max(1, self.samples_seen)


ExtraLoss = Callable[[Mapping[str, nn.Parameter]], torch.Tensor | None]
AfterBackward = Callable[[nn.Module], None]
Forward = Callable[[nn.Module, Mapping[str, torch.Tensor], np.ndarray], torch.Tensor]
"""``(model, batch, rows) -> logits``: another route to the same logits (the activation cache)."""
Condition = Callable[[Mapping[str, torch.Tensor], np.ndarray], None]
"""``(batch, rows)``: called before every forward, so a method can condition the model on it."""


def _optimizer(params: list[nn.Parameter], training: LocalTraining) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
        )
    return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)


def _warmup_then_decay(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def batch_order(
    indices: np.ndarray, batch_size: int, steps: int, generator: torch.Generator
) -> list[np.ndarray]:
    """The row indices of each local step: reshuffled every epoch, cut to ``steps`` batches."""
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
        for start in range(0, len(order), batch_size):
            batches.append(order[start : start + batch_size])
            if len(batches) == steps:
                break
    return batches


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def train_local(
    model: nn.Module,
    data: TokenizedData,
    indices: np.ndarray,
    training: LocalTraining,
    *,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    after_backward: AfterBackward | None = None,
    forward: Forward | None = None,
    condition: Condition | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train the model's trainable parameters in place on ``data[indices]``.

    ``seed`` fixes the batch order and dropout, so a client's work in a round is reproducible
    (resumed runs match uninterrupted ones). ``extra_loss`` adds a term such as FedProx's proximal
    penalty; ``after_backward`` may edit gradients (sparse updates) before the optimiser step;
    ``forward`` replaces the model call (e.g. ``ActivationCache.logits``, which skips frozen layers);
    ``condition`` sees each batch before its forward; ``masks`` (name -> bool, True = trains)
    freeze the False entries exactly: their gradients are zeroed before clipping and their values
    restored after every optimiser step, so no weight decay or momentum moves them.
    """
    if len(indices) == 0:
        raise ValueError("client has no training rows")
    params = trainable_parameters(model)
    frozen = _frozen_entries(params, masks or {})
    steps = training.num_steps(len(indices))
    optimizer = _optimizer(list(params.values()), training)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then_decay(steps, training.warmup_ratio)
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    total_loss, seen, tokens = 0.0, 0, 0
    for rows in batch_order(indices, training.batch_size, steps, generator):
        batch = data.batch(rows)
        if condition is not None:
            condition(batch, rows)
        logits = forward(model, batch, rows) if forward else forward_logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"])
        total_loss += loss.item() * len(rows)
        extra = extra_loss(params) if extra_loss is not None else None
        if extra is not None:
            loss = loss + extra
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        for name, (keep, _values) in frozen.items():
            grad = params[name].grad
            if grad is not None:
                grad.masked_fill_(keep, 0.0)
        if training.grad_clip is not None:
            nn.utils.clip_grad_norm_(list(params.values()), training.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for name, (keep, values) in frozen.items():
                params[name].masked_scatter_(keep, values)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(rows)
        tokens += batch["input_ids"].numel()
    model.eval()
    return LocalResult(len(indices), steps, total_loss / seen, seen, tokens)


def _frozen_entries(
    params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (bool tensor of frozen entries, their values now), for masked parameters."""
    frozen = {}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for '{name}', which is not a trainable parameter")
        p = params[name]
        if mask.shape != p.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for '{name}' is {mask.dtype} {tuple(mask.shape)}, "
                f"expected bool {tuple(p.shape)}"
            )
        keep = ~mask
        frozen[name] = (keep, p.detach()[keep].clone())
    return frozen


@dataclass
class Evaluation:
    accuracy: float
    macro_f1: float
    loss: float
    num_samples: int
    group_accuracy: dict[str, float] | None = None  # per group (e.g. language), when asked


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions."""
    scores = []
    for c in np.union1d(labels, preds):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenizedData,
    indices: np.ndarray,
    batch_size: int = 128,
    forward: Forward | None = None,
    condition: Condition | None = None,
    groups: np.ndarray | None = None,
) -> Evaluation:
    """Accuracy, macro-F1 and mean loss; rows are batched by length so padding stays small.

    ``groups`` (one label per row of ``data``) adds the accuracy of each group present."""
    model.eval()
    indices = np.asarray(indices)
    order = indices[np.argsort(data.lengths[indices].numpy(), kind="stable")]
    preds, labels, loss_sum = [], [], 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = data.batch(rows)
        if condition is not None:
            condition(batch, rows)
        logits = forward(model, batch, rows) if forward else forward_logits(model, batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        preds.append(logits.argmax(dim=-1).numpy())
        labels.append(batch["labels"].numpy())
    if not preds:
        return Evaluation(0.0, 0.0, 0.0, 0)
    y_pred, y_true = np.concatenate(preds), np.concatenate(labels)
    per_group = None
    if groups is not None:
        row_groups = np.asarray(groups)[order]
        correct = y_pred == y_true
        per_group = {
            str(g): float(np.mean(correct[row_groups == g])) for g in sorted(set(row_groups))
        }
    return Evaluation(
        accuracy=float(np.mean(y_pred == y_true)),
        macro_f1=macro_f1(y_true, y_pred),
        loss=loss_sum / len(y_true),
        num_samples=len(y_true),
        group_accuracy=per_group,
    )
