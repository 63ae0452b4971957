"""The seed systems fedpeft implements, each one file of hooks around the shared engine.

A system registers itself with a module-level ``SPEC`` (``fedpeft.registry``); the engine only
calls the hooks of ``FederatedMethod`` (``methods/base.py``).
"""

from fedpeft.methods.base import (
    ClientContext,
    ClientFit,
    ClientRunner,
    ClientSession,
    ClientUpdate,
    FederatedMethod,
    RoundDriver,
    RoundReport,
)

__all__ = [
    "ClientContext",
    "ClientFit",
    "ClientRunner",
    "ClientSession",
    "ClientUpdate",
    "FederatedMethod",
    "RoundDriver",
    "RoundReport",
]
