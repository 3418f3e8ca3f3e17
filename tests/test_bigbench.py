"""BIG-bench loader on a synthetic archive with the real layout (no network, no BIG-bench text:
the canary asks that its text never enter a repository, so every row here is made up)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from taskfed.data import bigbench
from taskfed.data.bigbench import DEFAULT_SUITE, convert_task, ensure_archive, extract_tasks, load_bigbench
from taskfed.data.records import tasks_of
from taskfed.errors import TaskfedError

COLORS = ["red", "green", "blue"]


def _choice_task(n: int) -> dict:
    # Multiple choice with options in an unsorted file order (red, green, blue): they come out sorted.
    return {
        "name": "fake_colors", "task_prefix": "Pick the color named in the sentence.",
        "examples": [{"input": f"Sentence {i} mentions {COLORS[i % 3]}.",
                      "target_scores": {c: int(c == COLORS[i % 3]) for c in COLORS}} for i in range(n)],
    }


def _target_task(n: int) -> dict:
    return {
        "name": "fake_echo", "example_input_prefix": "Echo: ", "example_output_prefix": "\nEchoed:",
        "examples": [{"input": f"word{i}", "target": [f"word{i} word{i}", "unused"] if i % 2 else f"word{i} word{i}"}
                     for i in range(n)],
    }


def _write_archive(path: Path, tasks: dict[str, dict]) -> Path:
    """A tar.gz laid out like the sdist: bigbench-1.0.0/bigbench/benchmark_tasks/<name>/task.json."""
    with tarfile.open(path, "w:gz") as tf:
        for name, spec in {"README": None, **tasks}.items():
            data = json.dumps(spec).encode() if spec is not None else b"not a task"
            inner = f"benchmark_tasks/{name}/task.json" if spec is not None else "README.md"
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/{inner}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """No test may download: pip is replaced by a failure, and no archive is configured."""
    monkeypatch.delenv(bigbench.ARCHIVE_ENV, raising=False)
    monkeypatch.setattr(bigbench.subprocess, "run", lambda cmd, **kw: pytest.fail(f"tried to run {cmd}"))
    monkeypatch.setattr(bigbench.subprocess, "Popen", lambda cmd, **kw: pytest.fail(f"tried to run {cmd}"))


def fake_pip(calls: list, data: bytes = b"tarball", code: int = 0, err: str = "", polls: int = 3):
    """A `pip download` stand-in (subprocess.Popen): writes `data` into the -d folder half by half over
    `polls` polls, with pip's temporary files in its TMPDIR like pip, then exits with `code`."""
    class Pip:
        def __init__(self, cmd, stdout=None, stderr=None, text=None, env=None):
            calls.append(cmd)
            self.dest = Path(cmd[cmd.index("-d") + 1])
            self.tmpdir = Path(env["TMPDIR"])
            self.left, self.returncode = polls, None
            stderr.write(err)

        def poll(self):
            self.left -= 1
            if self.left > 0:
                (self.tmpdir / "partial").write_bytes(data[: len(data) // 2])
                return None
            (self.tmpdir / "partial").unlink(missing_ok=True)
            if code == 0:
                (self.dest / bigbench.ARCHIVE_NAME).write_bytes(data)
            self.returncode = code
            return code
    return Pip


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "fake.tar.gz"
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(path))  # load_bigbench finds it like a user's archive
    return _write_archive(path, {
        "fake_colors": _choice_task(60),
        "fake_group/echo": _target_task(60),  # a subtask folder
        "fake_other": _target_task(5),
    })


def test_extract_writes_only_requested_and_reuses_cache(archive: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    paths = extract_tasks(archive, ["fake_colors", "fake_group/echo"], cache)
    assert paths == {"fake_colors": cache / "bigbench" / "fake_colors.json",
                     "fake_group/echo": cache / "bigbench" / "fake_group" / "echo.json"}
    written = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert written == ["bigbench/fake_colors.json", "bigbench/fake_group/echo.json"]
    assert json.loads(paths["fake_colors"].read_text())["name"] == "fake_colors"
    archive.unlink()  # cached tasks must not need the archive again
    assert extract_tasks(archive, ["fake_group/echo"], cache) == {"fake_group/echo": paths["fake_group/echo"]}
    train, test = load_bigbench(["fake_colors"], cache, n_train=30, n_test=10)
    assert len(train) == 30 and len(test) == 10


def test_unknown_and_bad_names(archive: Path, tmp_path: Path):
    with pytest.raises(TaskfedError, match="no_such_task"):
        extract_tasks(archive, ["fake_colors", "no_such_task"], tmp_path / "cache")
    with pytest.raises(TaskfedError, match="not valid"):
        extract_tasks(archive, ["../escape"], tmp_path / "cache")


def test_multiple_choice_conversion():
    records = convert_task("fake_colors", _choice_task(4))
    r = records[1]
    assert r.instruction == ("Pick the color named in the sentence.\nSentence 1 mentions green.\n"
                             "OPTIONS:\n- blue\n- green\n- red")
    assert r.output == "green" and r.task == "fake_colors" and r.category == "classification"
    # Ties go to the first option in file order; non-numeric scores are refused with the row named.
    assert convert_task("t", {"examples": [{"input": "q", "target_scores": {"b": 1, "a": 1}}]})[0].output == "b"
    with pytest.raises(TaskfedError, match="example 0"):
        convert_task("t", {"examples": [{"input": "q", "target_scores": {"a": "yes"}}]})


def test_target_conversion_skips_empty_and_duplicate_rows():
    spec = _target_task(4)
    spec["examples"] += [{"input": " ", "target": "x"}, {"input": "y", "target": []},
                         {"input": "z", "target": ["", " "]}, {"input": "word0", "target": "a second reference"}]
    records = convert_task("fake_echo", spec)
    assert [r.output for r in records] == ["word0 word0", "word1 word1", "word2 word2", "word3 word3"]
    assert records[1].instruction == "Echo: word1\nEchoed:"
    assert {r.category for r in records} == {"generation"}
    # A generated answer from a small closed set counts as classification.
    yes_no = {"examples": [{"input": f"q{i}", "target": ["Yes.", "No."][i % 2]} for i in range(20)]}
    assert {r.category for r in convert_task("yn", yes_no)} == {"classification"}
    with pytest.raises(TaskfedError, match="subtask"):
        convert_task("parent", {"name": "parent"})


def test_split_sizes_and_seed(archive: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    names = ["fake_colors", "fake_group/echo"]
    train, test = load_bigbench(names, cache, n_train=40, n_test=15, seed=0)
    assert len(train) == 80 and len(test) == 30 and tasks_of(train) == names == tasks_of(test)
    for name in names:
        tr = {r.instruction for r in train if r.task == name}
        te = {r.instruction for r in test if r.task == name}
        assert len(tr) == 40 and len(te) == 15 and not tr & te
    assert load_bigbench(names, cache, n_train=40, n_test=15, seed=0) == (train, test)
    assert load_bigbench(names, cache, n_train=40, n_test=15, seed=1) != (train, test)
    # A task's split does not depend on the other tasks requested.
    alone, _ = load_bigbench(["fake_group/echo"], cache, n_train=40, n_test=15, seed=0)
    assert alone == [r for r in train if r.task == "fake_group/echo"]


def test_too_few_rows(archive: Path, tmp_path: Path):
    extract_tasks(archive, ["fake_other"], tmp_path / "cache")
    with pytest.raises(TaskfedError, match=r"'fake_other' has 5 usable rows.*3 \+ 3"):
        load_bigbench(["fake_other"], tmp_path / "cache", n_train=3, n_test=3)


def test_ensure_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    monkeypatch.setattr(bigbench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bigbench.subprocess, "Popen", fake_pip(calls))
    path = ensure_archive(tmp_path)
    assert Path(calls[0][calls[0].index("-d") + 1]).parent == tmp_path  # downloads beside the target, then renames
    assert path == tmp_path / bigbench.ARCHIVE_NAME and path.read_bytes() == b"tarball"
    assert ensure_archive(tmp_path) == path and len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == [bigbench.ARCHIVE_NAME]  # the temporary folder is gone

    failed = "Collecting...\nERROR: No matching distribution\nmore"
    monkeypatch.setattr(bigbench.subprocess, "Popen", fake_pip(calls, code=1, err=failed))
    with pytest.raises(TaskfedError, match=r"\(ERROR: No matching distribution\).*TASKFED_BIGBENCH_ARCHIVE"):
        ensure_archive(tmp_path / "empty")

    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(path))
    assert ensure_archive(tmp_path / "elsewhere") == path
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(TaskfedError, match="missing.tar.gz"):
        ensure_archive(tmp_path)


def test_corrupt_archive(tmp_path: Path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(TaskfedError, match="cannot read"):
        extract_tasks(bad, ["fake_colors"], tmp_path / "cache")


# Read at import, before the `offline` fixture clears the variable.
_REAL = os.environ.get(bigbench.ARCHIVE_ENV) or "/tmp/bb/bigbench-1.0.0.tar.gz"


@pytest.mark.skipif(not Path(_REAL).is_file(), reason="needs the BIG-bench sdist (TASKFED_BIGBENCH_ARCHIVE)")
def test_default_suite_on_real_archive(tmp_path: Path):
    # Extract into tmp_path: the real text stays out of the repository and is deleted with it.
    paths = extract_tasks(Path(_REAL), DEFAULT_SUITE, tmp_path)
    train, test = load_bigbench(DEFAULT_SUITE, tmp_path)
    assert tasks_of(train) == DEFAULT_SUITE == tasks_of(test) and set(paths) == set(DEFAULT_SUITE)
    for name in DEFAULT_SUITE:
        assert sum(r.task == name for r in train) >= 300 and sum(r.task == name for r in test) >= 100
    kinds = {r.category for r in train}
    assert kinds == {"classification", "generation"}
