"""The study harness (benchmarks/harness.py) on a tiny fake study: two lr candidates and three cells
(two seeds of one method, one of another) on the tiny model and the toy dataset. Resume and skip,
stale and broken restarts, --only/--part, seed groups, the headline, the JSON beside the page."""

from __future__ import annotations

import json
import math
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest

from fedpeft.paths import REPO_ROOT
from tests.conftest import tiny_config

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import harness  # noqa: E402
from harness import Cell, Study  # noqa: E402

KEPT = {"config.yaml", "metrics.jsonl", "summary.json"}
KEYS = ("phase", "method", "seed")


def _config(dataset: Path, folder: str, method: str, seed: int, lr: float | None) -> dict:
    return tiny_config(
        dataset,
        name=folder.replace("/", "-"),
        method=method,
        seed=seed,
        lr=lr if lr is not None else 1e-2,
        validation_size=24,
        max_test_samples=40,
        eval_every=1,
        threads=1,
    )


def fake_grid(dataset: Path, quick: bool = False) -> list[Cell]:
    """lr cells for lora first; lora at seeds 0 and 1 with the chosen lr; bitfit (no lr group)."""
    cells = []
    for lr in (5e-3, 1e-2):
        folder = f"lr/lora-lr{lr:g}"
        keys = {"phase": "lr", "method": "lora", "seed": 0}
        cells.append(Cell(folder, keys, partial(_config, dataset, folder, "lora", 0), "lora", lr))
    for method, seed in (("lora", 0), ("lora", 1), ("bitfit", 0)):
        folder = f"cells/{method}-s{seed}"
        keys = {"phase": "grid", "method": method, "seed": seed}
        group = "lora" if method == "lora" else None
        config = partial(_config, dataset, folder, method, seed)
        cells.append(Cell(folder, keys, config, lr_group=group))
    return cells


def fake_report(results: harness.Results) -> tuple[list[str], dict]:
    spreads = harness.by_seed(results.select(phase="grid"))
    lines = [*results.header("Fake study"), *harness.lr_table(results, ["lora"], "lr slice.")]
    for key, spread in spreads.items():
        lines.append(f"- {dict(key)['method']}: {spread.text()}")
    methods = {dict(key)["method"]: spread.as_dict() for key, spread in spreads.items()}
    return lines, {"by_method": methods}


@pytest.fixture(scope="module")
def fake(toy_data) -> Study:
    return Study("fake", KEYS, partial(fake_grid, toy_data), fake_report)


