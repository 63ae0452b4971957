"""Loading datasets: shared layout, single files, label mapping, errors that name file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data import DataError, TextDataset, load_source, sources, subsample


def test_folder_layout_loads_all_splits(tiny_folder: Path) -> None:
    splits = load_source(str(tiny_folder))
    assert splits.name == "tiny"
    assert (len(splits.train), len(splits.test), len(splits.validation)) == (20, 7, 3)
    assert splits.train.label_names == ["a", "b", "c"]
    assert splits.train.labels.dtype == np.int64
    assert splits.train.labels.tolist()[:4] == [0, 1, 2, 0]
    assert splits.train.text_pairs[0] == "pair 0"
    assert splits.train.langs is None


def test_relative_path_and_bare_shared_name(tiny_folder: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny_folder.parent)
    assert len(load_source("./tiny").train) == 20
    monkeypatch.setenv("FEDPEFT_DATA", str(tiny_folder.parent))
    assert len(load_source("tiny").train) == 20


def test_fingerprint_is_stable_and_tracks_changes(tiny_folder: Path, write_jsonl) -> None:
    first = load_source(str(tiny_folder)).fingerprint
    assert load_source(str(tiny_folder)).fingerprint == first
    write_jsonl(tiny_folder / "train.jsonl", [{"text": "x", "label": 0}] * 5)
    assert load_source(str(tiny_folder)).fingerprint != first


def test_labels_inferred_without_labels_json(tmp_path: Path, write_jsonl) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "t", "label": v} for v in (2, 10, 2)])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"text": "t", "label": 10}])
    splits = load_source(str(tmp_path / "d"))
    assert splits.train.label_names == ["2", "10"]  # ints sort numerically
    assert splits.train.labels.tolist() == [0, 1, 0]
    assert splits.test.labels.tolist() == [1]


def test_jsonl_file_with_string_labels_gets_seeded_holdout(tmp_path: Path, write_jsonl) -> None:
    rows = [{"text": f"t{i}", "label": ["spam", "ham"][i % 2], "lang": "en"} for i in range(50)]
    path = write_jsonl(tmp_path / "mail.jsonl", rows)
    splits = load_source(str(path))
    assert splits.train.label_names == ["ham", "spam"]
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert splits.validation is None
    assert set(splits.train.texts).isdisjoint(splits.test.texts)
    assert load_source(str(path)).test.texts == splits.test.texts  # same holdout every time
    assert splits.train.field("lang") == ["en"] * 40


def test_csv_file_with_pairs_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    lines = ["text,text_pair,label"] + [f'"a, {i}",b {i},{i % 2}' for i in range(10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits = load_source(str(path))
    assert splits.train.label_names == ["0", "1"]
    assert len(splits.train) + len(splits.test) == 10
    everything = splits.train.texts + splits.test.texts
    assert "a, 3" in everything
    assert splits.train.text_pairs is not None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok", "label": 0', "malformed JSON"),
        ('{"label": 0}', "no 'text'"),
        ('{"text": "no label"}', "no 'label'"),
        ('{"text": "too big", "label": 7}', "out of range"),
    ],
)
def test_bad_row_names_file_and_line(tiny_folder: Path, line: str, message: str) -> None:
    train = tiny_folder / "train.jsonl"
    train.write_text('{"text": "fine", "label": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_source(str(tiny_folder))
    text = str(info.value)
    assert f"{train}:2" in text and message in text
    assert "\n" not in text


def test_missing_pair_on_some_rows_is_an_error(tmp_path: Path, write_jsonl) -> None:
    rows = [{"text": "a", "text_pair": "b", "label": 0}, {"text": "c", "label": 1}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl:2: .*text_pair"):
        load_source(str(tmp_path / "d"))


def test_missing_train_file_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train.jsonl"):
        load_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not found"):
        load_source(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="not found"):
        load_source(str(tmp_path / "absent.csv"))


def test_hub_failure_is_one_line_pointing_at_local_data(monkeypatch, tmp_path: Path) -> None:
    """Offline, the hub cannot be reached: the error must say so and how to use local data."""
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nope' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("FEDPEFT_DATA", str(tmp_path))
    for spec in ("hub:nope", "nope"):
        with pytest.raises(DataError) as info:
            load_source(spec)
        message = str(info.value)
        assert "hub" in message and "local folder" in message and "\n" not in message


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1")
def test_real_hub_call_fails_cleanly_offline() -> None:
    with pytest.raises(DataError, match="unreachable"):
        load_source("hub:surely_not_a_cached_dataset_xyz")


def test_hub_dataset_columns_are_mapped() -> None:
    """A GLUE-like hub dataset: pair columns, ClassLabel names, hidden test labels (-1)."""
    import datasets

    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["yes", "no"]),
        }
    )

    def split(labels: list[int]) -> datasets.Dataset:
        n = len(labels)
        data = {"sentence1": ["p"] * n, "sentence2": ["h"] * n, "label": labels}
        return datasets.Dataset.from_dict(data, features=features)

    dsd = datasets.DatasetDict(
        {"train": split([0, 1, 1]), "validation": split([1, 0]), "test": split([-1, -1])}
    )
    splits = sources._splits_from_hub("glue:rte", dsd)
    assert splits.train.label_names == ["yes", "no"]
    assert splits.train.text_pairs == ["h"] * 3
    assert splits.test.labels.tolist() == [1, 0]  # validation stands in for the hidden test
    assert splits.validation is None


def test_subset_field_and_subsample() -> None:
    ds = TextDataset(
        texts=[f"t{i}" for i in range(10)],
        labels=np.arange(10, dtype=np.int64) % 2,
        label_names=["x", "y"],
        langs=["en", "de"] * 5,
    )
    part = ds.subset([3, 1])
    assert (
        part.texts == ["t3", "t1"] and part.labels.tolist() == [1, 1] and part.langs == ["de"] * 2
    )
    with pytest.raises(DataError, match="text_pair"):
        ds.field("text_pair")
    assert subsample(ds, None, 0) is ds and subsample(ds, 50, 0) is ds
    small = subsample(ds, 4, seed=1)
    assert len(small) == 4 and small.texts == subsample(ds, 4, seed=1).texts
    assert len({tuple(subsample(ds, 4, seed=s).texts) for s in range(5)}) > 1


def test_shared_datasets_smoke(shared_dataset) -> None:
    for name, pairs, n_labels in (("ag_news", False, 4), ("rte", True, 2)):
        folder = shared_dataset(name)
        splits = load_source(str(folder))
        names = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        assert splits.train.label_names == names and len(names) == n_labels
        assert len(splits.train) > 1000 and len(splits.test) > 100
        assert (splits.train.text_pairs is not None) == pairs
        assert set(np.unique(splits.train.labels)) == set(range(n_labels))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_byte_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        lines = [b'{"text": "fine", "label": 0}', b'{"text": "caf\xe9", "label": 1}']
    else:
        lines = [b"text,label", b"fine,0", b"caf\xe9,1"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        load_source(str(path))
    message = str(info.value)
    assert f"{path}:{len(lines)}:" in message and "0xe9" in message and "UTF-8" in message
    assert "\n" not in message


def test_non_utf8_labels_json_is_named(tiny_folder: Path) -> None:
    (tiny_folder / "labels.json").write_bytes(b'["a",\n "\xff", "c"]')
    with pytest.raises(DataError, match=r"labels\.json:2: byte 0xff"):
        load_source(str(tiny_folder))


def test_csv_without_label_column_names_it_and_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text,category\nhello,a\nworld,b\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_source(str(path))
    message = str(info.value)
    assert "no 'label' column" in message and "columns: text, category" in message
    assert str(path) in message and "\n" not in message


def test_label_names_read_labels_json_without_loading_rows(tiny_folder: Path) -> None:
    (tiny_folder / "train.jsonl").write_text("not json at all\n", encoding="utf-8")
    assert sources.label_names(str(tiny_folder)) == ["a", "b", "c"]
