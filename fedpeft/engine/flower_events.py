"""Progress events from a simulated run's ServerApp to the ``FlowerEngine`` that started it.

In simulation the ServerApp runs in a process of Flower's (``flwr-simulation``, started by the
SuperLink) on the same host as fedpeft. Its events go through three files in the run's
``flower/`` folder, not through Flower's streamed log, which can lag the ServerApp by seconds:

    events.jsonl   the ServerApp appends one ``{"kind", "info"}`` line per event
    events.ack     the engine writes how many lines it has handed to its progress hook
    events.stop    the engine asks the ServerApp to stop (the hook raised, or Ctrl-C)

At the *gates* (the start and the end of every round) the ServerApp waits until the engine has
handed every event so far to its hook. So a hook that raises at round ``k`` stops the run there,
as on the embedded engine: the ServerApp never starts round ``k + 1``, however fast the run.
Other events (a client finished, a note) do not wait: a round of 100 clients pays two waits of a
few milliseconds, not a hundred. If the engine's process is gone the ServerApp stops too.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

EVENTS, ACK, STOP, OWNER = "events.jsonl", "events.ack", "events.stop", "events.owner"
GATES = frozenset({"round_start", "round_end"})  # where the ServerApp waits for the engine
POLL_S = 0.005  # first wait between looks at a file; doubles up to MAX_POLL_S
MAX_POLL_S = 0.05


class Stopped(Exception):
    """The engine asked the ServerApp to stop (or is gone): the run ends where it is, keeping
    only the rounds already recorded."""


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


class ServerEvents:
    """The ServerApp's end: a progress hook that writes each event and waits at the gates."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.sent = 0
        owner = _read_int(self.folder / OWNER)
        self.owner = owner or None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, "info": info}, default=_plain, separators=(",", ":"))
        with open(self.folder / EVENTS, "a") as out:
            out.write(line + "\n")
        self.sent += 1
        if kind in GATES:
            self.wait()

    def wait(self) -> None:
        """Until the engine has handed every event written so far to its hook."""
        pause = POLL_S
        while True:
            if (self.folder / STOP).exists():
                raise Stopped("fedpeft stopped the run")
            if _read_int(self.folder / ACK) >= self.sent:
                return
            if self.owner is not None and not psutil.pid_exists(self.owner):
                raise Stopped(f"fedpeft (pid {self.owner}) is gone")
            time.sleep(pause)
            pause = min(2 * pause, MAX_POLL_S)


class EngineEvents:
    """The engine's end: a thread that hands each new event to ``on_event`` and acknowledges it.
    A hook that raises asks the ServerApp to stop; the error is kept in ``failure`` and
    ``stopped`` is set. ``finish`` hands over whatever is left once the run has ended."""

    def __init__(self, folder: Path, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in (EVENTS, ACK, STOP):  # a resumed run starts a fresh channel
            (self.folder / name).unlink(missing_ok=True)
        (self.folder / EVENTS).touch()
        (self.folder / OWNER).write_text(str(os.getpid()))
        self.on_event = on_event
        self.failure: list[BaseException] = []
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._handled = 0
        self._offset = 0
        self._partial = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="fedpeft-events")

    def __enter__(self) -> EngineEvents:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def stop(self) -> None:
        """Ask the ServerApp to stop at its next gate."""
        self.stopped.set()
        (self.folder / STOP).touch()

    def finish(self) -> None:
        """Stop following and hand over the events the run wrote before it ended."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pump()

    def _follow(self) -> None:
        pause = POLL_S
        while not self._done.is_set():
            pause = POLL_S if self._pump() else min(2 * pause, MAX_POLL_S)
            time.sleep(pause)

    def _pump(self) -> bool:
        """Hand over the complete lines written since the last look; whether there were any."""
        with self._lock:
            try:
                with open(self.folder / EVENTS) as events:
                    events.seek(self._offset)
                    chunk = events.read()
                    self._offset = events.tell()
            except OSError:
                return False
            if not chunk:
                return False
            text = self._partial + chunk
            *lines, self._partial = text.split("\n")  # the last piece may be half written
            for line in lines:
                self._handle(line)
            return bool(lines)

    def _handle(self, line: str) -> None:
        self._handled += 1
        try:
            event = json.loads(line)
            kind, info = str(event["kind"]), dict(event["info"])
        except (ValueError, KeyError, TypeError):  # not an event: nothing to hand over
            kind = None
        if kind is not None and not self.stopped.is_set():
            try:
                self.on_event(kind, info)
            except Exception as err:  # noqa: BLE001 - a hook that raises stops the run
                self.failure.append(err)
                self.stop()
                return
        tmp = self.folder / (ACK + ".tmp")
        tmp.write_text(str(self._handled))
        os.replace(tmp, self.folder / ACK)
