"""A client's persistent tensors (``ClientSession.store``) on Flower.

Some methods keep tensors on the client between its rounds: FibecFed its curriculum scores,
neuron momenta and non-global LoRA tensors, the local-only baseline its whole module.

- In simulation the server keeps every client's store, as the embedded engine does (it goes into
  the run's checkpoints, and the personalised scores read it), and sends a client its store with
  the download; the client sends it back with its upload. That trip is how a simulation lets any
  node serve any client; it is not counted as traffic (a deployed client's store never leaves
  it), so bytes stay those of the embedded engine.
- In a deployment the store stays on the node (``NodeStore``): in the node's worker between
  messages, and in files under the node's state folder (``<data-path>/.fedpeft-state/<run>/``),
  one per round the client trained, so it survives a restart of the node. A resumed SuperLink
  replays the rounds after its last checkpoint; for round ``r`` a node reads the version written
  before ``r``, so the replayed round starts from what the lost one did.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedpeft.peft.base import State

STATE_FOLDER = ".fedpeft-state"  # under a node's data folder
KEEP = 3  # versions kept per client: the newest, and a few to replay rounds from
_FILE = re.compile(r"c(\d+)-r(\d+)\.safetensors")


def _copy(state: State) -> State:
    return {name: t.detach().clone().contiguous() for name, t in state.items()}


class NodeStore:
    """The stores of the clients a node trains, per run; ``folder`` None: memory only."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.latest: dict[int, tuple[int, State]] = {}  # cid -> (round written, store)

    def _versions(self, cid: int) -> list[tuple[int, Path]]:
        """(round, file) of the client's saved stores, oldest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _FILE.fullmatch(path.name)
            if match and int(match.group(1)) == cid:
                found.append((int(match.group(2)), path))
        return sorted(found)

    def load(self, cid: int, rnd: int) -> State:
        """Client ``cid``'s store as it was before round ``rnd`` (empty: never trained)."""
        held = self.latest.get(cid)
        if held is not None and held[0] < rnd:
            return _copy(held[1])
        earlier = [(r, path) for r, path in self._versions(cid) if r < rnd]
        if not earlier:
            return {}
        return dict(load_file(str(earlier[-1][1])))

    def save(self, cid: int, rnd: int, store: State) -> None:
        """Keep the store client ``cid`` ended round ``rnd`` with (versions from a lost
        timeline, round ``rnd`` or later, go)."""
        self.latest[cid] = (rnd, _copy(store))
        if self.folder is None:
            return
        versions = self._versions(cid)
        if not store and not versions:  # a method that keeps nothing writes nothing
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"c{cid}-r{rnd}.safetensors"
        partial = path.with_name(path.name + ".partial")
        save_file(_copy(store), str(partial))
        os.replace(partial, path)  # a node killed mid-write leaves the older version whole
        older = [old for r, old in versions if r < rnd][-(KEEP - 1) :]
        for _r, old in versions:
            if old != path and old not in older:
                old.unlink(missing_ok=True)


def state_folder(data_path: str | None, run_key: str) -> Path | None:
    """Where a node keeps its clients' stores for the run ``run_key``: under its data folder."""
    if not data_path:
        return None
    return Path(data_path) / STATE_FOLDER / run_key[:16]
