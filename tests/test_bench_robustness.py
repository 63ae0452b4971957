"""The robustness study (benchmarks/robustness.py, on benchmarks/harness.py): the issue's grid, and
its --quick path end to end on the tiny model and synthetic data: every scenario's config reaches
its run, stragglers miss the deadline, DP cells report epsilon, every cell the attack AUC."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from fedpeft.algorithms import dp
from fedpeft.cli import main as cli_main
from fedpeft.config import build_config
from fedpeft.paths import REPO_ROOT
from tests.conftest import write_dataset

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import robustness as study  # noqa: E402

KEPT = {"config.yaml", "metrics.jsonl", "summary.json", "attackers.json"}


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    write_dataset(root / "ag_news")
    out = tmp_path_factory.mktemp("bench") / "robustness"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_DATA", str(root))
        study.main(quick=True, out=out)
    return out


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_grid_declares_the_issues_table():
    cells = study.grid(quick=False)
    by = {(c.scenario, c.algorithm, c.method, c.seed) for c in cells}
    rules = {"fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"}
    for attack in ("sign_flip", "scale"):
        assert {a for s, a, m, _ in by if s == attack and m == "lora"} == rules
    for scenario in ("crash", "straggler", "label_flip", "dp_z0.5", "dp_z1", "dp_z2"):
        assert (scenario, "fedavg", "lora", 0) in by
    for method in ("full", "adapter", "bitfit"):
        assert {(method, s) for s, _, m, _ in by if m == method} == {
            (method, "clean"),
            (method, "dp_z1"),
        }
    assert {seed for s, a, m, seed in by if (s, a, m) == ("clean", "fedavg", "lora")} == {0, 1, 2}
    assert len(cells) == 33
    for c in cells:  # every full-size config validates (robust rules fit 10 replies)
        config = build_config(c.config(None))
        assert config.num_clients == 20 and config.model == "minilm"
        assert config.privacy.membership_inference


def test_the_full_grids_epsilons_are_those_its_docstring_states():
    got = [dp.epsilon(z, 0.5, 10, 1e-5) for z in study.DP_LEVELS.values()]
    assert got == pytest.approx([34, 11.5, 4.4], rel=0.02)


def test_quick_runs_every_cell_and_writes_the_report(quick_out):
    cells = study.grid(quick=True)
    for cell in cells:
        folder = quick_out / cell.folder
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["complete"], cell.folder
        assert {p.name for p in folder.iterdir()} <= KEPT, cell.folder
        assert 0 <= summary["mia_auc"] <= 1 and summary["mia_rows"] > 0, cell.folder
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["algorithm"] == cell.algorithm and config["method"] == cell.method
        if cell.scenario in ("sign_flip", "scale", "label_flip"):
            assert config["attack"]["type"] == cell.scenario
            assert (folder / "attackers.json").is_file()
        if cell.scenario.startswith("dp_"):
            assert summary["epsilon"] == pytest.approx(
                dp.epsilon(study.DP_LEVELS[cell.scenario], 0.7, 2, 1e-5)
            )
        if cell.algorithm == "bulyan":
            assert config["robust"]["num_byzantine"] == study.BULYAN_F

    straggler = _rows(quick_out / "lora" / "straggler-fedavg-s0")
    late = {d["cid"] for row in straggler for d in row["clients_dropped"]}
    slow = {c for row in straggler for c in row["stragglers_in_round"]}
    assert late and late == slow  # the deadline drops every straggler and no one else
    crash = _rows(quick_out / "lora" / "crash-fedavg-s0")
    assert all(d["reason"] == "crashed" for row in crash for d in row["clients_dropped"])

    page = (quick_out.parent / "robustness.md").read_text()
    assert "Missing: 0 study cells" in page
    for heading in (
        "Faults and attackers",
        "Differential privacy",
        "Membership inference with and without DP",
        "Against the issue's expectations",
    ):
        assert heading in page
    assert (quick_out.parent / "robustness_dp.png").stat().st_size > 0
    figures = json.loads((quick_out.parent / "robustness.json").read_text())
    assert figures["clean"]["n"] == 1
    sign_flip = figures["cells"]["lora/sign_flip-median-s0"]
    clean = figures["clean"]["mean"]
    assert sign_flip["lost_points"] == pytest.approx(100 * (clean - sign_flip["accuracy"]))
    assert figures["cells"]["lora/straggler-fedavg-s0"]["clients_dropped"] == len(
        [d for row in straggler for d in row["clients_dropped"]]
    )
    checks = figures["checks"]
    assert set(checks) == {
        "every_run_completes",
        "robust_rules_hold_sign_flip",
        "dp_epsilon_under_10_costs_under_5",
        "dp_brings_mia_auc_towards_half",
    }
    assert checks["every_run_completes"]["verdict"] == "agrees"
    assert {c["verdict"] for c in checks.values()} <= {"agrees", "differs", "undecided"}


def test_report_only_rewrites_the_page_without_running(quick_out, capsys):
    page = quick_out.parent / "robustness.md"
    page.unlink()
    assert (
        cli_main(["bench", "robustness", "--quick", "--out", str(quick_out), "--report-only"]) == 0
    )
    assert "Missing: 0 study cells" in page.read_text()
    assert "skipped" not in capsys.readouterr().out
