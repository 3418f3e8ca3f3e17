"""Loaders: each returns (train records, test records). Every row is validated with its file and row named."""

from __future__ import annotations

import json
from pathlib import Path

from taskfed.data.records import Record, record_from_dict
from taskfed.errors import TaskfedError


def read_text(path: Path, what: str = "data file") -> str:
    """A text file's content; missing, a folder, unreadable or not UTF-8: one sentence naming the file."""
    if path.is_dir():
        raise TaskfedError(f"{path}: {what} is a directory, not a file.")
    if not path.exists():
        raise TaskfedError(f"{path}: {what} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskfedError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TaskfedError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                           f"{exc.start}).") from None


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskfedError(f"{where}: malformed JSON at line {exc.lineno} ({exc.msg}).") from None
    except RecursionError:  # a JSON value nested thousands deep; a record nests one level
        raise TaskfedError(f"{where}: malformed JSON (nested too deep).") from None


def _read_json_rows(path: Path) -> list[Record]:
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                raw = _loads(line, f"{path}, line {lineno}")
                rows.append(record_from_dict(raw, f"{path}, line {lineno}"))
        return rows
    raw = _loads(text, str(path))
    if not isinstance(raw, list):
        raise TaskfedError(f"{path}: expected a JSON list of records, got {type(raw).__name__}.")
    return [record_from_dict(row, f"{path}, row {i}") for i, row in enumerate(raw)]


def _nonempty(rows: list[Record], path: Path, what: str) -> list[Record]:
    if not rows:
        raise TaskfedError(f"{path}: the {what} file holds no records.")
    return rows


def _matched(train: list[Record], test: list[Record], path: Path) -> tuple[list[Record], list[Record]]:
    """A test file none of whose rows is of a training task would evaluate nothing at all."""
    known = {r.task for r in train}
    if not any(r.task in known for r in test):
        raise TaskfedError(f"{path}: no test record is of a task the training data has "
                           f"({', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''}).")
    return train, test


def load_json(train_path: str | Path, test_path: str | Path) -> tuple[list[Record], list[Record]]:
    """Generic JSON (a list of records) or JSONL (a record per line) files."""
    train, test = Path(train_path), Path(test_path)
    return _matched(_nonempty(_read_json_rows(train), train, "training"), _nonempty(_read_json_rows(test), test, "test"), test)


def load_feddpa(directory: str | Path, n_files: int = 8) -> tuple[list[Record], list[Record]]:
    """The FedDPA layout: `<dir>/<n>/local_training_{i}.json` and one test `*.jsonl` beside `<n>/`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskfedError(f"{directory}: FedDPA data directory does not exist.")
    train: list[Record] = []
    for i in range(n_files):
        train += _read_json_rows(directory / str(n_files) / f"local_training_{i}.json")
    tests = sorted(directory.glob("*.jsonl"))
    if len(tests) != 1:
        raise TaskfedError(f"{directory}: expected exactly one test .jsonl file, found {len(tests)}.")
    return _matched(train, _nonempty(_read_json_rows(tests[0]), tests[0], "test"), tests[0])


def load_hf(name: str, train_split: str = "train", test_split: str = "test",
            columns: dict[str, str] | None = None) -> tuple[list[Record], list[Record]]:
    """A Hugging Face dataset by name (needs the hub); `columns` maps our field names to the dataset's."""
    try:
        import datasets
    except ImportError as exc:
        raise TaskfedError("data.source = 'hf' needs the `datasets` package: pip install 'taskfed[hub]'.") from exc
    columns = {"instruction": "instruction", "output": "output", "task": "task", "category": "category", **(columns or {})}
    out = []
    for split in (train_split, test_split):
        ds = datasets.load_dataset(name, split=split)
        rows = []
        for i, row in enumerate(ds):
            raw = {field: row.get(col, "" if field == "category" else None) for field, col in columns.items()}
            rows.append(record_from_dict(raw, f"{name}[{split}], row {i}"))
        out.append(rows)
    return out[0], out[1]
