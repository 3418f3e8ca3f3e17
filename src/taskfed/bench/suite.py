"""A benchmark suite: methods x scenarios x seeds, one `taskfed run` folder per cell.

A suite file (TOML):

    version = 1
    name = "quick"
    seeds = [0, 1, 2]
    baselines = ["local", "fedavg", "fedprox", ...]   # the default: BASELINES below
    reference = true        # the default: every scenario also runs method "base" (the untrained base model)

    [base]                  # a run config without [method]: what every cell shares
    [base.model]
    name = "smollm2"
    ...

    [[scenario]]            # one entry per scenario; `config` is merged over `base`
    label = "feddpa-single"
    methods = [{ name = "local" }, { name = "feddpa-f", label = "feddpa-f-fixed", weighting = "fixed" }]
    [scenario.config.scenario]
    name = "single"

    [scenario.epsilon_sweep]  # optional: every method (but one with `sweep = false`, and the reference) also at these epsilons (privacy.<mechanism>)
    mechanism = "centroids"   # or "updates"
    epsilons = [1, 4, 8]      # each a cell labelled <method label>-eps<epsilon>; the plain cell is "off"
    clip = 8.0
    delta = 1e-5

A cell's folder is DIR/<scenario label>/<method label>/seed-<seed>. A folder holding `metrics.json` is
finished (run folders are renamed into place only when complete), so a second `taskfed bench` resumes.
Cells that share a runtime key (model, LoRA shape, template, length; the seed too for the randomly
initialised tiny model) share one loaded base model, its caches (encodings, embeddings) and one
generation cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from taskfed.config import ModelConfig, RunConfig, read_toml, smoke as smoke_config, validate_config
from taskfed.errors import TaskfedError

SUITE_VERSION = 1
# What the report's "best baseline" ranges over: the seeds' own baselines, then the ones peers ship
# (methods.md, "More methods"), then the closest rivals (issue 29: FedALT, FedLEASE).
BASELINES = ["local", "fedavg", "fedprox", "clustered", "ifca", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
             "scaffold", "fedsa-lora", "ffa-lora", "fedalt", "fedlease"]
REFERENCE = "base"  # the untrained base model's method name: the reference row of every scenario
# A label is one folder name under --out: letters, digits, '_', '.', '-', not starting with '.' or '-'
# (so never '', '.', '..', a hidden name or a path).
LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
BENCH_FILES = {"suite.json", "suite.toml", "runs.json", "report.md", "figures"}  # what a bench writes itself


def check_label(value: Any, what: str) -> str:
    if not isinstance(value, str) or not LABEL.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a folder name (letters, digits, '_', '.', '-'; not starting "
                         f"with '.' or '-')")
    return value


class EpsilonSweep(BaseModel):
    """Each method of a scenario again at each epsilon of one privacy mechanism (taskfed/privacy.py)."""

    model_config = ConfigDict(extra="forbid")
    mechanism: Literal["centroids", "updates"]
    epsilons: list[float] = Field(min_length=1)
    clip: float = Field(gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)

    def variants(self, label: str) -> list[tuple[str, dict[str, Any]]]:
        """(method label, config overrides): the plain (non-private) cell first."""
        out: list[tuple[str, dict[str, Any]]] = [(label, {})]
        for eps in self.epsilons:
            table = {"clip": self.clip, "delta": self.delta, "epsilon": eps}
            out.append((f"{label}-eps{eps:g}", {"privacy": {self.mechanism: table}}))
        return out


SWEPT = re.compile(r"(.+)-eps([0-9.e+-]+)")  # a swept cell's method label: <base label>-eps<epsilon>


class ScenarioSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    config: dict[str, Any] = Field(default_factory=dict, description="merged over [base]")
    methods: list[dict[str, Any]] = Field(min_length=1)
    epsilon_sweep: EpsilonSweep | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if v in BENCH_FILES:  # its folder would be one of the bench's own files
            raise ValueError(f"label {v!r} is a name the bench writes itself ({', '.join(sorted(BENCH_FILES))})")
        return check_label(v, "label")


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = SUITE_VERSION
    name: str
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)  # ints as written: no "1", true, 1.0
    baselines: list[str] = Field(default_factory=lambda: list(BASELINES))
    reference: bool = True  # a "base" cell (the untrained base model, methods/untrained.py) in every scenario
    base: dict[str, Any] = Field(default_factory=dict)
    scenario: list[ScenarioSpec] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} is listed twice (each seed is one cell per method)")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SUITE_VERSION:
            raise ValueError(f"unsupported suite version {v} (this taskfed reads {SUITE_VERSION})")
        return v


@dataclass
class Cell:
    scenario: str  # the scenario's label
    method: str  # the method's label (its name unless the suite gives one)
    seed: int
    cfg: RunConfig

    @property
    def path(self) -> Path:
        return Path(self.scenario) / self.method / f"seed-{self.seed}"


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_suite(path: Path) -> Suite:
    raw = read_toml(path, "suite")
    try:
        return Suite.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "suite"
        if first["type"] == "extra_forbidden":
            raise TaskfedError(f"{path}: unknown key '{key}'.") from None
        raise TaskfedError(f"{path}: bad value for '{key}': {first['msg']}.") from None


def cells(suite: Suite, source: str, smoke: bool = False, device: str | None = None) -> list[Cell]:
    """Every cell's validated run config, in a fixed order (scenario, method, seed)."""
    out, seen = [], set()
    if device is not None:  # the option's format, before any cell (the machine's devices: run_bench)
        try:
            ModelConfig._device(device)
        except ValueError as exc:
            raise TaskfedError(f"--device {device}: {exc}.") from None
    if "method" in suite.base or "seed" in suite.base:
        raise TaskfedError(f"{source}: [base] may not set 'method' or 'seed' (the suite's grid does).")
    for spec in suite.scenario:
        methods = list(spec.methods)
        if suite.reference and not any(m.get("name") == REFERENCE for m in methods):
            methods.append({"name": REFERENCE, "label": REFERENCE, "sweep": False})
        for table in methods:
            table = dict(table)
            label = table.pop("label", table.get("name", ""))
            sweep = table.pop("sweep", True) and spec.epsilon_sweep  # the reference shares nothing to protect
            try:
                check_label(label, "method label")
            except ValueError as exc:
                raise TaskfedError(f"{source}, scenario '{spec.label}': {exc}.") from None
            variants = sweep.variants(label) if sweep else [(label, {})]
            for label, extra in variants:
                if (spec.label, label) in seen:
                    raise TaskfedError(f"{source}: scenario '{spec.label}' lists method '{label}' twice "
                                       f"(give one of them a distinct 'label').")
                seen.add((spec.label, label))
                for seed in suite.seeds:
                    raw = deep_merge(deep_merge(deep_merge(suite.base, spec.config), extra), {"method": table, "seed": seed})
                    cfg = validate_config(raw, f"{source}, scenario '{spec.label}', method '{label}'")
                    if smoke:
                        cfg = smoke_config(cfg)
                    if device is not None:
                        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
                            "device": device, "dtype": "bfloat16" if device.startswith("cuda") else "float32"})})
                    out.append(Cell(spec.label, label, seed, cfg))
    return out


