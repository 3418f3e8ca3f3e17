"""`DIR/report.md` and its figures, rebuilt from the run folders alone (`taskfed report DIR`).

Everything above the "Wall time" section depends only on the runs' results (scores, bytes, losses), so a
resumed bench and an uninterrupted one write the same text there; wall time differs from run to run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskfed.bench import figures
from taskfed.bench.stats import CLAIMS, Summary, best_baseline, mean_ci, relative_gain
from taskfed.bench.paired import TARGET, Paired, paired
from taskfed.bench.suite import BASELINES, REFERENCE, SWEPT
from taskfed.errors import TaskfedError
from taskfed.evaluation.rows import FILE as SCORES, read_scores

WALL_TIME_HEADING = "## Wall time"


@dataclass
class CellRun:
    scenario: str  # label (folder)
    method: str  # label (folder)
    seed: int
    metrics: dict
    folder: Path | None = None  # the cell's run folder (its scores.csv pairs rows with other methods')

    @property
    def method_name(self) -> str:
        return self.metrics["method"]

    @property
    def scenario_name(self) -> str:
        return self.metrics["scenario"]


# What the report reads of a metrics.json, checked (strictly: a string score is not a number) before any
# table is built, so a hand-edited file is one sentence naming it and the key, never a traceback or a NaN.
class _Lax(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


Finite = Annotated[float, Field(allow_inf_nan=False)]
Score = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]


class _Task(_Lax):
    rouge1: Score


class _Client(_Lax):
    score: Score | None = None
    per_task: dict[str, _Task] = Field(default_factory=dict)


class _Mode(_Lax):
    score: Score | None = None
    per_client: dict[str, _Client]  # the report's per-task tables and figures read it: required
    seconds: Finite = 0.0
    router_accuracy: Score | None = None
    router_confusion: dict[str, list[Finite]] | None = None
    clustering_accuracy_per_round: list[Score | None] | None = None


class _Round(_Lax):
    train_loss: float | None = None  # NaN where a round trained nothing
    seconds: Finite = 0.0
    train_tokens: Annotated[int, Field(ge=0)] = 0


class _Metrics(_Lax):
    method: str
    scenario: str
    seed: int
    bytes_communicated: Annotated[Finite, Field(ge=0)]
    rounds: list[_Round]
    eval: dict[str, _Mode]
    setup_seconds: Finite = 0.0


def _check_metrics(path: Path, metrics: object) -> None:
    if not isinstance(metrics, dict):
        raise TaskfedError(f"{path}: not a taskfed metrics file (a JSON {type(metrics).__name__}, not an object).")
    for key in ("method", "scenario", "seed", "eval", "rounds", "bytes_communicated"):
        if key not in metrics:
            raise TaskfedError(f"{path}: not a taskfed metrics file (no '{key}').")
    try:
        _Metrics.model_validate(metrics)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise TaskfedError(f"{path}: bad value for '{key}': {first['msg']}.") from None


def collect(folder: Path) -> list[CellRun]:
    """Every finished cell under `folder` (<scenario>/<method>/seed-<s>/metrics.json), sorted."""
    runs = []
    for path in sorted(folder.glob("*/*/seed-*/metrics.json")):
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TaskfedError(f"{path}: unreadable metrics ({exc}).") from None
        except RecursionError:
            raise TaskfedError(f"{path}: unreadable metrics (nested too deep).") from None
        _check_metrics(path, metrics)
        runs.append(CellRun(path.parent.parent.parent.name, path.parent.parent.name, int(metrics["seed"]), metrics,
                            path.parent))
    return runs


def _read_stamp(stamp: Path) -> dict:
    """The suite a bench folder's stamp names (only its order of scenarios and methods is used)."""
    try:
        suite = json.loads(stamp.read_text(encoding="utf-8"))["suite"]
        order = [(spec["label"], [t.get("label", t.get("name")) for t in spec["methods"]]) for spec in suite.get("scenario", [])]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise TaskfedError(f"{stamp}: not a bench stamp ({type(exc).__name__}: {exc}).") from None
    if not all(isinstance(label, str) for label, _ in order):
        raise TaskfedError(f"{stamp}: not a bench stamp (a scenario label is not a string).")
    return suite


