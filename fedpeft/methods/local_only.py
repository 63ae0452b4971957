"""Local-only training: every client trains its own PEFT module and nothing is aggregated.

The baseline of "no federation" that personalisation methods (C2A, FedAvg + local fine-tuning)
are measured against: each client starts from the same initial module, trains on its own rows
whenever it is sampled, and keeps the result on the device (the engine's per-client store,
checkpointed). Nothing travels in either direction, so bytes are those of an empty message and
the global state never changes: the global accuracy is the untrained module's, and the score
that means something is the personalised one (``personalized_eval: true``), each client scored
on its own test split with its own module.

``local: {unit: adapter}`` picks the PEFT unit; its settings are that unit's own section
(``adapter: {width: 16}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft import registry
from fedpeft.methods.base import ClientSession, ClientUpdate, FederatedMethod, State
from fedpeft.peft.base import load_trainable_state, trainable_state

if TYPE_CHECKING:
    from fedpeft.config import RunConfig


class LocalOnlySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unit: Literal["lora", "adapter", "prefix", "prompt", "bitfit", "full"] = Field(
        "adapter", description="the PEFT unit each client trains alone (its own section sets it up)"
    )


class LocalOnly(FederatedMethod):
    name = "local"

    def download(self, rnd: int, cid: int, global_state: State) -> State:
        return {}

    def begin_client(self, session: ClientSession) -> None:
        if session.store:  # the client's own module from its previous rounds
            load_trainable_state(session.model, session.store)

    def end_client(self, session: ClientSession) -> None:
        session.store.clear()
        session.store.update(trainable_state(session.model))

    def upload(self, rnd: int, cid: int, trained: State) -> State:
        return {}

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return global_state

    def prepare_eval(self, model: nn.Module, cid: int | None, store: State | None) -> None:
        if cid is not None and store:
            load_trainable_state(model, store)


def _inject(model: nn.Module, config: RunConfig) -> nn.Module:
    return registry.get(config.local.unit).inject(model, config)


def _check(config: RunConfig) -> None:
    if not config.personalized_eval:
        raise ValueError(
            "personalized_eval: method local trains one module per client; set it to true "
            "(the global model never changes)"
        )


SPEC = registry.MethodSpec(
    name="local",
    summary="local-only baseline: each client trains its own PEFT module, nothing is aggregated",
    settings=LocalOnlySettings,
    inject=_inject,
    default_lr=1e-2,  # the adapter's and LoRA's (FedPETuning study, validation-only selection)
    system=lambda config, info: LocalOnly(),
    check=_check,
)