def runtime_key(cfg: RunConfig) -> str:
    """What a loaded runtime depends on; cells with equal keys share one."""
    key = {"model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(), "template": cfg.data.template,
           "max_length": cfg.data.max_length}
    if cfg.model.name == "tiny":  # randomly initialised from the run's seed
        key["seed"] = cfg.seed
    return json.dumps(key, sort_keys=True)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _finished(out: Path) -> list[Path]:
    return sorted(out.glob("*/*/seed-*/metrics.json"))


def claim_folder(out: Path, resolved: dict, grid: list[Cell]) -> None:
    """`out` as this suite's bench folder: new, empty, or a bench of the same suite and options (resumed).
    A folder holding anything else is refused untouched. A stamp (suite.json) that no finished cell backs
    (a bench that failed before its first cell finished) is replaced: nothing of it would be mixed in."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TaskfedError(f"--out {out}: exists and is not a folder.")
    stamp = out / "suite.json"
    if out.is_dir() and any(out.iterdir()):
        if not stamp.is_file():
            raise TaskfedError(f"--out {out}: the folder holds files and is not a bench (no suite.json); "
                               f"use a new or empty folder.")
        try:
            before = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            before = None
        if before == resolved:
            return  # resume
        cell_dirs = {c.path.parts[0] for c in grid}
        strangers = [p.name for p in out.iterdir() if p.name not in BENCH_FILES | cell_dirs]
        if _finished(out) or strangers or before is None:
            raise TaskfedError(f"{out}: holds a bench of a different suite or options ({stamp}); "
                               f"use another --out folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaskfedError(f"--out {out}: cannot create the bench folder ({exc.strerror or exc}).") from None
    stamp.write_text(json.dumps(resolved, indent=2, sort_keys=True))
    (out / "suite.toml").write_text(tomli_w.dumps(resolved["suite"]))


def run_bench(suite_path: Path, out: Path, smoke: bool = False, device: str | None = None,
              log: Callable[[str], None] = print, command: str | None = None) -> list[Cell]:
    """Runs every unfinished cell of the suite into `out`, then writes out/report.md."""
    suite = load_suite(suite_path)
    grid = cells(suite, str(suite_path), smoke, device)
    resolved = {"suite": suite.model_dump(exclude_none=True), "smoke": smoke, "device": device}
    if device is not None:  # a device this machine lacks: refused before the folder is stamped
        from taskfed.model.loading import check_device

        check_device(device)
    claim_folder(out, resolved, grid)  # only now that every cell validated
    # torch, matplotlib and the methods: only once the suite is valid
    from taskfed.bench.report import write_report

    runs = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else []
    runs.append({"commit": git_commit(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    (out / "runs.json").write_text(json.dumps(runs, indent=2))

    todo = [c for c in grid if not (out / c.path / "metrics.json").exists()]
    log(f"bench {suite.name}: {len(grid)} cells, {len(grid) - len(todo)} finished earlier, {len(todo)} to run")
    try:
        _run_cells(todo, out, log)
    except BaseException:  # Ctrl-C, a failed cell: finished cells are kept, and the bench says how to go on
        left = sum(not (out / c.path / "metrics.json").exists() for c in grid)
        log(f"bench stopped with {len(grid) - left} of {len(grid)} cells finished (kept in {out}); rerun "
            f"`{command or f'taskfed bench SUITE --out {out}'}` to continue with the other {left}")
        raise
    write_report(out)
    return grid


def _run_cells(todo: list[Cell], out: Path, log: Callable[[str], None]) -> None:
    """The unfinished cells, one loaded model per runtime key."""
    from taskfed.run import run_experiment
    from taskfed.runtime import Runtime

    rt, rt_key, gen_cache = None, None, {}
    for n, cell in enumerate(todo, 1):
        key = runtime_key(cell.cfg)
        if key != rt_key:  # one loaded model at a time; cells are ordered so that most keys repeat
            rt, rt_key, gen_cache = None, key, {}
            rt = Runtime(cell.cfg)
        rt.cfg = cell.cfg  # the runtime reads the cell's eval batch size and seed (initial adapter)
        log(f"[{n}/{len(todo)}] {cell.path}")
        folder = out / cell.path
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        # A cell interrupted half-way resumes from its own checkpoint (folder.partial/) instead of restarting.
        run_experiment(cell.cfg, folder, rt=rt, log=log, gen_cache=gen_cache, resume=True)
