"""The seed systems fedpeft implements, each one file of hooks around the shared engine."""

from fedpeft.methods.autofednlp import AutoFedNLP, AutoFedNLPSettings
from fedpeft.methods.base import (
    ClientFit,
    ClientRunner,
    ClientUpdate,
    FederatedMethod,
    RoundDriver,
    RoundReport,
)
from fedpeft.methods.fedpetuning import FedPETuning

__all__ = [
    "AutoFedNLP",
    "AutoFedNLPSettings",
    "ClientFit",
    "ClientRunner",
    "ClientUpdate",
    "FederatedMethod",
    "FedPETuning",
    "RoundDriver",
    "RoundReport",
]
