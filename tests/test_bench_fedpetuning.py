"""The FedPETuning study (benchmarks/fedpetuning.py, on benchmarks/harness.py): the --quick path end
to end on the tiny model and synthetic data, resumable cells, lr chosen on validation only, a report
with missing cells, its headline JSON."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from fedpeft.cli import main as cli
from fedpeft.config import build_config, dump_config
from fedpeft.paths import REPO_ROOT
from tests.conftest import write_dataset

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import fedpetuning as study  # noqa: E402
import harness  # noqa: E402

KEPT = {"config.yaml", "metrics.jsonl", "summary.json"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    write_dataset(root / "ag_news")
    write_dataset(root / "rte", pairs=True)
    return root


@pytest.fixture
def shared(data_root, monkeypatch) -> Path:
    monkeypatch.setenv("FEDPEFT_DATA", str(data_root))
    return data_root


@pytest.fixture(scope="module")
def quick_out(data_root, tmp_path_factory) -> Path:
    """One full --quick study through the CLI, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("bench") / "fedpetuning"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_DATA", str(data_root))
        assert cli(["bench", "fedpetuning", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_runs_every_cell_and_writes_the_report(quick_out):
    cells = study.grid(quick=True)
    assert {c.phase for c in cells} == {"lr", "grid", "scale"}
    for cell in cells:
        folder = quick_out / cell.folder
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["complete"], cell.folder
        assert {p.name for p in folder.iterdir()} <= KEPT, cell.folder  # small enough to commit
    selection = json.loads((quick_out / "lr_selection.json").read_text())
    assert set(selection["winners"]) == set(study.ALL_METHODS)
    page = (quick_out.parent / "fedpetuning.md").read_text()
    assert "Missing: 0 study cells, 0 lr cells" in page
    for heading in ("Learning rate chosen on validation", "Trainable parameters", "Scale:"):
        assert heading in page
    assert "against the paper's pattern" in page.lower()
    for name in ("fedpetuning_accuracy_vs_alpha.png", "fedpetuning_accuracy_vs_bytes.png"):
        assert (quick_out.parent / name).stat().st_size > 0
    figures = json.loads((quick_out.parent / "fedpetuning.json").read_text())
    assert figures["study"] == "fedpetuning" and figures["headline"] == "test_accuracy_at_best_val"
    assert figures["cells"]["study_missing"] == 0
    cell = study.cell("grid", "rte", "lora", "iid", 4, quick=True)
    summary = json.loads((quick_out / cell.folder / "summary.json").read_text())
    ours = figures["grid"]["rte"]["lora"]["iid"]
    assert ours["accuracy"] == summary["test_accuracy_at_best_val"]
    assert ours["trainable_params"] == summary["trainable_params"]
    assert set(figures["scale"]["accuracy"]["full"]) == {"4", "8"}
    assert {c["verdict"] for c in figures["pattern"].values() if isinstance(c, dict)} <= {
        "agrees",
        "differs",
        "undecided",
    }


def test_grid_cells_use_the_selected_lr_and_validation(quick_out):
    winners = json.loads((quick_out / "lr_selection.json").read_text())["winners"]
    for cell in study.grid(quick=True):
        config = yaml.safe_load((quick_out / cell.folder / "config.yaml").read_text())
        assert config["validation_size"] > 0
        if cell.phase != "lr":
            assert config["lr"] == winners[cell.method]


def test_lr_selection_reads_validation_never_test(tmp_path):
    """Two lrs where validation and test disagree: the validation winner is chosen."""
    cells = [study.cell("lr", "ag_news", "lora", "a1", 4, lr, quick=True) for lr in (5e-3, 1e-2)]
    scores = {5e-3: (0.9, 0.1), 1e-2: (0.2, 0.99)}  # lr -> (validation, test)
    for cell in cells:
        val, test = scores[cell.lr]
        folder = tmp_path / cell.folder
        folder.mkdir(parents=True)
        summary = {
            "complete": True,
            "best_val_accuracy": val,
            "best_accuracy": test,
            "test_accuracy_at_best_val": test,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    selection = harness.select_lrs(tmp_path, cells)
    assert selection["winners"] == {"lora": 5e-3}
    assert selection["scored_on"] == "validation"
    config = cells[0].config(harness.lr_for(cells[0], {"lora": 1e-2}))  # an lr cell: its own lr
    assert config["validation_size"] > 0 and config["lr"] == 5e-3
    grid_cell = study.cell("grid", "rte", "lora", "iid", 4, quick=True)  # a study cell: the winner
    assert grid_cell.config(harness.lr_for(grid_cell, selection["winners"]))["lr"] == 5e-3


def test_finished_cells_are_skipped_and_broken_ones_redone(
    quick_out, shared, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "fedpetuning"
    shutil.copytree(quick_out, out)
    only = ["--only", "dataset=rte", "--only", "method=lora", "--only", "skew=iid"]
    lr_cell = study.cell("lr", "ag_news", "lora", "a1", 4, 5e-3, quick=True)
    done = study.cell("grid", "rte", "lora", "iid", 4, quick=True)
    before = (out / done.folder / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), *only]) == 0
    printed = capsys.readouterr().out
    assert f"{done.folder}: skipped (done)" in printed
    assert f"{lr_cell.folder}: skipped (done)" in printed
    assert (out / done.folder / "summary.json").stat().st_mtime_ns == before

    # killed before its summary said complete, checkpoint present: resumed from it
    shutil.rmtree(out / done.folder)
    with monkeypatch.context() as patch:
        patch.setattr(harness, "_tidy", lambda folder: None)  # keep the checkpoint this time
        assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), *only]) == 0
    summary_path = out / done.folder / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "complete": False}))
    assert (out / done.folder / "checkpoint.json").is_file()
    capsys.readouterr()
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), *only]) == 0
    assert f"{done.folder}: resumed" in capsys.readouterr().out
    assert json.loads(summary_path.read_text())["complete"]
    assert {p.name for p in (out / done.folder).iterdir()} <= KEPT

    # broken without a checkpoint (half-written metrics, no summary): restarted cleanly
    summary_path.unlink()
    (out / done.folder / "metrics.jsonl").write_text('{"round": 1, "accur')
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), *only]) == 0
    assert f"{done.folder}: redid (broken)" in capsys.readouterr().out
    assert json.loads(summary_path.read_text())["complete"]

    # a cell made with another config (the grid changed) is redone too
    config_path = out / done.folder / "config.yaml"
    config_path.write_text(config_path.read_text().replace("rounds: 2", "rounds: 1"))
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), *only]) == 0
    assert f"{done.folder}: redid (stale)" in capsys.readouterr().out


