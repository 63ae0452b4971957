"""The C2A study (benchmarks/c2a.py, on benchmarks/harness.py): its --quick path end to end on the
tiny model and synthetic data (label skew and a natural `lang` split), seeds, lr groups, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from fedpeft.paths import REPO_ROOT
from tests.conftest import write_dataset

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import c2a as study  # noqa: E402

KEPT = {"config.yaml", "metrics.jsonl", "summary.json"}


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    write_dataset(root / "ag_news")
    write_dataset(root / "umsab")  # the toy rows carry lang: en / de
    out = tmp_path_factory.mktemp("bench") / "c2a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_DATA", str(root))
        study.main(quick=True, out=out)
    return out


def test_grid_declares_the_issue_and_seeds():
    cells = study.grid(quick=False)
    label = [c for c in cells if c.phase == "label"]
    assert {c.dataset for c in label} == {"ag_news", "20newsgroups"}
    assert {c.skew for c in label} == {"a0.1", "a1"}
    seeded = {(c.dataset, c.method, c.skew): [] for c in label}
    for c in label:
        seeded[c.dataset, c.method, c.skew].append(c.seed)
    for (_, method, skew), seeds in seeded.items():
        three = method in ("c2a", "c2a_client", "adapter", "lora") and skew == "a0.1"
        assert seeds == ([0, 1, 2] if three else [0])
    language = [c for c in cells if c.phase == "language"]
    assert {c.method for c in language} == set(study.VARIANTS)
    assert len(label) == 52 and len(language) == 9
    for baseline in ("fedprox_adapter", "local_adapter", "adapter_finetune"):
        assert {c.lr_group for c in cells if c.method == baseline} == {"adapter"}


def test_quick_runs_every_cell_and_writes_the_report(quick_out):
    cells = study.grid(quick=True)
    winners = json.loads((quick_out / "lr_selection.json").read_text())["winners"]
    assert set(winners) == {"c2a", "adapter", "lora", "full"}
    for cell in cells:
        folder = quick_out / cell.folder
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["complete"], cell.folder
        assert {p.name for p in folder.iterdir()} <= KEPT, cell.folder
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["seed"] == cell.seed and config["validation_size"] > 0
        if not cell.is_lr:
            assert config["lr"] == winners[cell.lr_group]
            assert "personalized_accuracy_mean" in summary
        if cell.method == "fedprox_adapter":
            assert config["algorithm"] == "fedprox" and config["method"] == "adapter"
        if cell.phase == "language":
            assert config["partition"] == "natural" and config["partition_field"] == "lang"

    page = (quick_out.parent / "c2a.md").read_text()
    assert "Missing: 0 study cells, 0 lr cells" in page
    for heading in (
        "Label skew: accuracy",
        "Language skew: umsab",
        "Against the paper",
    ):
        assert heading in page
    local_rows = [line for line in page.splitlines() if line.startswith("| local_adapter |")]
    global_row, personal_row, language_row = local_rows[:3]  # quick mode: ag_news only
    assert global_row.count("n/a (no global model)") == 2  # both skews
    assert "n/a" not in personal_row  # its personalised accuracy is the point
    assert language_row.count("n/a (no global model)") == 2  # mean per-language and overall
    assert (quick_out.parent / "c2a_accuracy_vs_alpha.png").stat().st_size > 0

    figures = json.loads((quick_out.parent / "c2a.json").read_text())
    c2a_strong = figures["label"]["ag_news"]["c2a"]["a0.1"]
    assert c2a_strong["accuracy"]["n"] == 2  # two seeds in quick mode
    assert figures["label"]["ag_news"]["full"]["a0.1"]["accuracy"]["n"] == 1
    assert figures["language"]["c2a"]["mean_per_language"] is not None
    assert set(figures["pending"]) == set(study.PENDING)
    assert {c["verdict"] for c in figures["checks"].values()} <= {"agrees", "differs", "undecided"}
    assert figures["checks"]["c2a_step_under_1.3x_adapter"]["verdict"] == "undecided"  # no JSON
    client = figures["checks"]["c2a_client_beats_adapter_and_lora_personalised_a0.1"]
    assert set(client["gap_points"]) == {"ag_news vs adapter", "ag_news vs lora"}
    assert "### Rounds to a target accuracy" in page
    to_target = figures["rounds_to_target"]["label"]["ag_news"]
    assert len(to_target["c2a"]["a0.1"]) == 2  # one figure per seed
    assert to_target["local_adapter"]["a0.1"] is None  # no global model to reach it


class _Found:
    """The part of harness.Results that _rounds_to_target reads."""

    def __init__(self, found):
        self.found = found

    def select(self, **where):
        return self.found


def _cell(method: str, seed: int):
    return study.cell("label", "ag_news", method, "a0.1", seed, quick=True)


def _metrics(*accuracies):
    return [{"round": 2 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]


def test_rounds_to_target_is_the_first_round_at_95_percent_of_full_per_seed():
    from harness import Spread

    found = _Found(
        {
            _cell("c2a", 1): {"metrics": _metrics(0.5, 0.7, 0.75)},  # never 0.76
            _cell("c2a", 0): {"metrics": _metrics(0.5, 0.76, 0.9)},  # 0.95 * 0.8 at round 4
            _cell("full", 0): {"metrics": _metrics(0.8)},
            _cell("local_adapter", 0): {"metrics": _metrics(0.9)},
        }
    )
    accuracy = {("ag_news", "full", "a0.1"): Spread((0.8,))}
    rounds = study._rounds_to_target(found, accuracy)
    assert rounds[("ag_news", "c2a", "a0.1")] == [4, None]  # seed order, not insertion order
    assert rounds[("ag_news", "full", "a0.1")] == [2]
    assert ("ag_news", "local_adapter", "a0.1") not in rounds
    assert study._rounds_text("c2a", [4, None]) == "4, no"
    assert study._rounds_text("local_adapter", None) == "n/a"
    assert study._rounds_to_target(found, {}) == {}  # no full fine-tuning yet: no target
