"""C2A (Kim et al., "Client-Customized Adaptation for Parameter-Efficient Federated Learning",
Findings of ACL 2023): one hypernetwork, trained by all clients, generates every adapter per batch.

All clients train and exchange the same small tensors: the hypernetwork (its factorised
generator, bias, label/context/layer embeddings, b1, b2) and the task head, aggregated by the run's
algorithm (FedAvg weighted by client samples unless configured otherwise). What makes the adapters
client-customised is the condition they are generated from (``fedpeft.peft.hyperadapter``):

- training on client c: the batch's normalised label histogram (``label_input: batch``, the paper)
  or c's own training label histogram (``label_input: client``, our variant);
- global evaluation: a uniform label distribution (the paper; its reference code computes each
  client's histogram but never uses it);
- personalised evaluation of client c: c's histogram in the ``client`` variant, else uniform.

The context part of the condition comes from the batch itself. The generation and the generated
adapters' work is charged to the client's device (``hyperadapter.generation_flops``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedpeft.algorithms import ServerAlgorithm
from fedpeft.methods.base import ClientContext, ClientSession
from fedpeft.methods.fedpetuning import FedPETuning
from fedpeft.peft import hyperadapter
from fedpeft.peft.hyperadapter import C2ASettings
from fedpeft.registry import MethodSpec, SystemInfo

if TYPE_CHECKING:
    from fedpeft.config import RunConfig


class C2A(FedPETuning):
    """The seed system: FedPETuning's exchange and aggregation plus C2A's per-batch condition."""

    name = "c2a"

    def __init__(self, settings: C2ASettings, algorithm: ServerAlgorithm, num_layers: int):
        super().__init__(algorithm)
        self.settings = settings
        self.num_layers = num_layers
        self.histograms: dict[int, torch.Tensor] = {}
        self._flops = 0.0  # generation work of the client training now

    def setup(self, clients: list[ClientContext], num_labels: int) -> None:
        self.num_labels = num_labels
        self.histograms = {
            c.cid: torch.as_tensor(c.label_distribution, dtype=torch.float32) for c in clients
        }

    def label_input(
        self, batch: Mapping[str, torch.Tensor], *, training: bool, cid: int | None
    ) -> torch.Tensor | None:
        """The label distribution the adapters are generated from (None = uniform).

        The histograms come from ``setup``, which also runs on resume: nothing to checkpoint.
        """
        if self.settings.label_input == "client" and cid is not None:
            return self.histograms[cid]
        if training:
            return hyperadapter.label_distribution(batch["labels"], self.num_labels)
        return None

    def begin_client(self, session: ClientSession) -> None:
        self._flops = 0.0

    def condition(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        rows: np.ndarray,
        *,
        training: bool,
        cid: int | None,
    ) -> None:
        hyperadapter.set_condition(model, self.label_input(batch, training=training, cid=cid))
        if training:
            mask = batch["attention_mask"]
            self._flops += hyperadapter.generation_flops(
                self.settings,
                hidden=hyperadapter.hypernetwork_of(model).hidden,
                num_labels=self.num_labels,
                num_layers=self.num_layers,
                batch_size=len(rows),
                seq_len=float(mask.sum()) / max(1, len(rows)),
                training=True,
            )

    def end_client(self, session: ClientSession) -> None:
        session.charge(self._flops)
        self._flops = 0.0


def _system(config: RunConfig, info: SystemInfo) -> C2A:
    return C2A(config.c2a, info.algorithm, info.num_layers)


SPEC = MethodSpec(
    name="c2a",
    summary="C2A: adapters generated per batch by one shared hypernetwork (Kim et al., 2023)",
    settings=C2ASettings,
    inject=lambda model, config: hyperadapter.inject(model, config.c2a),
    default_lr=3e-3,  # chosen on validation: docs/c2a.md, Learning rate
    system=_system,
)