def _fmt(s: Summary, digits: int = 4) -> str:
    if s.n == 0:
        return "n/a"
    if s.half_width is None:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ordered(seq):
    return list(dict.fromkeys(seq))


MODE_ORDER = ("local", "global", "unseen")


def suite_order(runs: list[CellRun], suite: dict) -> list[CellRun]:
    """Runs in the suite's order of scenarios and methods (folder order for anything the suite lacks)."""
    rank: dict[tuple[str, str], int] = {}
    for spec in suite.get("scenario", []):
        for table in spec["methods"]:
            rank.setdefault((spec["label"], str(table.get("label", table.get("name")))), len(rank))
    scen_rank = {s: i for i, s in enumerate(_ordered(sc for sc, _ in rank))}
    return sorted(runs, key=lambda r: (scen_rank.get(r.scenario, len(scen_rank)), r.scenario,
                                       rank.get((r.scenario, r.method), len(rank)), r.method, r.seed))


class BenchTables:
    """Per scenario: methods, modes and the seed summaries of every (method, mode)."""

    def __init__(self, runs: list[CellRun], baselines: list[str]):
        self.runs, self.baselines = runs, baselines
        self.scenarios = _ordered(r.scenario for r in runs)
        self.by_cell: dict[tuple[str, str], list[CellRun]] = defaultdict(list)
        for r in runs:
            self.by_cell[(r.scenario, r.method)].append(r)
        self.names = {(r.scenario, r.method): r.method_name for r in runs}
        self._rows: dict[tuple[Path, str], list[dict]] = {}  # scores.csv rows of one mode, read once

    def methods(self, scenario: str) -> list[str]:
        return _ordered(r.method for r in self.runs if r.scenario == scenario)

    def modes(self, scenario: str) -> list[str]:
        found = {m for r in self.runs if r.scenario == scenario for m in r.metrics["eval"]}
        return [m for m in MODE_ORDER if m in found] + sorted(found - set(MODE_ORDER))

    def score(self, scenario: str, method: str, mode: str) -> Summary:
        return mean_ci([r.metrics["eval"].get(mode, {}).get("score") for r in self.by_cell[(scenario, method)]])

    def task_score(self, scenario: str, method: str, mode: str, task: str) -> Summary:
        """Per seed, the mean over clients of the task's ROUGE-1 (clients holding the task), then over seeds."""
        vals = []
        for r in self.by_cell[(scenario, method)]:
            per = [c["per_task"][task]["rouge1"] for c in r.metrics["eval"].get(mode, {}).get("per_client", {}).values()
                   if task in c["per_task"]]
            if per:
                vals.append(float(np.mean(per)))
        return mean_ci(vals)

    def tasks(self, scenario: str, mode: str) -> list[str]:
        return sorted({t for r in self.runs if r.scenario == scenario
                       for c in r.metrics["eval"].get(mode, {}).get("per_client", {}).values() for t in c["per_task"]})

    def mean_of(self, scenario: str, method: str, fn) -> float:
        return float(np.mean([fn(r.metrics) for r in self.by_cell[(scenario, method)]]))

    def row_scores(self, scenario: str, method: str, mode: str, task: str | None = None) -> dict[tuple, float]:
        """(seed, client, task, row) -> ROUGE-1 of every row the method's cells scored in `mode` (scores.csv;
        empty for runs without one)."""
        out = {}
        for r in self.by_cell[(scenario, method)]:
            if r.folder is None or not (r.folder / SCORES).exists():
                continue
            if (r.folder, mode) not in self._rows:
                self._rows[(r.folder, mode)] = [x for x in read_scores(r.folder / SCORES) if x["mode"] == mode]
            for x in self._rows[(r.folder, mode)]:
                if task is None or x["task"] == task:
                    out[(r.seed, x["client"], x["task"], x["row"])] = x["rouge1"]
        return out

    def paired(self, scenario: str, a: str, b: str, mode: str, task: str | None = None) -> Paired | None:
        """Method label `a` against `b` on the rows both scored (same seeds, clients, tasks and rows). The unit
        resampled is a test row of a seed: in the global mode every client answers the same test rows, often
        identically (one shared adapter), so (client, row) pairs are not independent; each side's scores of a
        row are first averaged over the clients both scored it for."""
        sa, sb = self.row_scores(scenario, a, mode, task), self.row_scores(scenario, b, mode, task)
        units: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for seed, client, t, row in sorted(set(sa) & set(sb)):
            units[(seed, t, row)].append((sa[(seed, client, t, row)], sb[(seed, client, t, row)]))
        return paired({u: float(np.mean([x for x, _ in v])) for u, v in units.items()},
                      {u: float(np.mean([y for _, y in v])) for u, v in units.items()})


