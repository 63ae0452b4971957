"""Property tests over bad inputs: data rows, configs and payload blobs.

Whatever a user or a client hands fedpeft, the answer is one line naming what is wrong (data: the
file and, for a row, its line), exit status 2 through the CLI with no run folder left behind,
and never another exception: ``build_config`` raises only ``ConfigError``, ``payload.decode``
only ``PayloadError``.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft import cli, payload
from fedpeft.config import ConfigError, build_config
from fedpeft.data.sources import DataError, load_source

LABELS = ["sports", "business", "tech", "world"]
BAD_KINDS = ("json", "no_text", "no_label", "label_out", "bytes")
PROPERTY = settings(
    max_examples=int(os.environ.get("FEDPEFT_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

texts = st.text(min_size=1, max_size=30)
good_rows = st.lists(
    st.fixed_dictionaries(
        {"text": texts, "label": st.one_of(st.integers(0, 3), st.sampled_from(LABELS))}
    ),
    min_size=2,
    max_size=8,
)


def _bad_line(kind: str, draw_text: str, bad_label) -> bytes:
    if kind == "json":
        return ('{"text": ' + json.dumps(draw_text) + ', "label": ').encode()
    if kind == "no_text":
        return json.dumps({"label": 0, "txt": draw_text}).encode()
    if kind == "no_label":
        return json.dumps({"text": draw_text}).encode()
    if kind == "label_out":
        return json.dumps({"text": draw_text, "label": bad_label}).encode()
    return b'{"text": "caf\xe9 ' + b"\xff\xfe" + b'", "label": 0}'  # Latin-1, not UTF-8


bad_labels = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=4),
    st.text(min_size=1, max_size=20).filter(lambda s: s not in LABELS),
)


def _write(folder: Path, rows: list[dict], kind: str, position: int, text: str, label) -> int:
    """The folder layout with one bad train row at ``position``; returns that row's line."""
    lines = [json.dumps(row).encode() for row in rows]
    position = min(position, len(lines))
    lines.insert(position, _bad_line(kind, text, label))
    (folder / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return position + 1


def _one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message and message.strip() == message


@PROPERTY
@given(
    rows=good_rows,
    kind=st.sampled_from(BAD_KINDS),
    position=st.integers(0, 10),
    text=texts,
    label=bad_labels,
)
def test_every_bad_row_is_one_line_naming_file_and_line(rows, kind, position, text, label):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        line = _write(folder, rows, kind, position, text, label)
        with pytest.raises(DataError) as caught:
            load_source(str(folder))
        message = str(caught.value)
        assert _one_line(message), message
        assert f"{folder / 'train.jsonl'}:{line}:" in message
        message.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)


def test_an_empty_file_and_a_csv_without_labels_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rows = tmp_path / "rows.csv"
    rows.write_text("text,category\nhello,1\nworld,2\n")
    for path, said in ((empty, "no rows"), (rows, "no 'label' column")):
        with pytest.raises(DataError) as caught:
            load_source(str(path))
        assert _one_line(str(caught.value)) and str(path) in str(caught.value)
        assert said in str(caught.value)


@PROPERTY
@given(header=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
def test_a_csv_header_without_label_is_one_line(header):
    header = [h for h in header if h != "label"] or ["text"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as fh:
            writer = csv.writer(fh)
            writer.writerows([header, ["1"] * len(header)])
        with pytest.raises(DataError) as caught:
            load_source(str(path))
        assert _one_line(str(caught.value)), str(caught.value)
        assert str(path) in str(caught.value)


def _cli_config(folder: Path, dataset: Path) -> Path:
    config = {
        "model": "tiny",
        "dataset": str(dataset),
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("kind", [*BAD_KINDS, "empty", "csv_no_label"])
def test_the_cli_rejects_bad_data_in_one_line_with_status_2_and_no_run_folder(
    tmp_path, capsys, kind
):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "empty":
        dataset = data / "rows.jsonl"
        dataset.write_text("")
    elif kind == "csv_no_label":
        dataset = data / "rows.csv"
        dataset.write_text("text,category\nhello,1\nworld,2\n")
    else:
        rows = [{"text": "a b", "label": 0}, {"text": "c d", "label": "tech"}]
        _write(data, rows, kind, 1, "oops\nnew line", 9)
        dataset = data
    out = tmp_path / "run"
    code = cli.main(["run", str(_cli_config(tmp_path, dataset)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(dataset) in err[0]
    assert not out.exists()


# -- configs --------------------------------------------------------------------------------------
KNOWN = [
    "model",
    "dataset",
    "method",
    "algorithm",
    "engine",
    "num_clients",
    "clients_per_round",
    "rounds",
    "lr",
    "seed",
    "partition",
    "alpha",
    "quantize",
    "pooling",
    "lora",
    "robust",
    "attack",
    "faults",
    "dp",
    "fedopt",
    "cost",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["lora", "median", "flower", "int8", "iid", "autofednlp", "tiny", "0.5"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KNOWN), st.text(max_size=8)), inner, max_size=3),
    ),
    max_leaves=8,
)
SUB_KEYS = [
    "r",
    "alpha",
    "trim_ratio",
    "clip_norm",
    "num_byzantine",
    "type",
    "fraction",
    "scale",
    "crash_prob",
    "straggler_fraction",
    "straggler_factor",
    "deadline_s",
    "min_clients",
    "retries",
    "noise_multiplier",
    "adaptive",
    "count_noise",
    "delta",
    "max_epsilon",
    "eta",
    "devices",
]
sections = st.dictionaries(st.sampled_from(SUB_KEYS), scalars, max_size=4)
configs = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(KNOWN), st.text(max_size=10), st.integers()), values, max_size=6
    ),
    st.dictionaries(st.sampled_from(KNOWN), st.one_of(scalars, sections), max_size=8),
)


@PROPERTY
@given(data=configs)
def test_build_config_returns_or_raises_one_line_config_error(data):
    data = {"dataset": "unused", **data}
    try:
        build_config(data)
    except ConfigError as err:
        assert _one_line(str(err)), str(err)
        str(err).encode("utf-8")


# -- payload blobs --------------------------------------------------------------------------------
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I8", "U8", "BOOL", "X"]


@st.composite
def safetensors_blobs(draw):
    """Blobs shaped like safetensors (a length, a JSON header, data) with random contents."""
    header = {}
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = draw(st.integers(0, 64))
        start = draw(st.one_of(st.just(offset), st.integers(0, 80)))
        header[f"t{i}"] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": shape,
            "data_offsets": [start, start + size],
        }
        offset = start + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    raw = json.dumps(header).encode()
    data = draw(st.binary(max_size=96))
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + raw + data


@PROPERTY
@given(blob=st.one_of(st.binary(max_size=200), safetensors_blobs()))
def test_payload_decode_raises_only_payload_error(blob):
    try:
        payload.decode(blob)
    except payload.PayloadError:
        pass
