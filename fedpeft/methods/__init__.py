"""The seed systems fedpeft implements, each one file of hooks around the shared engine."""

from fedpeft.methods.base import ClientUpdate, FederatedMethod
from fedpeft.methods.fedpetuning import FedPETuning

__all__ = ["ClientUpdate", "FederatedMethod", "FedPETuning"]