def _score_table(t: BenchTables, scenario: str) -> list[str]:
    modes = t.modes(scenario)
    lines = ["| method | seeds | " + " | ".join(modes) + " | bytes communicated | train tokens |",
             "|---" * (len(modes) + 4) + "|"]
    for m in t.methods(scenario):
        seeds = len(t.by_cell[(scenario, m)])
        nbytes = t.mean_of(scenario, m, lambda x: x["bytes_communicated"])
        tokens = t.mean_of(scenario, m, lambda x: sum(r.get("train_tokens", 0) for r in x["rounds"]))
        cells = [_fmt(t.score(scenario, m, mode)) for mode in modes]
        lines.append(f"| {m} | {seeds} | " + " | ".join(cells) + f" | {nbytes:,.0f} | {tokens:,.0f} |")
    return lines


def _task_table(t: BenchTables, scenario: str) -> list[str]:
    """Per task, each method's ROUGE-1 in the local mode (mean over the clients holding it, then over seeds)."""
    mode = "local" if "local" in t.modes(scenario) else t.modes(scenario)[0]
    tasks, methods = t.tasks(scenario, mode), t.methods(scenario)
    lines = [f"Per task ({mode} mode):", "", "| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_fmt(t.task_score(scenario, m, mode, task)) for m in methods) + " |")
    return lines + [""]


def _gain_table(t: BenchTables, scenario: str) -> list[str]:
    modes = t.modes(scenario)
    lines = ["| method | " + " | ".join(f"{m} vs best baseline" for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]
    names = {m: t.names[(scenario, m)] for m in t.methods(scenario)}
    others = [m for m in t.methods(scenario) if names[m] not in t.baselines]
    if not others:
        return []
    for m in others:
        cells = []
        for mode in modes:
            means = {b: t.score(scenario, b, mode).mean for b in names}
            best = best_baseline(means, t.baselines, names)
            cells.append("no baseline" if best is None else f"{_pct(relative_gain(means[m], best[1]))} (vs {best[0]})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _claims(t: BenchTables) -> list[str]:
    lines = ["| claim | scenario | here (means over seeds) | by the means | paired difference in ROUGE-1 [95% CI] "
             f"| p | verdict | pairs for ±{TARGET} |", "|---|---|---|---|---|---|---|---|"]
    any_row = False
    for claim in CLAIMS:
        for scenario in t.scenarios:
            names = {m: t.names[(scenario, m)] for m in t.methods(scenario)}
            scen_name = next(r.scenario_name for r in t.runs if r.scenario == scenario)
            if scen_name != claim.scenario or claim.mode not in t.modes(scenario):
                continue
            for m in [m for m, n in names.items() if n == claim.method]:
                here, holds, ref = _check(t, scenario, m, claim, names)
                if here is None:
                    continue
                any_row = True
                lines.append(f"| {claim.text} | {scenario} ({claim.mode}) | {m}: {here} | {holds} | "
                             f"{_paired_cells(t, scenario, m, ref, claim)} |")
    return lines if any_row else []


def _paired_cells(t: BenchTables, scenario: str, m: str, ref: str, claim) -> str:
    """difference [interval] | p | verdict | pairs an interval of +-TARGET would need at the measured spread,
    paired on the rows both scored; per task for a per-task claim (supported only if every task is, refuted
    if any is)."""
    if claim.kind != "per-task":
        p = t.paired(scenario, m, ref, claim.mode)
        return (NO_ROWS if p is None else
                f"{_diff(p)} vs {ref} | {_p(p.p)} | {p.verdict} | {_pairs(p)}")
    per = {k: t.paired(scenario, m, ref, claim.mode, k) for k in t.tasks(scenario, claim.mode)}
    if not per or any(p is None for p in per.values()):
        return NO_ROWS
    words = [p.verdict for p in per.values()]
    overall = ("refuted" if "refuted" in words else "supported" if all(w == "supported" for w in words)
               else "inconclusive at this budget")
    diffs = "; ".join(f"{k} {_diff(p)}" for k, p in per.items())
    pairs = "; ".join(f"{k} {_pairs(p)}" for k, p in per.items())
    return f"{diffs} vs {ref} | {', '.join(_p(p.p) for p in per.values())} | {overall} | {pairs}"


NO_ROWS = "n/a (no per-row scores) | | n/a | n/a"


def _pairs(p: Paired) -> str:
    """The pairs for +-TARGET, and whether this bench already has them."""
    need = p.pairs_for()
    return f"{need} ({'met' if p.half_width <= TARGET else f'{need / p.n:.1f}x these'})"


def _diff(p: Paired) -> str:
    return f"{p.diff:+.4f} [{p.low:+.4f}, {p.high:+.4f}] (n = {p.n})"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else "< 0.001"


def _check(t: BenchTables, scenario: str, m: str, claim, names: dict[str, str]) -> tuple[str | None, str, str]:
    """What the seed means say (the figure, the word) and the method label compared against."""
    score = t.score(scenario, m, claim.mode)
    if claim.versus == "best-baseline":
        best = best_baseline({b: t.score(scenario, b, claim.mode).mean for b in names}, t.baselines, names)
        if best is None:
            return None, "", ""
        gain = relative_gain(score.mean, best[1])
        holds = "n/a" if gain is None else ("yes" if gain >= claim.value else ("partly (a gain, smaller)" if gain > 0 else "no"))
        return f"{_pct(gain)} vs {best[0]}", holds, best[0]
    refs = [b for b, n in names.items() if n == claim.versus]
    if not refs:
        return None, "", ""
    ref = refs[0]
    if claim.kind == "per-task":
        tasks = t.tasks(scenario, claim.mode)
        above = sum(t.task_score(scenario, m, claim.mode, k).mean > t.task_score(scenario, ref, claim.mode, k).mean
                    for k in tasks)
        return f"above {ref} on {above} of {len(tasks)} tasks", "yes" if above == len(tasks) else "no", ref
    other = t.score(scenario, ref, claim.mode)
    gap = score.mean - other.mean
    # "Above" with confidence: the gap exceeds both intervals' half widths combined (a conservative check).
    margin = (score.half_width or 0.0) + (other.half_width or 0.0)
    verdict = "yes" if gap > margin else ("within noise" if gap > 0 else "no")
    return f"{score.mean:.4f} vs {ref} {other.mean:.4f}", verdict, ref


def _reference_table(t: BenchTables, scenario: str) -> list[str]:
    """Each method's paired gain over the untrained base model, per mode: a method not above it at this
    budget has not learnt anything these test rows can see."""
    if REFERENCE not in t.methods(scenario):
        return []
    lines = ["| method | mode | paired gain over the base model [95% CI] | p | verdict |", "|---|---|---|---|---|"]
    for m in t.methods(scenario):
        if m == REFERENCE:
            continue
        for mode in t.modes(scenario):
            p = t.paired(scenario, m, REFERENCE, mode)
            if p is not None:
                lines.append(f"| {m} | {mode} | {_diff(p)} | {_p(p.p)} | {p.verdict} |")
    return lines if len(lines) > 2 else []


RIVALS = ("fedalt", "fedlease")  # issue 29: the closest rivals, each compared with FedRouter row by row


def _rival_table(t: BenchTables, scenario: str) -> list[str]:
    """FedRouter against each rival of the scenario, paired per mode on the test rows both scored."""
    names = {m: t.names[(scenario, m)] for m in t.methods(scenario)}
    ours = [m for m, n in names.items() if n == "fedrouter"]
    rivals = [m for m, n in names.items() if n in RIVALS]
    lines = ["| FedRouter | rival | mode | paired difference in ROUGE-1 [95% CI] | p | verdict |", "|---|---|---|---|---|---|"]
    for m in ours:
        for r in rivals:
            for mode in t.modes(scenario):
                p = t.paired(scenario, m, r, mode)
                if p is not None:
                    lines.append(f"| {m} | {r} | {mode} | {_diff(p)} | {_p(p.p)} | {p.verdict} |")
    return lines if len(lines) > 2 else []


def _figures(t: BenchTables, folder: Path) -> list[str]:
    lines = []
    fig_dir = folder / "figures"
    for scenario in t.scenarios:
        methods, modes = t.methods(scenario), t.modes(scenario)
        summaries = {(m, mode): t.score(scenario, m, mode) for m in methods for mode in modes}
        rel = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
        lines += [f"### {scenario}", ""]
        p = figures.scores_bars(fig_dir / f"scores_{scenario}.png", f"{scenario}: ROUGE-1 per method", methods, modes, summaries)
        lines.append(f"![scores {scenario}]({rel(p)})")
        mode = "global" if "global" in modes else modes[0]
        grids = {}
        for m in methods:
            first = t.by_cell[(scenario, m)]
            clients = sorted({c for r in first for c in r.metrics["eval"].get(mode, {}).get("per_client", {})})
            tasks = t.tasks(scenario, mode)
            grid = np.full((len(clients), len(tasks)), np.nan)
            for i, c in enumerate(clients):
                for j, k in enumerate(tasks):
                    vals = [r.metrics["eval"][mode]["per_client"][c]["per_task"][k]["rouge1"] for r in first
                            if k in r.metrics["eval"].get(mode, {}).get("per_client", {}).get(c, {}).get("per_task", {})]
                    if vals:
                        grid[i, j] = float(np.mean(vals))
            grids[m] = (clients, tasks, grid)
        p = figures.heatmaps(fig_dir / f"heatmap_{scenario}.png", f"{scenario}: ROUGE-1 per client and task ({mode}, mean over seeds)", grids)
        lines.append(f"![heatmap {scenario}]({rel(p)})")
        for m in methods:
            runs = t.by_cell[(scenario, m)]
            conf = runs[0].metrics["eval"].get(mode, {}).get("router_confusion")
            if conf:  # cluster ids are not comparable across seeds: the first seed's run
                tasks = sorted(conf)
                p = figures.confusion(fig_dir / f"router_{scenario}_{m}.png",
                                      f"{scenario} / {m} (seed {runs[0].seed}, {mode}): true task x chosen cluster",
                                      tasks, np.array([conf[k] for k in tasks]))
                lines.append(f"![router {scenario} {m}]({rel(p)})")
        curves = {}
        for m in methods:
            per_seed = [[x["train_loss"] for x in r.metrics["rounds"]] for r in t.by_cell[(scenario, m)]]
            length = min(len(c) for c in per_seed)
            curves[m] = np.nanmean(np.array([c[:length] for c in per_seed], dtype=float), axis=0)
        p = figures.loss_curves(fig_dir / f"loss_{scenario}.png", f"{scenario}: train loss per round", curves)
        lines.append(f"![loss {scenario}]({rel(p)})")
        points = {m: (t.mean_of(scenario, m, lambda x: x["bytes_communicated"]), summaries[(m, mode)].mean) for m in methods}
        p = figures.score_vs_bytes(fig_dir / f"bytes_{scenario}.png", f"{scenario}: score against bytes", points, mode)
        lines += [f"![bytes {scenario}]({rel(p)})", ""]
    return lines


def _accuracies(t: BenchTables) -> list[str]:
    """Router accuracy and per-round clustering accuracy (mean over seeds), for the methods that report them."""
    lines = []
    for scenario in t.scenarios:
        for m in t.methods(scenario):
            runs = t.by_cell[(scenario, m)]
            for mode in t.modes(scenario):
                evs = [r.metrics["eval"].get(mode, {}) for r in runs]
                router = mean_ci([e.get("router_accuracy") for e in evs])
                if router.n:
                    lines.append(f"- {scenario} / {m} / {mode}: router accuracy {_fmt(router, 3)}")
            curves = [r.metrics["eval"][next(iter(r.metrics["eval"]))].get("clustering_accuracy_per_round")
                      for r in runs if r.metrics["eval"]]
            curves = [c for c in curves if c]
            if curves:
                length = min(map(len, curves))
                per_round = [mean_ci([c[i] for c in curves]) for i in range(length)]
                lines.append(f"- {scenario} / {m}: clustering accuracy per round "
                             + ", ".join(_fmt(s, 3) for s in per_round))
    return ["## Routing and clustering accuracy", ""] + lines + [""] if lines else []


def privacy_curves(t: BenchTables, scenario: str) -> dict[str, list[tuple[float, Summary, Summary]]]:
    """Per swept method (an epsilon sweep's base label): (epsilon, router accuracy, score) over the sweep,
    epsilon = inf for the non-private cell; the mode is global where evaluated, else the first."""
    modes = t.modes(scenario)
    mode = "global" if "global" in modes else modes[0]
    methods = t.methods(scenario)
    out: dict[str, list] = {}
    for m in methods:
        hit = SWEPT.fullmatch(m)
        if hit and hit.group(1) in methods:
            out.setdefault(hit.group(1), []).append((float(hit.group(2)), m))
    curves = {}
    for base, swept in out.items():
        points = []
        for eps, m in sorted(swept) + [(float("inf"), base)]:
            evs = [r.metrics["eval"].get(mode, {}) for r in t.by_cell[(scenario, m)]]
            points.append((eps, mean_ci([e.get("router_accuracy") for e in evs]), t.score(scenario, m, mode)))
        curves[base] = points
    return curves


def _privacy(t: BenchTables, folder: Path) -> list[str]:
    """The cost of privacy: router accuracy and score against epsilon, a table and a figure per scenario."""
    lines = []
    for scenario in t.scenarios:
        curves = privacy_curves(t, scenario)
        if not curves:
            continue
        lines += [f"### {scenario}", "", "| method | epsilon | router accuracy | score |", "|---|---|---|---|"]
        for base, points in curves.items():
            lines += [f"| {base} | {'off' if eps == float('inf') else f'{eps:g}'} | {_fmt(acc, 3) if acc.n else '-'} "
                      f"| {_fmt(score)} |" for eps, acc, score in points]
        p = figures.privacy_cost(folder / "figures" / f"privacy_{scenario}.png",
                                 f"{scenario}: router accuracy and score against epsilon",
                                 {b: [(e, a.mean if a.n else None, s.mean if s.n else None) for e, a, s in pts]
                                  for b, pts in curves.items()})
        lines += ["", f"![privacy {scenario}]({p.relative_to(folder).as_posix()})", ""]
    return ["## Privacy: accuracy against epsilon", ""] + lines if lines else []


def _wall_time(t: BenchTables) -> list[str]:
    lines = [WALL_TIME_HEADING, "", "Mean seconds per cell (machine-dependent; the only section that differs "
             "between two runs of the same bench).", "",
             "| scenario | method | setup | train | eval |", "|---|---|---|---|---|"]
    for scenario in t.scenarios:
        for m in t.methods(scenario):
            setup = t.mean_of(scenario, m, lambda x: x.get("setup_seconds", 0.0))
            train = t.mean_of(scenario, m, lambda x: sum(r["seconds"] for r in x["rounds"]))
            ev = t.mean_of(scenario, m, lambda x: sum(e.get("seconds", 0.0) for e in x["eval"].values()))
            lines.append(f"| {scenario} | {m} | {setup:.1f} | {train:.1f} | {ev:.1f} |")
    return lines


def build_report(folder: Path) -> str:
    runs = collect(folder)
    if not runs:
        raise TaskfedError(f"{folder}: no finished runs (<scenario>/<method>/seed-<s>/metrics.json) to report on.")
    stamp = folder / "suite.json"
    suite = _read_stamp(stamp) if stamp.exists() else {}
    runs = suite_order(runs, suite)
    t = BenchTables(runs, suite.get("baselines", BASELINES))
    lines = [f"# Bench report: {suite.get('name', folder.name)}", ""]
    history = folder / "runs.json"
    if history.exists():
        commits = _ordered(str(h.get("commit")) for h in json.loads(history.read_text()))
        lines += [f"Commit(s): {', '.join(commits)}.", ""]
    seeds = sorted({r.seed for r in runs})
    lines += [f"{len(runs)} runs; seeds {', '.join(map(str, seeds))}. Scores are mean ROUGE-1 over the clients "
              "(methods.md), then the mean over seeds ± the half width of its 95% confidence interval "
              f"(Student t). Baselines: {', '.join(t.baselines)}.", ""]
    for scenario in t.scenarios:
        name = next(r.scenario_name for r in runs if r.scenario == scenario)
        lines += [f"## {scenario}" + (f" (scenario '{name}')" if name != scenario else ""), ""]
        lines += _score_table(t, scenario) + [""] + _task_table(t, scenario)
        gains = _gain_table(t, scenario)
        if gains:
            lines += ["Relative to the best baseline (by mean):", ""] + gains + [""]
        rivals = _rival_table(t, scenario)
        if rivals:
            lines += ["FedRouter against the closest rivals (FedALT, FedLEASE), paired on the same test rows and seeds "
                      "(positive: FedRouter scores higher):", ""] + rivals + [""]
        reference = _reference_table(t, scenario)
        if reference:
            lines += ["Against the untrained base model (`base`), paired on the same test rows and seeds:", ""]
            lines += reference + [""]
    claims = _claims(t)
    if claims:
        lines += ["## The papers' claims at this scale", "",
                  "\"by the means\": the seed means compared (\"within noise\": above on the mean but not by more "
                  "than the confidence intervals). The paired columns compare the two methods row by row on the "
                  "same test rows and seeds (scores.csv; n counts test rows x seeds, each row's scores averaged over "
                  "the clients that answered it): the mean difference, a 95% paired bootstrap interval, a "
                  "sign-flip permutation p-value, and the verdict the interval gives: supported (above zero), "
                  "refuted (below zero) or inconclusive at this budget. The last column is how many pairs an "
                  f"interval of ±{TARGET} would take at the spread measured here ((1.96 sd / {TARGET})^2, the "
                  "normal approximation): 'met' when this interval is already that narrow, else the factor of "
                  "test rows x seeds still missing.", ""] + claims + [""]
    lines += _accuracies(t)
    lines += _privacy(t, folder)
    lines += ["## Figures", ""] + _figures(t, folder)
    lines += _wall_time(t)
    return "\n".join(lines) + "\n"


def write_report(folder: Path) -> Path:
    """report.md (written whole, then renamed into place) and figures/, checked writable before any is built."""
    path, tmp = folder / "report.md", folder / "report.md.tmp"
    for what, is_kind, kind in ((path, Path.is_file, "a file"), (tmp, Path.is_file, "a file"),
                                (folder / "figures", Path.is_dir, "a folder")):
        if (what.exists() or what.is_symlink()) and (what.is_symlink() or not is_kind(what)):
            raise TaskfedError(f"{what}: is in the way of the report (it must be {kind} taskfed writes, or absent); "
                               f"move it away and rerun.")
    text = build_report(folder)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TaskfedError(f"{path}: cannot write the report ({exc.strerror or exc}).") from None
    return path
