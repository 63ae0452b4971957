"""The run folder: config snapshot, per-round metrics, summary, checkpoints and final weights.

Every file is written atomically (temp file + ``os.replace``), and a checkpoint is complete
before the pointer to it changes, so a run killed at any moment leaves its finished rounds intact
and ``fedpeft run --resume DIR`` continues from the last one.

Layout::

    config.yaml          resolved configuration
    partition.json/png   client sizes and label histograms
    metrics.jsonl        one JSON object per completed round
    summary.json         headline figures (written after every round, final at the end)
    weights.safetensors  final global trainable tensors
    best.safetensors     global trainable tensors of the round best on validation
    checkpoints/round-N/ global.safetensors + state.json and state.safetensors (method/server
                         state, clients' persistent tensors, RNG, history): no pickle anywhere
    checkpoint.json      which checkpoint is the latest complete one
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class RunDirError(ValueError):
    """A run folder that cannot be created or resumed, said in one line."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    method_state: dict[str, Any]
    history: list[dict[str, Any]]
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # engine state: client store, caches


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


# -- JSON + tensors, without pickle -----------------------------------------------------------------
_TENSOR, _PAIRS = "__tensor__", "__pairs__"


def split_tensors(value: Any, tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict]:
    """A nested structure -> (JSON-able structure, tensors): each tensor is replaced by a
    reference to its key; dicts with non-string keys become key/value pairs."""
    tensors = {} if tensors is None else tensors
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().contiguous().cpu()
        return {_TENSOR: key}, tensors
    if isinstance(value, np.ndarray):
        return split_tensors(torch.from_numpy(value.copy()), tensors)
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TENSOR not in value:
            return {k: split_tensors(v, tensors)[0] for k, v in value.items()}, tensors
        pairs = [
            [split_tensors(k, tensors)[0], split_tensors(v, tensors)[0]] for k, v in value.items()
        ]
        return {_PAIRS: pairs}, tensors
    if isinstance(value, list | tuple):
        return [split_tensors(v, tensors)[0] for v in value], tensors
    if isinstance(value, np.generic):
        return value.item(), tensors
    if value is None or isinstance(value, bool | int | float | str):
        return value, tensors
    raise TypeError(f"cannot checkpoint a {type(value).__name__} (JSON values and tensors only)")


def join_tensors(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``split_tensors`` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_PAIRS}:
            return {
                _hashable(join_tensors(k, tensors)): join_tensors(v, tensors)
                for k, v in value[_PAIRS]
            }
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config_yaml: str) -> RunDir:
        """A new run folder; refuses one that already holds a run (use --resume for that)."""
        run = cls(path)
        if run.metrics_path.exists() or run.pointer_path.exists():
            raise RunDirError(f"{path} already holds a run: use --resume {path} or another --out")
        run.path.mkdir(parents=True, exist_ok=True)
        write_text(run.config_path, config_yaml)
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not run.config_path.is_file():
            raise RunDirError(f"{path} is not a run folder (no config.yaml)")
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def pointer_path(self) -> Path:
        return self.path / "checkpoint.json"

    @property
    def weights_path(self) -> Path:
        return self.path / "weights.safetensors"

    @property
    def best_path(self) -> Path:
        return self.path / "best.safetensors"

    # -- metrics --------------------------------------------------------------------------------
    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the in-memory history (small; keeps it consistent on resume)."""
        lines = "".join(json.dumps(row, default=_jsonable) + "\n" for row in history)
        write_text(self.metrics_path, lines)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint, keep: int = 1) -> None:
        folder = self.path / "checkpoints" / f"round-{ckpt.round}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in ckpt.global_state.items()},
            str(tmp / "global.safetensors"),
        )
        state, tensors = split_tensors(
            {
                "round": ckpt.round,
                "method": ckpt.method_state,
                "history": ckpt.history,
                "rng": ckpt.rng,
                "extra": ckpt.extra,
            }
        )
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, default=_jsonable) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        write_json(
            self.pointer_path, {"round": ckpt.round, "folder": str(folder.relative_to(self.path))}
        )
        self._prune(keep, latest=folder)

    def _prune(self, keep: int, latest: Path) -> None:
        folders = sorted(
            (
                p
                for p in (self.path / "checkpoints").glob("round-*")
                if p.is_dir() and not p.name.endswith(".tmp")
            ),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in folders[:-keep]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.pointer_path.is_file():
            return None
        pointer = json.loads(self.pointer_path.read_text())
        folder = self.path / pointer["folder"]
        try:
            global_state = load_file(str(folder / "global.safetensors"))
            tensors = load_file(str(folder / "state.safetensors"))
            state = join_tensors(json.loads((folder / "state.json").read_text()), tensors)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise RunDirError(f"checkpoint {folder} is unreadable: {err}") from err
        return Checkpoint(
            state["round"],
            global_state,
            state["method"],
            state["history"],
            state["rng"],
            state.get("extra", {}),
        )
