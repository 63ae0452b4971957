"""Export: every method's model, in every model family, loads without fedpeft and computes the
run's logits; predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedpeft import export
from fedpeft.cli import main
from fedpeft.models import FAMILIES
from tests.conftest import tiny_config

METHODS = ("lora", "prefix", "prompt", "adapter", "bitfit", "full", "autofednlp")
FAMILY_NAMES = tuple(family.name for family in FAMILIES)
DECODERS = {family.name for family in FAMILIES if family.decoder}
# every exportable method on every family; distilbert's attention takes no prefix
CASES = [
    (family, method)
    for family in FAMILY_NAMES
    for method in METHODS
    if (family, method) != ("distilbert", "prefix")
]
SETTINGS = {  # autofednlp: trial groups of 2 clients; a tiny budget so layouts change each round
    "autofednlp": {
        "num_clients": 6,
        "clients_per_round": 2,
        "rounds": 3,
        "autofednlp": {"tau": 1e-3},
    }
}
LABELS = ["sports", "business", "tech", "world"]  # the toy dataset's labels.json
TEXTS = [
    "football match goal",
    "the market says stock price rose after a big week",
    "a new chip",
    "today the president and the army signed a treaty on the internet robot phone report",
]

# Runs in a fresh interpreter: transformers and peft only, never fedpeft.
CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

exports, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
result = {}
for case, (folder, kind) in exports.items():
    if kind == "peft adapter":
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            folder + "/base", trust_remote_code=True
        )
        model = PeftModel.from_pretrained(base, folder)
        id2label = base.config.id2label
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        id2label = model.config.id2label
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model.eval()
    with torch.no_grad():
        together = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
        logits = model(**together).logits
        alone = [model(**tokenizer([t], truncation=True, return_tensors="pt")).logits[0]
                 for t in texts]
    result[case] = {
        "logits": logits.tolist(),
        "alone": torch.stack(alone).tolist(),
        "labels": [id2label[i] for i in range(len(id2label))],
    }
# without trust_remote_code transformers must refuse, not fall back to the stock class
result["stock_load"] = {}
for case, (folder, kind) in exports.items():
    if case.endswith("/full"):
        try:
            AutoModelForSequenceClassification.from_pretrained(folder)
            result["stock_load"][case] = "loaded"
        except Exception as err:
            result["stock_load"][case] = type(err).__name__
result["fedpeft_imported"] = any(name.split(".")[0] == "fedpeft" for name in sys.modules)
print("\nRESULT " + json.dumps(result))  # own line: a refused prompt leaves text before it
"""


def case_id(family: str, method: str) -> str:
    return f"{family}/{method}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_data) -> dict[str, Path]:
    """One finished tiny run per family and method (1 round; autofednlp 3, growing its
    adapters)."""
    root = tmp_path_factory.mktemp("export_runs")
    folders = {}
    for family, method in CASES:
        config = root / f"{family}-{method}.yaml"
        model = "tiny" if family == "bert" else f"tiny-{family}"
        settings = {"rounds": 1, "model": model, **SETTINGS.get(method, {})}
        if family != "bert":  # the full-size toy data stays with BERT, the reference case
            settings.update(max_train_samples=120, max_test_samples=32)
        config.write_text(yaml.safe_dump(tiny_config(toy_data, method=method, **settings)))
        folder = folders[case_id(family, method)] = root / f"{family}-{method}"
        assert main(["run", str(config), "--out", str(folder), "--quiet"]) == 0
    return folders


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for case, run in runs.items():
        result = export.export_run(run, root / case.replace("/", "-"))
        folders[case] = (result.out, result.kind)
    return folders


