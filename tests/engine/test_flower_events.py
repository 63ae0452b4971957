"""The event channel between a simulated run's ServerApp and the FlowerEngine (no Flower here:
the ServerApp's end runs in a thread, as it would in Flower's process)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from fedpeft.engine import flower_events as fe
from fedpeft.engine.flower_events import EngineEvents, ServerEvents, Stopped


def serve(folder, events: list[tuple[str, dict]], outcome: list) -> threading.Thread:
    """A fake ServerApp: sends ``events`` in order, then records 'done' or the Stopped."""

    def main() -> None:
        send = ServerEvents(folder)
        try:
            for kind, info in events:
                send(kind, info)
                outcome.append(("sent", kind, info.get("round")))
            outcome.append("done")
        except Stopped as stopped:
            outcome.append(stopped)

    thread = threading.Thread(target=main)
    thread.start()
    return thread


def rounds(n: int) -> list[tuple[str, dict]]:
    out = []
    for rnd in range(1, n + 1):
        out += [("round_start", {"round": rnd}), ("client", {"round": rnd})]
        out += [("round_end", {"round": rnd})]
    return out


def test_every_event_reaches_the_hook_in_order(tmp_path):
    seen, outcome = [], []
    with EngineEvents(tmp_path, lambda kind, info: seen.append((kind, info))) as engine:
        serve(tmp_path, rounds(3), outcome).join(timeout=30)
        engine.finish()
    assert outcome[-1] == "done"
    assert seen == rounds(3)
    assert engine.failure == [] and not engine.stopped.is_set()


def test_a_hook_that_raises_stops_the_server_at_that_gate(tmp_path):
    """The hook raises at round 2's start: the server never sends anything of round 2's work,
    however fast it is (it waits at the gate until the engine has handed the event over)."""

    def hook(kind, info):
        if kind == "round_start" and info["round"] == 2:
            raise RuntimeError("stop here")

    outcome = []
    with EngineEvents(tmp_path, hook) as engine:
        serve(tmp_path, rounds(3), outcome).join(timeout=30)
        engine.finish()
    assert isinstance(outcome[-1], Stopped)
    sent = [item for item in outcome if isinstance(item, tuple)]
    assert sent[-1] == ("sent", "round_end", 1)  # round 2's start was written, never passed
    assert [str(e) for e in engine.failure] == ["stop here"]
    assert (tmp_path / fe.STOP).exists()


def test_events_between_gates_do_not_wait(tmp_path):
    """A client event is written and the server goes on without an acknowledgement."""
    (tmp_path / fe.EVENTS).touch()
    send = ServerEvents(tmp_path)  # no engine: nothing would ever acknowledge
    for i in range(100):
        send("client", {"round": 1, "done": i})
    lines = (tmp_path / fe.EVENTS).read_text().splitlines()
    assert len(lines) == 100 and json.loads(lines[-1])["info"]["done"] == 99


def test_the_server_stops_when_the_engine_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / fe.OWNER).write_text(str(gone.pid))
    send = ServerEvents(tmp_path)
    with pytest.raises(Stopped, match=f"pid {gone.pid}"):
        send("round_start", {"round": 1})


def test_a_half_written_line_waits_for_its_end(tmp_path):
    seen = []
    engine = EngineEvents(tmp_path, lambda kind, info: seen.append((kind, info)))
    with open(tmp_path / fe.EVENTS, "a") as out:
        out.write('{"kind":"note","info":{"te')
    engine.finish()
    assert seen == []
    with open(tmp_path / fe.EVENTS, "a") as out:
        out.write('xt":"hi"}}\nnot json\n')
    engine.finish()
    assert seen == [("note", {"text": "hi"})]
    assert (tmp_path / fe.ACK).read_text() == "2"  # the stray line is acknowledged, not handed


def test_a_resumed_run_starts_a_fresh_channel(tmp_path):
    for name in (fe.EVENTS, fe.ACK, fe.STOP):
        (tmp_path / name).write_text("9")
    EngineEvents(tmp_path, lambda kind, info: None)
    assert (tmp_path / fe.EVENTS).read_text() == ""
    assert not (tmp_path / fe.ACK).exists() and not (tmp_path / fe.STOP).exists()
