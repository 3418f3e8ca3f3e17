"""The docs stay true: the site builds with `mkdocs build --strict` (a broken link, a missing page or a bad
API reference fails it), every shell block the docs mark as runnable runs against the tiny model, the API
reference lists every module, and the README stays a five-minute read whose figures carry their commands."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```(?:bash|sh)\n(.*?)\n```", re.S)


def runnable_blocks(page: Path) -> list[str]:
    """The shell blocks of `page` marked `<!-- runnable -->` on the line before their fence, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = BLOCK.findall(text)
    assert len(blocks) == text.count(MARK), f"{page.name}: a {MARK} mark not followed by a ```bash block"
    return blocks


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if MARK in p.read_text(encoding="utf-8")]


def test_the_tour_is_marked_runnable():
    """The README's tour (run, bench + report, serve, Flower) is what the runnable test covers."""
    blocks = runnable_blocks(ROOT / "README.md")
    joined = "\n".join(blocks)
    assert len(blocks) >= 4
    for command in ("taskfed run ", "taskfed bench ", "taskfed report ", "taskfed serve ", "taskfed flower simulate "):
        assert command in joined, command
    assert all("--smoke" in b for b in blocks if "taskfed run " in b or "taskfed bench " in b or "simulate" in b)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_runnable_blocks_run(page, tmp_path):
    """Each marked block of a page, in order (a later block may use an earlier one's run folder), from the
    repository root with the venv's commands first on PATH; `runs/` is the test's own folder, so runs of
    the test never meet each other or a user's runs."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_TELEMETRY_ENABLED="0",
               PYTHONPATH=str(ROOT / "src"))
    for i, block in enumerate(runnable_blocks(page)):
        script = re.sub(r"(?<![\w/.])runs/", f"{tmp_path}/runs/", block)
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            out = "(timed out)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a server a block left behind
            except ProcessLookupError:
                pass
        assert proc.returncode == 0, f"{page.name}, runnable block {i + 1} failed:\n{block}\n--- output:\n{out[-4000:]}"
    assert (tmp_path / "runs").is_dir()


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="taskfed.model.bank.AdapterBank"' in api  # the reference is built from the docstrings


def test_the_api_reference_lists_every_module():
    listed = set(re.findall(r"^::: (taskfed[\w.]*)$", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.M))
    src = ROOT / "src"
    modules = {".".join(p.relative_to(src).with_suffix("").parts) for p in (src / "taskfed").rglob("*.py")
               if p.name != "__init__.py" and not p.name.startswith("_")}
    assert modules - listed == set(), "docs/api.md misses these modules"
    assert listed - modules == set(), "docs/api.md lists modules that do not exist"


def test_readme_is_short_and_its_figures_carry_their_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    table = text.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| figure")]
    assert len(rows) >= 8
    for row in rows:
        command = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert re.fullmatch(r"`(taskfed|python|OMP_NUM_THREADS=1 python) [^`]+`|same", command), row
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # links from the README into the site exist
        assert (ROOT / link).is_file(), link