@pytest.fixture(scope="module")
def loaded_elsewhere(exported, tmp_path_factory) -> dict:
    """What a fresh interpreter without fedpeft computes from the exports."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path_factory.mktemp("hf_modules")))
    env.pop("PYTHONPATH", None)
    specs = {case: (str(folder), kind) for case, (folder, kind) in exported.items()}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(specs), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("elsewhere"),
        stdin=subprocess.DEVNULL,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_loads_without_fedpeft(family, loaded_elsewhere):
    assert loaded_elsewhere["fedpeft_imported"] is False
    stock = loaded_elsewhere["stock_load"][case_id(family, "full")]
    assert stock != "loaded"


@pytest.mark.parametrize(("family", "method"), CASES)
def test_exported_model_gives_the_runs_logits(family, method, runs, loaded_elsewhere):
    run = export.load_run_model(runs[case_id(family, method)])
    assert run.weights.name == "best.safetensors"  # validation is on: best weights by default
    expected = export.logits(run, TEXTS)
    got = loaded_elsewhere[case_id(family, method)]
    assert torch.allclose(torch.tensor(got["logits"]), expected, atol=1e-5)
    # one row alone or padded in a batch: the same answer (pooling ignores padding)
    assert torch.allclose(torch.tensor(got["alone"]), expected, atol=1e-5)
    assert got["labels"] == LABELS
    # the rows differ: equal logits are not an artefact of a constant model
    assert not torch.allclose(expected[0], expected[1], atol=1e-4)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_export_folder_layout(family, method, exported):
    folder, kind = exported[case_id(family, method)]
    model_folder = folder / export.BASE_FOLDER if method in export.PEFT_METHODS else folder
    assert kind == ("peft adapter" if method in export.PEFT_METHODS else "transformers model")
    if method in export.PEFT_METHODS:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert (folder / "adapter_model.safetensors").is_file()
        assert adapter["task_type"] == "SEQ_CLS"
        assert adapter["base_model_name_or_path"] == str(model_folder.resolve())
    config = json.loads((model_folder / "config.json").read_text())
    model_type = family  # each tiny model's transformers model type is its family's name
    assert config["model_type"] == f"fedpeft_{model_type}"
    assert config["pooling"] == ("last" if family in DECODERS else "mean")
    assert "AutoModelForSequenceClassification" in config["auto_map"]
    modeling = model_folder / f"modeling_fedpeft_{model_type}.py"
    assert modeling.is_file() and "import fedpeft" not in modeling.read_text()
    readme = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in readme and modeling.name in readme
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 24  # the run's max_seq_len
    if family in DECODERS:  # decoders pad on the right, with the pad token the run used
        assert tokenizer["padding_side"] == "right"
        assert config["pad_token_id"] is not None


def test_adapter_export_records_its_sites(exported, runs):
    config = json.loads((exported["bert/adapter"][0] / "config.json").read_text())
    assert config["bottleneck_adapters"] == [
        {"module": f"bert.encoder.layer.{i}.output.dense", "width": 64, "activation": "relu"}
        for i in (0, 1)
    ]
    config = json.loads((exported["gpt2/adapter"][0] / "config.json").read_text())
    assert [site["module"] for site in config["bottleneck_adapters"]] == [
        f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)
    ]
    # autofednlp: the layout of the exported (best) round, whatever the run started with
    for family in ("bert", "llama"):
        run = runs[case_id(family, "autofednlp")]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        best = max(rows, key=lambda row: row["val_accuracy"])
        folder = exported[case_id(family, "autofednlp")][0]
        sites = json.loads((folder / "config.json").read_text())["bottleneck_adapters"]
        assert len(sites) == best["depth"] and all(s["width"] == best["width"] for s in sites)


def test_export_cli_weights_choice_and_refusals(runs, tmp_path, capsys):
    out = tmp_path / "final"
    assert main(["export", str(runs["bert/bitfit"]), "--out", str(out), "--weights", "final"]) == 0
    printed = capsys.readouterr().out
    assert "weights.safetensors" in printed and "trust_remote_code=True" in printed
    assert (out / "model.safetensors").is_file()
    assert main(["export", str(runs["bert/bitfit"]), "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_weights_file_choice(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert export.weights_path(tmp_path).name == "weights.safetensors"
    with pytest.raises(export.ExportError, match="best.safetensors does not exist"):
        export.weights_path(tmp_path, "best")
    (tmp_path / "best.safetensors").write_bytes(b"")
    assert export.weights_path(tmp_path).name == "best.safetensors"
    assert export.weights_path(tmp_path, "final").name == "weights.safetensors"
    with pytest.raises(export.ExportError, match="not finished"):
        export.weights_path(tmp_path / "nothing")


def test_method_without_export_is_one_line(tmp_path, toy_data, capsys):
    run = tmp_path / "c2a-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(toy_data, method="c2a")))
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: method 'c2a' cannot be exported") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_predict_prints_label_and_probability(runs, exported, loaded_elsewhere, capsys, tmp_path):
    run = str(runs["bert/lora"])
    assert main(["predict", run, "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    logits = torch.tensor(loaded_elsewhere["bert/lora"]["logits"])
    for line, text, row in zip(lines, TEXTS, logits, strict=False):
        label, prob, shown = line.split("\t")
        assert label == LABELS[int(row.argmax())]
        assert abs(float(prob) - float(torch.softmax(row, -1).max())) < 1e-3
        assert shown == text
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["predict", run, "--file", str(rows)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(TEXTS)


def test_predict_input_errors_are_one_line(runs, tmp_path, capsys):
    run = str(runs["bert/lora"])
    assert main(["predict", run]) == 2
    assert "--text" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["predict", run, "--file", str(rows)]) == 2
    assert f"{rows}:2:" in capsys.readouterr().err


def _seed_system_run(tmp_path, toy_data, method: str, **extra) -> str:
    from fedpeft.config import build_config, dump_config
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir

    config = build_config(tiny_config(toy_data, method=method, rounds=1, **extra))
    run = RunDir.create(tmp_path / method, dump_config(config))
    EmbeddedEngine(build_job(config), run).run()
    return str(run.path)


def test_predict_with_a_c2a_run_uses_the_global_condition(tmp_path, toy_data, capsys):
    run = _seed_system_run(tmp_path, toy_data, "c2a")
    loaded = export.load_run_model(Path(run))
    first = export.logits(loaded, TEXTS[:2])
    assert torch.allclose(first, export.logits(loaded, TEXTS[:2]))  # uniform label input each time
    assert main(["predict", run, "--text", TEXTS[0]]) == 0
    assert capsys.readouterr().out.strip()


def test_a_local_only_run_has_no_model_to_export_or_predict_with(tmp_path, toy_data, capsys):
    run = _seed_system_run(tmp_path, toy_data, "local", personalized_eval=True)
    assert main(["predict", run, "--text", TEXTS[0]]) == 2
    assert "method local" in capsys.readouterr().err
    assert main(["export", run, "--out", str(tmp_path / "x")]) == 2
