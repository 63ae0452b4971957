"""Name -> unit for every method a run can name: PEFT units and seed systems, one file each.

A module under ``fedpeft/peft/`` or ``fedpeft/methods/`` that defines a module-level
``SPEC = MethodSpec(...)`` is registered when the registry is first read: adding a method is one
new file (plus its tests and docs). Its settings class becomes the config section named after it
(``lora: {r: 8}``), its summary the row of ``fedpeft list`` and the README table, its
``default_lr`` the learning rate of a config that sets none, and its ``check`` the cross-key
errors of ``fedpeft.config``.

Modules that define a SPEC must not import ``fedpeft.config`` at module level (it imports this
registry to build the config schema); the ``RunConfig`` they receive is a plain validated object.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import nn

    from fedpeft.algorithms import ServerAlgorithm
    from fedpeft.config import RunConfig
    from fedpeft.methods.base import FederatedMethod


@dataclass(frozen=True)
class SystemInfo:
    """What a seed system's factory learns about the run besides its config."""

    num_layers: int
    num_labels: int
    algorithm: ServerAlgorithm  # ``config.algorithm``, built with its settings


@dataclass(frozen=True)
class MethodSpec:
    """How one ``method:`` value is built. See the module docstring."""

    name: str
    summary: str
    settings: type[BaseModel]
    inject: Callable[[nn.Module, RunConfig], nn.Module]
    default_lr: float
    system: Callable[[RunConfig, SystemInfo], FederatedMethod] | None = None
    check: Callable[[RunConfig], None] | None = None
    engines: tuple[str, ...] = ("embedded", "flower")
    drives_rounds: bool = False  # its system is a RoundDriver: engine-level round options
    # (faults) do not apply to it
    # tokens a method adds to every sequence / every attention layer's keys (cost model)
    extra_tokens: Callable[[Any], int] | None = None
    extra_kv: Callable[[Any], int] | None = None


_PACKAGES = ("fedpeft.peft", "fedpeft.methods")
_METHODS: dict[str, MethodSpec] = {}


def _discover() -> dict[str, MethodSpec]:
    found: dict[str, MethodSpec] = {}
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{package_name}.{info.name}")
            spec = getattr(module, "SPEC", None)
            if not isinstance(spec, MethodSpec):
                continue
            if spec.name in found:
                raise RuntimeError(f"method '{spec.name}' is registered twice ({module.__name__})")
            found[spec.name] = spec
    return found


def methods() -> dict[str, MethodSpec]:
    """Every registered method by name (discovered once)."""
    if not _METHODS:
        _METHODS.update(_discover())
    return _METHODS


def get(name: str) -> MethodSpec:
    table = methods()
    if name not in table:
        raise KeyError(f"unknown method '{name}' (choose from {', '.join(table)})")
    return table[name]


class _Methods(dict):
    """``METHODS`` reads the registry lazily, so importing this module imports no method."""

    def _table(self) -> dict[str, MethodSpec]:
        return methods()

    def __getitem__(self, key: str) -> MethodSpec:
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, key: object) -> bool:
        return key in self._table()

    def keys(self):
        return self._table().keys()

    def values(self):
        return self._table().values()

    def items(self):
        return self._table().items()

    def get(self, key, default=None):
        return self._table().get(key, default)


METHODS: dict[str, MethodSpec] = _Methods()