@pytest.fixture(scope="module")
def ran(fake, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "fake"
    harness.main(fake, out=out)
    return out


def test_every_cell_runs_and_the_page_and_json_are_written(fake, ran):
    for cell in fake.grid(False):
        summary = json.loads((ran / cell.folder / "summary.json").read_text())
        assert summary["complete"], cell.folder
        assert {p.name for p in (ran / cell.folder).iterdir()} <= KEPT, cell.folder
    selection = json.loads((ran / "lr_selection.json").read_text())
    assert set(selection["winners"]) == {"lora"} and selection["scored_on"] == "validation"
    page = (ran.parent / "fake.md").read_text()
    assert page.startswith("## Fake study\n")
    assert "Missing: 0 study cells, 0 lr cells" in page and "### Learning rate chosen" in page
    figures = json.loads((ran.parent / "fake.json").read_text())
    assert figures["study"] == "fake" and figures["headline"] == "test_accuracy_at_best_val"
    assert figures["cells"] == {"study": 3, "study_missing": 0, "lr": 2, "lr_missing": 0}
    assert figures["by_method"]["lora"]["n"] == 2 and figures["by_method"]["bitfit"]["n"] == 1


def test_lr_winner_is_the_best_on_validation_and_cells_use_it(fake, ran):
    scores = {}
    for cell in fake.grid(False):
        summary = json.loads((ran / cell.folder / "summary.json").read_text())
        if cell.is_lr:
            scores[cell.lr] = summary["best_val_accuracy"]
    winner = json.loads((ran / "lr_selection.json").read_text())["winners"]["lora"]
    assert scores[winner] == max(scores.values())
    assert winner == max(scores, key=lambda lr: scores[lr])  # first of equals, in grid order
    config = (ran / "cells/lora-s1/config.yaml").read_text()
    assert f"lr: {winner}" in config


def test_finished_cells_are_skipped_and_stale_or_broken_ones_redone(fake, ran, tmp_path, capsys):
    out = tmp_path / "fake"
    shutil.copytree(ran, out)
    target = out / "cells/bitfit-s0"
    before = (target / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    harness.main(fake, out=out)
    printed = capsys.readouterr().out
    assert printed.count("skipped (done)") == 5
    assert (target / "summary.json").stat().st_mtime_ns == before

    config_path = target / "config.yaml"  # made with another config: the grid changed
    config_path.write_text(config_path.read_text().replace("rounds: 2", "rounds: 1"))
    harness.main(fake, out=out, only=["method=bitfit"])
    assert "cells/bitfit-s0: redid (stale)" in capsys.readouterr().out
    assert json.loads((target / "summary.json").read_text())["rounds_completed"] == 2

    (target / "summary.json").unlink()  # killed, no checkpoint left: restarted cleanly
    harness.main(fake, out=out, only=["method=bitfit"])
    assert "cells/bitfit-s0: redid (broken)" in capsys.readouterr().out
    assert {p.name for p in target.iterdir()} <= KEPT


def test_a_failing_cell_does_not_end_the_sitting(fake, ran, tmp_path, capsys):
    out = tmp_path / "fake"
    shutil.copytree(ran, out)

    def broken(lr):
        raise RuntimeError("no such dataset")

    cells = fake.grid(False)
    bad = Cell("cells/bad", {"phase": "grid", "method": "bad", "seed": 0}, broken)
    lines = harness.run_cells(out, cells, [bad, cells[-1]], "fake")
    assert "cells/bad: FAILED" in lines[0] and "no such dataset" in lines[0]
    assert lines[1].endswith("cells/bitfit-s0: skipped (done)")


def test_only_and_part_select_cells_by_the_declared_keys(fake):
    cells = fake.grid(False)
    names = lambda chosen: [c.folder for c in chosen]  # noqa: E731
    lr_cells = ["lr/lora-lr0.005", "lr/lora-lr0.01"]
    only = harness.parse_only(["method=bitfit"], KEYS)
    assert names(harness.sitting(cells, only)) == ["cells/bitfit-s0"]  # needs no lr cell
    only = harness.parse_only(["method=lora", "seed=1"], KEYS)
    assert names(harness.sitting(cells, only)) == [*lr_cells, "cells/lora-s1"]
    assert names(harness.sitting(cells, {}, 2, 2)) == [*lr_cells, "cells/lora-s1"]
    assert names(harness.sitting(cells, {}, 3, 3)) == ["cells/bitfit-s0"]
    every = [harness.sitting(cells, {}, i, 3) for i in (1, 2, 3)]
    assert sorted(c.folder for part in every for c in part if not c.is_lr) == sorted(
        c.folder for c in cells if not c.is_lr
    )
    only_lr = harness.parse_only(["phase=lr"], KEYS)
    assert names(harness.sitting(cells, only_lr)) == lr_cells
    assert harness.parse_only(["seed=0,1"], KEYS) == {"seed": {"0", "1"}}
    with pytest.raises(ValueError, match="KEY phase\\|method\\|seed"):
        harness.parse_only(["dataset=rte"], KEYS)
    with pytest.raises(ValueError, match="--part expects"):
        harness.parse_part("0/2")


def _cell(method: str, seed: int, skew: str = "iid") -> Cell:
    keys = {"method": method, "skew": skew, "seed": seed}
    return Cell(f"{method}-{skew}-s{seed}", keys, lambda lr: {})


def test_seed_groups_give_mean_and_spread():
    found = {
        _cell("lora", 0): {"test_accuracy_at_best_val": 0.8, "best_val_round": 2, "x": 3.0},
        _cell("lora", 1): {"test_accuracy_at_best_val": 0.9, "best_val_round": 2, "x": 5.0},
        _cell("lora", 2): {"test_accuracy_at_best_val": 0.7, "best_val_round": 2, "x": None},
        _cell("full", 0): {"test_accuracy_at_best_val": 0.6, "best_val_round": 4, "x": 1.0},
        _cell("lora", 0, "a1"): {"test_accuracy_at_best_val": 0.5, "best_val_round": 2},
    }
    spreads = harness.by_seed(found)
    assert list(spreads) == [
        (("method", "lora"), ("skew", "iid")),
        (("method", "full"), ("skew", "iid")),
        (("method", "lora"), ("skew", "a1")),
    ]
    lora = spreads[("method", "lora"), ("skew", "iid")]
    assert lora.n == 3 and lora.min == 0.7 and lora.max == 0.9
    assert math.isclose(lora.mean, 0.8) and math.isclose(lora.std, 0.1)
    assert lora.text() == "80.0 ± 10.0 (70.0-90.0, n=3)"
    full = spreads[("method", "full"), ("skew", "iid")]
    assert full.std is None and full.text() == "60.0 (n=1)"
    assert full.as_dict() == {"mean": 0.6, "std": None, "min": 0.6, "max": 0.6, "n": 1}
    by_field = harness.by_seed(found, "x")  # a summary field; cells without it are left out
    assert by_field[("method", "lora"), ("skew", "iid")].values == (3.0, 5.0)
    assert math.isclose(by_field[("method", "lora"), ("skew", "iid")].std, math.sqrt(2))
    assert (("method", "lora"), ("skew", "a1")) not in by_field


def test_headline_is_test_at_best_validation_never_the_best_test_round():
    with_val = {
        "test_accuracy_at_best_val": 0.6,
        "best_val_round": 2,
        "best_accuracy": 0.9,  # the max over test rounds: an oracle, never published
        "oracle_best_test_accuracy": 0.9,
        "final_accuracy": 0.7,
    }
    assert harness.headline(with_val) == 0.6
    no_val = {"best_accuracy": 0.9, "oracle_best_test_accuracy": 0.9, "final_accuracy": 0.7}
    assert harness.headline(no_val) == 0.7  # no validation: the final round, not the best
    unscored = {"best_val_round": 3, "test_accuracy_at_best_val": None, "best_accuracy": 0.9}
    assert harness.headline(unscored) is None
    assert harness.headline({"best_accuracy": 0.9}) is None
    assert harness.headline(None) is None
    found = {_cell("lora", 0): no_val, _cell("lora", 1): with_val}
    (spread,) = harness.by_seed(found).values()
    assert spread.values == (0.7, 0.6)


def test_headline_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "study.json"
    data = {"study": "x", "grid": {"ag_news": {"lora": {"iid": 0.8, "a1": None}}}}
    assert harness.write_headline_json(path, data) == path
    assert json.loads(path.read_text()) == data
    assert path.read_text().endswith("}\n")
    with pytest.raises(ValueError):
        harness.write_headline_json(path, {"accuracy": float("nan")})
    assert json.loads(path.read_text()) == data  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_report_helpers():
    assert harness.pct(0.8125) == "81.2" and harness.pct(None) == harness.DASH
    assert harness.fmt_bytes(180_558_912) == "180.6 MB" and harness.fmt_bytes(512) == "512 B"
    assert harness.count(22_566_916) == "22.57M" and harness.count(7_700) == "7.7k"
    assert harness.duration(59) == "59.0 s" and harness.duration(90) == "1.5 min"
    assert round(harness.half_width(0.85, 400), 1) == 3.5
    assert harness.mean([0.5, None, 1.0]) == 0.75 and harness.mean([None]) is None
    assert harness.table(["a", "b"], [["1", ""]]) == ["| a | b |", "|---|---|", "| 1 |  |"]
    summary = {"bytes_up_per_round": 30, "bytes_down_per_round": 50, "clients_per_round": 2}
    assert harness.per_client_round(summary) == 40
    metrics = [{"round": 1, "accuracy": 0.5}, {"round": 2}, {"round": 3, "accuracy": 0.8}]
    assert harness.first_reaching(metrics, 0.7)["round"] == 3
    assert harness.first_reaching(metrics, 0.9) is None
