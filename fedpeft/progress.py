"""Live progress for a run: a bar over rounds, a bar over the round's clients, and a status line."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, rounds: int, clients_per_round: int, enabled: bool = True):
        self.enabled = enabled
        self.rounds = rounds
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not enabled,
        )
        self.rounds_task = self.progress.add_task("rounds ", total=rounds, status="")
        self.clients_task = self.progress.add_task("clients", total=clients_per_round, status="")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "resume":
            self.progress.update(
                self.rounds_task,
                completed=info["round"],
                status=f"resumed after round {info['round']}",
            )
        elif kind == "round_start":
            self.progress.reset(self.clients_task, status="")
        elif kind == "client":
            self.progress.update(
                self.clients_task, completed=info["done"], status=f"loss {info['loss']:.4f}"
            )
        elif kind == "round_end":
            acc = info.get("accuracy")
            status = f"round {info['round']}: loss {info['train_loss']:.4f}"
            if acc is not None:
                status += f"  acc {acc:.4f}  f1 {info['macro_f1']:.4f}"
            self.progress.update(self.rounds_task, advance=1, status=status)
            if not self.enabled:
                return
            self.console.log(
                status
                + f"  sim {info['sim_time_total_s']:.0f}s  up {info['bytes_up_total'] / 1e6:.2f} MB"
            )
