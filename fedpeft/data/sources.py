"""Load labelled text datasets from the shared folder layout, single files or the Hugging Face hub.

Every source becomes the same plain object, `DataSplits`, so the rest of fedpeft never cares where the
data came from. Problems with the data are reported as one-line `DataError`s naming file and line.

Accepted specs (see `load_source`):
- a folder with ``train.jsonl`` (+ ``test.jsonl``, ``validation.jsonl``, ``labels.json``);
- a bare name such as ``ag_news``, looked up under `fedpeft.paths.shared_data_dir()`;
- a single ``.jsonl`` or ``.csv`` file with columns text, label (+ text_pair, lang);
- ``hub:<name>[:<config>]`` (or any other spec) loaded with `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft.paths import shared_data_dir

HOLDOUT_FRACTION = 0.2
"""Share of rows held out as the test split when a source only has training rows."""
HOLDOUT_SEED = 0
"""Fixed seed of that holdout, so every run (and every cache) sees the same test rows."""

_OPTIONAL_FIELDS = ("text_pair", "lang")
_HUB_TEXT_COLUMNS = ("text", "sentence", "sentence1", "premise", "question")
_HUB_PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
_HUB_LABEL_COLUMNS = ("label", "labels")


class DataError(ValueError):
    """One-line, user-facing problem with a dataset (missing file, malformed row...)."""


@dataclass
class TextDataset:
    """Texts with integer labels; the unit every partitioner and tokenizer works on."""

    texts: list[str]
    labels: np.ndarray  # int64
    label_names: list[str]
    text_pairs: list[str] | None = None
    langs: list[str] | None = None  # the 'lang' field when present (for natural partitioning)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """The rows at `indices`, in that order (label names are kept whole)."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
        idx = idx.astype(np.int64, copy=False)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx].copy(),
            label_names=list(self.label_names),
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            langs=None if self.langs is None else [self.langs[i] for i in idx],
        )

    def field(self, name: str) -> list:
        """A per-row column by name ('lang', 'text', 'text_pair', 'label'), e.g. to group clients."""
        columns = {
            "text": self.texts,
            "text_pair": self.text_pairs,
            "lang": self.langs,
            "label": self.labels.tolist(),
        }
        if name not in columns:
            raise DataError(f"unknown field '{name}'; known fields: {', '.join(columns)}")
        if columns[name] is None:
            raise DataError(f"this dataset has no '{name}' field")
        return list(columns[name])


@dataclass
class DataSplits:
    """The train/test (and optional validation) splits of one source."""

    name: str
    train: TextDataset
    test: TextDataset
    validation: TextDataset | None
    fingerprint: str  # stable hash of the source (paths + sizes + mtimes, or content) for caches


@dataclass
class _RawSplit:
    """Rows as read from a file, before labels are mapped to indices."""

    path: str
    line_numbers: list[int]
    texts: list[str]
    raw_labels: list
    text_pairs: list[str] | None
    langs: list[str] | None


def load_source(spec: str) -> DataSplits:
    """Load a dataset from a folder, a bare shared name, a .jsonl/.csv file or the hub."""
    spec = str(spec)
    if spec.startswith("hub:"):
        return _load_hub(spec.removeprefix("hub:"), local_hint=None)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_file(path)
    if _looks_like_path(spec):
        raise DataError(f"dataset not found: {path} (no such file or folder)")
    shared = shared_data_dir() / spec
    if shared.is_dir():
        return _load_folder(shared)
    return _load_hub(spec, local_hint=shared)


def label_names(spec: str) -> list[str]:
    """The label names of a source: its ``labels.json`` when it has one, else from its rows."""
    path = Path(str(spec)).expanduser()
    if not path.exists() and not _looks_like_path(str(spec)) and not str(spec).startswith("hub:"):
        path = shared_data_dir() / str(spec)
    names = _read_label_names(path / "labels.json") if path.is_dir() else None
    return names if names is not None else list(load_source(spec).train.label_names)


