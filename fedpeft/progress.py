"""Live progress for a run: a bar over rounds (with an ETA), a bar over the round's clients, and a
status line."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def format_eta(seconds: float | None) -> str:
    """``eta 42s``, ``eta 3m05s``, ``eta 1h12m``; empty while there is nothing to estimate from."""
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"eta {seconds}s"
    if seconds < 3600:
        return f"eta {seconds // 60}m{seconds % 60:02d}s"
    return f"eta {seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RoundClock:
    """Estimates the time left from the rounds timed in this process (not resumed ones): the mean
    round so far; during the first round, its clients' pace times the clients per round."""

    def __init__(self, rounds: int, clients_per_round: int, now=time.monotonic):
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.now = now
        self.done = 0
        self.timed: list[float] = []
        self.round_started: float | None = None
        self.clients_done = 0

    def resume(self, done: int) -> None:
        self.done = done

    def round_start(self) -> None:
        self.round_started = self.now()
        self.clients_done = 0

    def client(self, done: int) -> None:
        self.clients_done = done

    def round_end(self) -> None:
        if self.round_started is not None:
            self.timed.append(self.now() - self.round_started)
        self.round_started = None
        self.done += 1

    def remaining_s(self) -> float | None:
        left = self.rounds - self.done
        if left <= 0:
            return 0.0
        in_round = self.now() - self.round_started if self.round_started is not None else 0.0
        if self.timed:
            per_round = sum(self.timed) / len(self.timed)
        elif self.clients_done:
            per_round = in_round / self.clients_done * self.clients_per_round
        else:
            return None
        return max(0.0, per_round * left - in_round)


class RunProgress:
    def __init__(self, rounds: int, clients_per_round: int, enabled: bool = True):
        self.enabled = enabled
        self.rounds = rounds
        self.clock = RoundClock(rounds, clients_per_round)
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not enabled,
        )
        self.rounds_task = self.progress.add_task("rounds ", total=rounds, status="", eta="")
        self.clients_task = self.progress.add_task(
            "clients", total=clients_per_round, status="", eta=""
        )

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def _eta(self) -> None:
        self.progress.update(self.rounds_task, eta=format_eta(self.clock.remaining_s()))

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "resume":
            self.clock.resume(info["round"])
            self.progress.update(
                self.rounds_task,
                completed=info["round"],
                status=f"resumed after round {info['round']}",
            )
        elif kind == "round_start":
            self.clock.round_start()
            self.progress.reset(self.clients_task, status="", eta="")  # reset replaces the fields
        elif kind == "client":
            self.clock.client(info["done"])
            self.progress.update(
                self.clients_task, completed=info["done"], status=f"loss {info['loss']:.4f}"
            )
            self._eta()
        elif kind == "trial":  # a round-driving method's trial: its share of the budget so far
            self.progress.update(
                self.clients_task,
                total=info["budget_s"],
                completed=min(info["sim_time_s"], info["budget_s"]),
                status=f"{info['candidate']} ({info['depth']},{info['width']}): "
                f"round {info['rounds']}, {info['sim_time_s']:.1f}/{info['budget_s']:.1f} s sim",
            )
        elif kind == "trial_end":
            if self.enabled:
                self.console.log(
                    f"period {info['period']}: {info['candidate']} ({info['depth']},"
                    f"{info['width']}) ran {info['rounds']} rounds in {info['sim_time_s']:.1f} s "
                    f"sim ({info['wall_s']:.1f} s wall), val {info['val_accuracy']:.4f}"
                )
        elif kind == "note":
            if self.enabled:
                self.console.log(info["text"])
        elif kind == "rejected":
            if self.enabled:
                self.console.log(
                    f"round {info['round']}: client {info['cid']}'s update rejected: {info['reason']}"
                )
        elif kind == "round_end":
            self.clock.round_end()
            acc = info.get("accuracy")
            status = f"round {info['round']}: loss {info['train_loss']:.4f}"
            if acc is not None:
                status += f"  acc {acc:.4f}  f1 {info['macro_f1']:.4f}"
            if info.get("val_accuracy") is not None:
                status += f"  val {info['val_accuracy']:.4f}"
            self.progress.update(self.rounds_task, advance=1, status=status)
            self._eta()
            if not self.enabled:
                return
            self.console.log(
                status
                + f"  sim {info['sim_time_total_s']:.0f}s  up {info['bytes_up_total'] / 1e6:.2f} MB"
            )
