"""The AutoFedNLP study (benchmarks/autofednlp.py, on benchmarks/harness.py): the --quick path end
to end on the tiny model and synthetic data, its runs resumable, its page and figures written."""

from __future__ import annotations

import json
import sys

from fedpeft.cli import main as cli
from fedpeft.paths import REPO_ROOT
from tests.conftest import write_dataset

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import autofednlp as study  # noqa: E402


def test_quick_runs_resume_and_write_the_page(tmp_path, monkeypatch, capsys):
    data = tmp_path / "shared"
    write_dataset(data / "ag_news")
    monkeypatch.setenv("FEDPEFT_DATA", str(data))
    out = tmp_path / "results"
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out)]) == 0
    runs = out / "autofednlp_quick_runs"
    cells = study.grid(quick=True)
    assert {c.run for c in cells} >= {"vanilla", "ftq", "autofednlp"}
    for cell in cells:
        assert json.loads((runs / cell.folder / "summary.json").read_text())["complete"]
    page = (out / "autofednlp_quick.md").read_text()
    assert "### ag_news" in page and "LF_oracle" in page and "speed-up" in page
    facts = json.loads((out / "autofednlp_ag_news.json").read_text())
    assert set(facts) == {c.run for c in cells}
    figures = json.loads((out / "autofednlp_quick.json").read_text())
    ours = figures["datasets"]["ag_news"]["runs"]["vanilla"]
    summary = json.loads((runs / "ag_news/vanilla/summary.json").read_text())
    assert ours["accuracy"] == summary["test_accuracy_at_best_val"]
    assert ours["best_test_accuracy"] == facts["vanilla"]["best"]
    assert (out / "autofednlp_ag_news_acc_vs_sim_time.png").stat().st_size > 0

    capsys.readouterr()
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out), "--only", "run=ftq"]) == 0
    printed = capsys.readouterr().out
    assert "ag_news/ftq: skipped (done)" in printed and "vanilla" not in printed


def test_report_only_waits_for_runs_and_keeps_an_existing_page(tmp_path):
    out = tmp_path / "results"
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out), "--report-only"]) == 0
    page = (out / "autofednlp_quick.md").read_text()
    assert "0 of 5 runs finished" in page and "Not measured yet" in page
    (out / "autofednlp_quick.md").write_text("kept\n")
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out), "--report-only"]) == 0
    assert (out / "autofednlp_quick.md").read_text() == "kept\n"
