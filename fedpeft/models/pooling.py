"""How a sequence becomes one vector for the task head: masked mean or the last real token.

``pooling: mean`` suits sentence encoders (all-MiniLM-L6-v2 was trained mean-pooled; BERT's
[CLS] pooler weights were never tuned for it). A decoder's last real token is the only one that
has seen the whole text, so decoders pool there. ``cls`` keeps the family's own head: BERT's
[CLS] pooler, RoBERTa's and DistilBERT's first token; for decoders it is the last real token.

Each pooler reads the attention mask of the current call (a forward pre-hook hands it over; it is
also the mask peft extends for prompt tokens). Under prefix-tuning peft prepends ones for the
prefix keys while the hidden states cover the text only: the mask's last columns are the text's.

Where the pooler sits: a family with a [CLS] pooler module (BERT) has it replaced; for the others
a pooler is attached to the backbone and a forward hook replaces the backbone's last hidden state
by the pooled vector at every position, so whichever position the stock head reads (RoBERTa's and
DistilBERT's first token, a decoder head's last non-padding token) gets the pooled vector.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.models.families import Family

POOLINGS = ("mean", "cls", "last")
ATTACHED = "token_pooler"  # the backbone attribute holding an attached pooler


def text_mask(mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The ``[B, T]`` mask of the text positions of ``hidden_states``, or None when the mask
    handed over does not describe them. Under prefix-tuning peft prepends the prefix keys'
    columns, so the text's are the last ones."""
    if mask is None or mask.dim() != 2:
        return None
    if mask.shape[1] > hidden_states.shape[1]:
        mask = mask[:, -hidden_states.shape[1] :]
    return mask if mask.shape == hidden_states.shape[:2] else None


class MaskedMeanPooler(nn.Module):
    """Mean of the last hidden states over real tokens; stands in for BertPooler.

    The pooler only receives hidden states, so a forward pre-hook on the encoder model hands it
    the attention mask of the current call (also the mask peft extends for prompt tokens). Under
    prefix-tuning peft prepends ones for the prefix keys to the mask, while the hidden states
    cover the text only: the mask's last columns are the text's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = text_mask(self.mask, hidden_states)
        if mask is None:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class LastTokenPooler(nn.Module):
    """The hidden state of each row's last real token (either padding side); the last position
    when no usable mask was handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = text_mask(self.mask, hidden_states)
        if mask is None:
            return hidden_states[:, -1]
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask != 0)).argmax(dim=1, keepdim=True)  # [B, 1]
        pick = (positions == last).to(hidden_states.dtype).unsqueeze(-1)  # one-hot, vmap-safe
        return (hidden_states * pick).sum(dim=1)


TOKEN_POOLERS = (MaskedMeanPooler, LastTokenPooler)


def _remember_mask(encoder: nn.Module, args, kwargs) -> None:
    """Hand the call's attention mask to the encoder's own pooler (looked up at call time, so a
    deep copy of the model feeds its own pooler, not the original's)."""
    if isinstance(encoder.pooler, MaskedMeanPooler):
        encoder.pooler.mask = kwargs.get("attention_mask")


def _remember_mask_attached(backbone: nn.Module, args, kwargs) -> None:
    getattr(backbone, ATTACHED).mask = kwargs.get("attention_mask")


def _pool_output(backbone: nn.Module, args, kwargs, output):
    """Every position of the backbone's last hidden state becomes the pooled vector."""
    hidden = output[0]
    pooled = getattr(backbone, ATTACHED)(hidden).unsqueeze(1).expand_as(hidden)
    if isinstance(output, tuple):
        return (pooled, *output[1:])
    output["last_hidden_state"] = pooled
    return output


def _drop_token_types(model: nn.Module, args, kwargs):
    """Families without segment embeddings: token_type_ids (which fedpeft's batches and peft's
    prompt tuning carry) are dropped before the model sees them."""
    if "token_type_ids" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "token_type_ids"}
    return args, kwargs


def use_pooling(model: nn.Module, family: Family, pooling: str) -> None:
    """Give the task model ``family``'s input handling and the chosen pooling (module docstring)."""
    if family.pooler is not None and pooling not in ("mean", "cls"):
        raise ValueError(f"{family.name} supports pooling 'mean' or 'cls', not '{pooling}'")
    attach_pooling(
        model,
        pooling,
        backbone=family.backbone,
        pooler=family.pooler,
        token_types=family.token_types,
        decoder=family.decoder,
    )


def attach_pooling(
    model: nn.Module,
    pooling: str,
    *,
    backbone: str,
    pooler: str | None,
    token_types: bool,
    decoder: bool,
) -> None:
    """``use_pooling`` with the family's fields as plain arguments: an exported model's code
    carries this function as it is, so it pools exactly as the run's model did."""
    if not token_types:  # on the backbone: peft's prefix-tuning may call it directly
        model.get_submodule(backbone).register_forward_pre_hook(_drop_token_types, with_kwargs=True)
    if pooling == "cls" and decoder:
        pooling = "last"
    if pooling == "cls":
        return
    if pooler is not None:  # BERT: its [CLS] pooler is replaced
        encoder_path, _, attr = pooler.rpartition(".")
        encoder = model.get_submodule(encoder_path)
        setattr(encoder, attr, MaskedMeanPooler())
        encoder.register_forward_pre_hook(_remember_mask, with_kwargs=True)
        return
    base = model.get_submodule(backbone)
    setattr(base, ATTACHED, MaskedMeanPooler() if pooling == "mean" else LastTokenPooler())
    base.register_forward_pre_hook(_remember_mask_attached, with_kwargs=True)
    base.register_forward_hook(_pool_output, with_kwargs=True)
