"""The one record type every loader produces, and its validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from taskfed.errors import TaskfedError

FIELDS = ("instruction", "output", "task", "category")


@dataclass(frozen=True, order=True)
class Record:
    instruction: str
    output: str
    task: str
    category: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def record_from_dict(row: Any, where: str) -> Record:
    """Validate one raw row; `where` names the file and row for the error sentence."""
    if not isinstance(row, dict):
        raise TaskfedError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {type(row).__name__}.")
    for field in ("instruction", "output", "task"):
        if field not in row:
            raise TaskfedError(f"{where}: missing field '{field}'.")
        if not isinstance(row[field], str):
            raise TaskfedError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}.")
        _text(row[field], where, field)
    if not row["task"].strip():
        raise TaskfedError(f"{where}: field 'task' is empty.")
    category = row.get("category", "")
    if category is None:
        category = ""
    if not isinstance(category, str):
        raise TaskfedError(f"{where}: field 'category' must be a string, got {type(category).__name__}.")
    _text(category, where, "category")
    return Record(row["instruction"], row["output"], row["task"], category)


def _text(value: str, where: str, field: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates: not text a tokenizer (or a UTF-8 file) can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaskfedError(f"{where}: field '{field}' holds an unpaired surrogate (\\u{ord(value[exc.start]):04x} at "
                           f"character {exc.start}), which is not valid Unicode text.") from None


def tasks_of(records: Iterable[Record]) -> list[str]:
    """Task names in order of first appearance (stable, so seeded scenarios are reproducible)."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r.task, None)
    return list(seen)