def subsample(ds: TextDataset, n: int | None, seed: int) -> TextDataset:
    """A seeded random subset of `n` rows (kept in original order); None or n >= len: unchanged."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"subsample size must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    return ds.subset(np.sort(rng.choice(len(ds), size=n, replace=False)))


def _looks_like_path(spec: str) -> bool:
    """True when the user clearly meant a file or folder, so a hub lookup would only confuse."""
    return (
        os.sep in spec or spec.startswith((".", "~")) or spec.endswith((".jsonl", ".csv", ".json"))
    )


# ---------------------------------------------------------------- folders and files


def _load_folder(folder: Path) -> DataSplits:
    """The shared layout: train.jsonl, test.jsonl, optional validation.jsonl and labels.json.

    Without test.jsonl the test split is a seeded holdout of train (as for single files).
    """
    train_path = folder / "train.jsonl"
    if not train_path.is_file():
        raise DataError(f"{train_path}: missing (a dataset folder needs train.jsonl)")
    raw = {"train": _read_jsonl(train_path)}
    for split in ("test", "validation"):
        path = folder / f"{split}.jsonl"
        if path.is_file():
            raw[split] = _read_jsonl(path)
    label_names = _read_label_names(folder / "labels.json")
    used = [folder / f"{s}.jsonl" for s in raw] + [folder / "labels.json"]
    return _build_splits(folder.name, raw, label_names, _file_fingerprint(used))


def _load_file(path: Path) -> DataSplits:
    """One .jsonl or .csv file of labelled rows; test = seeded 20% holdout (HOLDOUT_SEED)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        raw = _read_jsonl(path)
    elif suffix == ".csv":
        raw = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl or .csv)")
    return _build_splits(path.stem, {"train": raw}, None, _file_fingerprint([path]))


def _read_label_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        names = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise DataError(f"{path}: expected a non-empty JSON list of label names")
    return names


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is reported with its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - line_start + 1
        byte = data[err.start]
        raise DataError(
            f"{path}:{line}: byte 0x{byte:02x} at column {column} is not UTF-8 "
            "(save the file as UTF-8)"
        ) from None


def _read_jsonl(path: Path) -> _RawSplit:
    rows: list[tuple[int, dict]] = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line")
        rows.append((number, row))
    return _collect_rows(path, rows)


_REQUIRED_COLUMNS = ("text", "label")