def test_report_renders_with_missing_cells(quick_out, shared, tmp_path):
    out = tmp_path / "fedpetuning"
    out.mkdir()
    page = tmp_path / "fedpetuning.md"
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), "--report-only"]) == 0
    text = page.read_text()
    study_cells = [c for c in study.grid(quick=True) if c.phase != "lr"]
    assert f"Missing: {len(study_cells)} study cells" in text
    assert "—" in text and "undecided" in text

    kept = study.cell("grid", "rte", "full", "iid", 4, quick=True)
    shutil.copytree(quick_out / kept.folder, out / kept.folder)
    assert cli(["bench", "fedpetuning", "--quick", "--out", str(out), "--report-only"]) == 0
    text = page.read_text()
    assert f"Missing: {len(study_cells) - 1} study cells" in text
    assert "| lora | — | — |" in text  # the method without cells: dashes, not a crash
    figures = json.loads((tmp_path / "fedpetuning.json").read_text())
    assert figures["grid"]["rte"]["lora"]["iid"] is None
    assert figures["grid"]["rte"]["full"]["iid"]["accuracy"] is not None
    assert figures["pattern"]["prefix_weakest"]["verdict"] == "undecided"


def test_filters_and_parts_are_checked(capsys, monkeypatch):
    assert harness.parse_only(["dataset=rte,sst2", "method=lora"], study.STUDY.keys) == {
        "dataset": {"rte", "sst2"},
        "method": {"lora"},
    }
    assert harness.parse_part("2/3") == (2, 3)
    assert cli(["bench", "fedpetuning", "--quick", "--only", "colour=red", "--report-only"]) == 2
    assert "--only expects" in capsys.readouterr().err
    assert cli(["bench", "fedpetuning", "--quick", "--part", "4/3"]) == 2
    monkeypatch.setattr(study, "main", lambda quick=False, out=None: None)  # no sittings
    assert cli(["bench", "fedpetuning", "--quick", "--part", "1/2"]) == 2
    assert "does not take --part" in capsys.readouterr().err


def test_only_the_grid_keys_decide_staleness(quick_out, shared):
    """A key the package adds later does not make finished cells stale; a grid key does."""
    cell = study.cell("grid", "rte", "bitfit", "iid", 4, quick=True)
    winners = json.loads((quick_out / "lr_selection.json").read_text())["winners"]
    config = cell.config(harness.lr_for(cell, winners))
    wanted = dump_config(build_config(config))
    folder = quick_out / cell.folder
    assert harness.cell_state(folder, wanted, set(config)) == "done"
    assert harness.cell_state(folder, wanted + "new_setting: 1\n", set(config)) == "done"
    changed = wanted.replace("max_seq_len: 24", "max_seq_len: 32")
    assert harness.cell_state(folder, changed, set(config)) == "stale"


def test_datasets_at_chance_are_left_out_of_the_pattern():
    """rte where full fine-tuning sits at chance: excluded from the gap and weakest-method checks,
    and the page says so; ag_news, well above chance, stays."""
    s = study.SETTINGS
    cells = {}
    for skew in s["skews"]:
        cells[("ag_news", "full", skew)] = {"test_accuracy_at_best_val": 0.80}
        cells[("rte", "full", skew)] = {"test_accuracy_at_best_val": 0.53}
    learned, lines = study._learned_datasets(cells, s)
    assert learned == ["ag_news"]
    assert len(lines) == 1 and "rte" in lines[0] and "53.0%" in lines[0]
    cells[("rte", "full", "iid")] = {"test_accuracy_at_best_val": 0.98}  # mean 0.6425 > 0.6
    assert study._learned_datasets(cells, s)[0] == ["ag_news", "rte"]
