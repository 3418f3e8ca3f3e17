"""The report's figures (matplotlib, no display needed). Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from taskfed.bench.stats import Summary  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scores_bars(path: Path, title: str, methods: list[str], modes: list[str],
                summaries: dict[tuple[str, str], Summary]) -> Path:
    """Grouped bars: one group per method, one bar per eval mode, 95% CI as error bars."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(methods) * max(1, len(modes)) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(modes))
    x = np.arange(len(methods))
    for j, mode in enumerate(modes):
        means = [summaries[(m, mode)].mean if (m, mode) in summaries else np.nan for m in methods]
        errs = [(summaries[(m, mode)].half_width or 0.0) if (m, mode) in summaries else 0.0 for m in methods]
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=mode)
    ax.set_xticks(x, methods, rotation=20, ha="right")
    ax.set_ylabel("ROUGE-1 (mean over seeds, 95% CI)")
    ax.set_title(title)
    ax.legend(title="eval mode", fontsize=8)
    return _save(fig, path)


def heatmaps(path: Path, title: str, grids: dict[str, tuple[list[str], list[str], np.ndarray]]) -> Path:
    """One client x task heatmap of ROUGE-1 per method (NaN: the client has no rows of that task)."""
    n = len(grids)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (method, (clients, tasks, grid)) in zip(axes.flat, grids.items()):
        im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(tasks)), [t[:14] for t in tasks], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(clients)), clients, fontsize=6)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("task", fontsize=7)
        ax.set_ylabel("client", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def confusion(path: Path, title: str, tasks: list[str], matrix: np.ndarray) -> Path:
    """True task (rows) x chosen global cluster (columns), counts of evaluated inputs."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * matrix.shape[1] + 1.5, 1.0 + 0.35 * len(tasks)))
    im = ax.imshow(matrix, cmap="Blues", aspect="auto")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(matrix.shape[1]), [str(j) for j in range(matrix.shape[1])])
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xlabel("chosen global cluster")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def loss_curves(path: Path, title: str, curves: dict[str, np.ndarray]) -> Path:
    """Train loss per round (mean over seeds) for each method."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_vs_bytes(path: Path, title: str, points: dict[str, tuple[float, float]], mode: str) -> Path:
    """Each method's score against the bytes it communicated (log scale: Local sends nothing)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, (nbytes, score) in points.items():
        ax.scatter(max(nbytes, 1.0), score, s=40)
        ax.annotate(method, (max(nbytes, 1.0), score), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated (log; 1 = none)")
    ax.set_ylabel(f"ROUGE-1 ({mode})")
    ax.set_title(title)
    return _save(fig, path)


def privacy_cost(path: Path, title: str, curves: dict[str, list[tuple[float, float | None, float | None]]]) -> Path:
    """Router accuracy (left) and score (right) against epsilon per method; the non-private run (epsilon
    inf) is drawn at the right end, labelled "off"."""
    finite = sorted({e for pts in curves.values() for e, _, _ in pts if np.isfinite(e)})
    off_x = (finite[-1] * 2.0) if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, j, label in ((axes[0], 1, "router accuracy"), (axes[1], 2, "ROUGE-1")):
        drawn = False
        for method, pts in curves.items():
            pts = sorted(pts, key=lambda p: p[0])  # left to right, "off" (inf) last, however they were run
            xs = [e if np.isfinite(e) else off_x for e, *_ in pts]
            ys = [np.nan if p[j] is None else p[j] for p in pts]
            ax.plot(xs, ys, marker="o", label=method)
            drawn = drawn or any(p[j] is not None for p in pts)
        if not drawn:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_xscale("log")
        ticks = finite + [off_x]
        ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["off"])
        ax.minorticks_off()
        ax.set_xlabel("epsilon")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