def _read_csv(path: Path) -> _RawSplit:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    columns = [name for name in reader.fieldnames or [] if name is not None]
    if not columns:
        raise DataError(f"{path}: no rows (a CSV file needs a header line with text,label)")
    missing = [name for name in _REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise DataError(
            f"{path}: no '{missing[0]}' column in the header "
            f"(columns: {_printable(', '.join(columns))})"
        )
    # Line numbers count the header as line 1; values stay strings until labels are mapped.
    rows = [(reader.line_num, dict(row)) for row in reader]
    raw = _collect_rows(path, rows)
    if all(_is_int_string(label) for label in raw.raw_labels):
        raw.raw_labels = [int(label) for label in raw.raw_labels]
    return raw


def _printable(text: str) -> str:
    """User text for a one-line message: control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _is_int_string(value: object) -> bool:
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _collect_rows(path: Path, rows: Sequence[tuple[int, dict]]) -> _RawSplit:
    """Check each row has text and label; optional fields must be on every row or none."""
    if not rows:
        raise DataError(f"{path}: no rows")
    split = _RawSplit(str(path), [], [], [], None, None)
    optional: dict[str, list] = {name: [] for name in _OPTIONAL_FIELDS}
    for number, row in rows:
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: row has no 'text' string")
        if label is None or label == "" or isinstance(label, (bool, float, list, dict)):
            raise DataError(f"{path}:{number}: row has no 'label' (int or string)")
        split.line_numbers.append(number)
        split.texts.append(text)
        split.raw_labels.append(label)
        for name in _OPTIONAL_FIELDS:
            optional[name].append(row.get(name))
    split.text_pairs = _optional_column(
        path, split.line_numbers, "text_pair", optional["text_pair"]
    )
    split.langs = _optional_column(path, split.line_numbers, "lang", optional["lang"])
    return split


def _optional_column(path: Path, lines: list[int], name: str, values: list) -> list[str] | None:
    present = [v is not None and v != "" for v in values]
    if not any(present):
        return None
    if not all(present):
        line = lines[present.index(False)]
        raise DataError(f"{path}:{line}: row has no '{name}' although other rows do")
    return [str(v) for v in values]


# ---------------------------------------------------------------- labels and splits


def _build_splits(
    name: str, raw: dict[str, _RawSplit], label_names: list[str] | None, fingerprint: str
) -> DataSplits:
    """Map labels to indices (labels.json, else sorted unique values) and make the test holdout."""
    inferred: dict | None = None
    if label_names is None:
        label_names, inferred = _infer_label_names(list(raw.values()))
    datasets_ = {split: _to_dataset(r, label_names, inferred) for split, r in raw.items()}
    train, test = datasets_["train"], datasets_.get("test")
    if test is None:
        train, test = _holdout(train, raw["train"].path)
        fingerprint = _hash([fingerprint, f"holdout={HOLDOUT_FRACTION}/{HOLDOUT_SEED}"])
    return DataSplits(name, train, test, datasets_.get("validation"), fingerprint)


def _infer_label_names(splits: list[_RawSplit]) -> tuple[list[str], dict]:
    """Sorted unique labels across all splits become the names (ints sort numerically).

    Returns the names and a map from each raw label value to its index.
    """
    values = {label for split in splits for label in split.raw_labels}
    if all(isinstance(v, int) for v in values):
        ordered = [str(v) for v in sorted(values)]
    else:
        ordered = sorted({str(v) for v in values})
    position = {n: i for i, n in enumerate(ordered)}
    return ordered, {v: position[str(v)] for v in values}


def _to_dataset(raw: _RawSplit, label_names: list[str], inferred: dict | None) -> TextDataset:
    labels = np.empty(len(raw.raw_labels), dtype=np.int64)
    for i, label in enumerate(raw.raw_labels):
        if inferred is not None:
            labels[i] = inferred[label]
        else:
            labels[i] = _named_label_index(label, label_names, raw.path, raw.line_numbers[i])
    return TextDataset(raw.texts, labels, list(label_names), raw.text_pairs, raw.langs)


def _named_label_index(label: int | str, label_names: list[str], path: str, line: int) -> int:
    """With labels.json, ints index the list and strings must be one of its names."""
    if isinstance(label, int):
        if 0 <= label < len(label_names):
            return label
        raise DataError(f"{path}:{line}: label {label} out of range 0..{len(label_names) - 1}")
    if label in label_names:
        return label_names.index(label)
    raise DataError(
        f"{path}:{line}: unknown label '{_printable(label)}' "
        f"(known: {_printable(', '.join(label_names))})"
    )


def _holdout(train: TextDataset, path: str) -> tuple[TextDataset, TextDataset]:
    if len(train) < 2:
        raise DataError(f"{path}: need at least 2 rows to hold out a test split")
    rng = np.random.default_rng(HOLDOUT_SEED)
    order = rng.permutation(len(train))
    n_test = max(1, int(round(HOLDOUT_FRACTION * len(train))))
    return train.subset(np.sort(order[n_test:])), train.subset(np.sort(order[:n_test]))


def _file_fingerprint(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return _hash(parts)


def _hash(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- hub


def _load_hub(spec: str, local_hint: Path | None) -> DataSplits:
    """`datasets.load_dataset(name[, config])`; offline this fails with a pointer to local data."""
    import datasets  # heavy import, only when the hub is really used

    name, _, config = spec.partition(":")
    try:
        dsd = datasets.load_dataset(name, config or None)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one user-facing line
        where = f"; it is not under {local_hint.parent} either" if local_hint else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"could not load '{spec}' from the Hugging Face hub ({reason}){where}; the hub may be "
            "unreachable offline: pass a local folder with train.jsonl/test.jsonl "
            "(or set FEDPEFT_DATA) or a .jsonl/.csv file instead"
        ) from None
    return _splits_from_hub(spec, dsd)


def _splits_from_hub(spec: str, dsd) -> DataSplits:
    """Pick text/pair/label columns by common names; unlabelled test splits fall back sensibly."""
    if "train" not in dsd:
        raise DataError(f"hub dataset '{spec}' has no train split")
    features = dsd["train"].features
    text_col = _first_present(_HUB_TEXT_COLUMNS, features, spec, "text")
    label_col = _first_present(_HUB_LABEL_COLUMNS, features, spec, "label")
    pair_col = next((c for c in _HUB_PAIR_COLUMNS if c in features and c != text_col), None)
    names = getattr(features[label_col], "names", None)

    def convert(split) -> _RawSplit:
        labels = list(split[label_col])
        return _RawSplit(
            path=f"hub:{spec}/{split.split}",
            line_numbers=list(range(1, len(labels) + 1)),
            texts=[str(t) for t in split[text_col]],
            raw_labels=labels,
            text_pairs=[str(t) for t in split[pair_col]] if pair_col else None,
            langs=[str(v) for v in split["lang"]] if "lang" in split.features else None,
        )

    labelled = {s: dsd[s] for s in ("train", "test", "validation") if s in dsd}
    labelled = {s: d for s, d in labelled.items() if len(d) and min(d[label_col]) >= 0}
    if "test" not in labelled and "validation" in labelled:
        labelled["test"] = labelled.pop("validation")  # e.g. GLUE: test labels are hidden (-1)
    raw = {s: convert(d) for s, d in labelled.items()}
    fingerprint = _hash([spec] + [str(getattr(d, "_fingerprint", "")) for d in labelled.values()])
    return _build_splits(spec, raw, list(names) if names else None, fingerprint)


def _first_present(candidates: Sequence[str], features, spec: str, what: str) -> str:
    for column in candidates:
        if column in features:
            return column
    raise DataError(
        f"hub dataset '{spec}' has no {what} column (looked for {', '.join(candidates)})"
    )
