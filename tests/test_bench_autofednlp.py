"""The AutoFedNLP study (benchmarks/autofednlp.py, on benchmarks/harness.py): the target and every
choice on validation, the class subset, and the --quick path end to end on the tiny model."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import yaml

from fedpeft.cli import main as cli
from fedpeft.paths import REPO_ROOT
from tests.conftest import write_dataset

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import autofednlp as study  # noqa: E402


def _run(vals, accs, sims=None):
    """A finished run: per-round validation and test accuracy, simulated time."""
    sims = sims or [10.0 * (i + 1) for i in range(len(vals))]
    metrics = [
        {"round": i + 1, "val_accuracy": v, "accuracy": a, "sim_time_total_s": t}
        for i, (v, a, t) in enumerate(zip(vals, accs, sims, strict=True))
    ]
    best = max(range(len(vals)), key=lambda i: vals[i])
    return {
        "metrics": metrics,
        "best_val_accuracy": vals[best],
        "best_val_round": best + 1,
        "test_accuracy_at_best_val": accs[best],
    }


def test_target_is_99_percent_of_vanillas_converged_accuracy_never_its_best_test():
    # vanilla's best test round (0.90) is not its best validation round (0.80 there)
    runs = {
        "vanilla": _run([0.5, 0.7, 0.6], [0.6, 0.8, 0.9]),
        "adapter_d1w8": _run([0.6, 0.75, 0.72], [0.7, 0.7, 0.95]),
        "lf_d1": _run([0.4, 0.5, 0.5], [0.99, 0.5, 0.5]),
    }
    goal = study.targets(runs)
    assert goal["target"] == pytest.approx(0.99 * 0.8)
    assert goal["best_run"] == "adapter_d1w8"  # best on validation, not lf_d1's 0.99 on test
    assert goal["target_best_run"] == pytest.approx(0.99 * 0.7)
    assert goal["val_target"] == pytest.approx(0.99 * 0.7)


def test_sweeps_are_chosen_on_validation():
    fast_on_val = _run([0.70, 0.71], [0.5, 0.5])  # reaches the validation target first
    fast_on_test = _run([0.5, 0.69], [0.9, 0.9])  # would win on test: never chosen
    runs = {"lf_d1": fast_on_test, "lf_d2": fast_on_val}
    assert study.chosen_on_validation(runs, val_target=0.69) == "lf_d2"
    # none reaches the target: the best validation accuracy
    assert study.chosen_on_validation(runs, val_target=0.99) == "lf_d2"
    assert (
        study.chosen_on_validation({"a": _run([0.6], [0.1]), "b": _run([0.5], [0.9])}, None) == "a"
    )


def test_ratios_are_null_where_a_run_never_reached_the_target():
    assert study.ratio(300.0, 20.0) == 15.0
    assert study.ratio(None, 20.0) is None and study.ratio(300.0, None) is None
    assert study.time_to(_run([0.1, 0.5], [0.2, 0.6])["metrics"], 0.55)["round"] == 2
    assert study.time_to(_run([0.1, 0.5], [0.2, 0.6])["metrics"], 0.7) is None


def test_class_subset_keeps_and_renumbers_the_chosen_classes(tmp_path):
    source = write_dataset(tmp_path / "src")  # labels: sports, business, tech, world
    folder = study.class_subset(source, ("tech", "sports"), tmp_path / "out")
    assert json.loads((folder / "labels.json").read_text()) == ["tech", "sports"]
    original = [json.loads(x) for x in (source / "train.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    assert len(kept) == sum(r["label"] in (0, 2) for r in original)
    assert {r["label"] for r in kept} == {0, 1}
    assert all(
        k["text"] == o["text"]
        for k, o in zip(kept, [r for r in original if r["label"] in (0, 2)], strict=True)
    )
    assert study.class_subset(source, ("tech", "sports"), tmp_path / "out") == folder
    with pytest.raises(ValueError, match="unknown \\['weather'\\]"):
        study.class_subset(source, ("tech", "weather"), tmp_path / "out")


def test_queue_runs_every_cell_once_longest_first_and_int8_after_its_sweep(tmp_path, monkeypatch):
    cells = study.grid(quick=False)
    order = study.queue(cells)
    assert sorted(c.folder for c in order) == sorted(c.folder for c in cells)
    assert {c.run for c in order[:2]} == {"autofednlp"}
    assert {c.run for c in order[-2:]} == {"lf_oracle_int8"}
    monkeypatch.setattr(study, "RUNS", tmp_path)  # no finished sweep there
    int8 = next(c for c in cells if c.run == "lf_oracle_int8")
    with pytest.raises(ValueError, match="waits for vanilla and the LF sweep \\(vanilla unf"):
        int8.config(None)


def test_full_settings_follow_the_issue():
    ag_news, newsgroups = study.settings(quick=False)
    assert (ag_news.source, ag_news.partition, ag_news.alpha) == ("ag_news", "dirichlet", 10.0)
    assert "max_train_samples" not in ag_news.common  # all the rows we have
    assert newsgroups.partition == "iid" and len(newsgroups.classes) == 5
    for setting in (ag_news, newsgroups):
        assert setting.common["num_clients"] == 100
        assert setting.autofednlp == {"rounds_per_period": 20}
        configs = study.method_configs(setting)
        assert {"vanilla", "ftq", "autofednlp", *study.FIRST_PERIODS} <= set(configs)
        for name, config in configs.items():
            assert config["cost"] == study.COST
            if name not in study.FIRST_PERIODS:
                assert config["early_stop"]["patience"] >= 1, name
        pair = [configs[name] for name in study.FIRST_PERIODS]
        assert pair[0]["activation_cache"].get("store_hidden", True) is True
        assert pair[1]["activation_cache"]["store_hidden"] is False
        assert pair[0]["rounds"] == pair[1]["rounds"] == setting.nocache_periods
        without = [{k: v for k, v in c.items() if k != "activation_cache"} for c in pair]
        assert without[0] == without[1]  # the pair differs in the cache alone


def test_quick_runs_resume_and_write_the_page(tmp_path, monkeypatch, capsys):
    data = tmp_path / "shared"
    write_dataset(data / "ag_news")
    write_dataset(data / "20newsgroups")
    monkeypatch.setenv("FEDPEFT_DATA", str(data))
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    started = time.perf_counter()
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out)]) == 0
    print(f"quick study: {time.perf_counter() - started:.0f} s")
    runs = out / "autofednlp_quick_runs"
    cells = study.grid(quick=True)
    assert {c.run for c in cells} >= {"vanilla", "ftq", "lf_oracle_int8", "autofednlp_nocache"}
    for cell in cells:
        summary = json.loads((runs / cell.folder / "summary.json").read_text())
        assert summary["complete"], cell.folder
        if cell.run not in study.FIRST_PERIODS:
            assert summary["converged"] or summary["cap_hit"], cell.folder
    figures = json.loads((out / "autofednlp_quick.json").read_text())["datasets"]
    assert set(figures) == {"ag_news", "20newsgroups"}
    for name, fig in figures.items():
        for key in (
            "target",
            "chance",
            "min_rounds_per_candidate",
            "vs_vanilla",
            "vs_best_strong_baseline",
            "vs_oracle_adapter",
        ):
            assert key in fig, (name, key)
        vanilla = json.loads((runs / name / "vanilla/summary.json").read_text())
        assert fig["target"] == pytest.approx(0.99 * vanilla["test_accuracy_at_best_val"])
        assert fig["min_rounds_per_candidate"] >= 2  # quick: rounds_per_period 2
        assert fig["cache"]["sim_time_equal"] is True
        auto = fig["runs"]["autofednlp"]  # its rounds: every candidate's, every period
        assert auto["candidate_rounds"] == sum(sum(p.values()) for p in fig["rounds_per_candidate"])
        assert auto["rounds"] == len(fig["rounds_per_candidate"])  # one row per trial period
        int8 = yaml.safe_load((runs / name / "lf_oracle_int8/config.yaml").read_text())
        assert int8["full"]["depth"] == int(fig["lf_oracle"].removeprefix("lf_d"))
        assert int8["quantize"] == "int8"
    assert figures["20newsgroups"]["chance"] == pytest.approx(1 / 3)  # quick: a 3-class subset
    assert figures["ag_news"]["chance"] == pytest.approx(1 / 4)
    page = (out / "autofednlp_quick.md").read_text()
    below = sum(fig["target"] <= fig["chance"] for fig in figures.values())
    assert page.count("not above chance") == below
    assert "### ag_news" in page and "LF_oracle" in page and "Activation cache" in page
    # the three AutoFedNLP rows (the run, the cache's pair) of both datasets
    assert (
        len(re.findall(r"\| \d+ periods? \([\d,]+ rounds\) \|", page)) == 6
        and page.count("| first period(s) only |") == 4
    )

    capsys.readouterr()
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out), "--only", "run=ftq"]) == 0
    printed = capsys.readouterr().out
    assert "ag_news/ftq: skipped (done)" in printed and "vanilla" not in printed


def test_report_only_waits_for_runs(tmp_path):
    out = tmp_path / "results"
    assert cli(["bench", "autofednlp", "--quick", "--out", str(out), "--report-only"]) == 0
    page = (out / "autofednlp_quick.md").read_text()
    assert "0 of 10 runs finished" in page
