"""Progress of long phases, from their first second: downloads, extraction, model conversion, client setup,
each round, each evaluation mode.

The core reports into whatever reporter is active, through one call site per phase:

    with progress.task("round 3/10", total=n_steps, unit="steps"):
        ...  progress.advance(k)            # anywhere below, e.g. in the engine, per trained step

Nothing is shown unless a front end installs a reporter (`progress.use(...)`): the CLI does, with a rich
bar on a terminal and, in a non-interactive log (CI, a file), a plain line when a phase starts, every few
seconds while it runs (`TASKFED_PROGRESS_SECONDS`, default 5) and when it ends: never a flood of carriage
returns. Tasks nest (a round inside a run); `advance` counts for the innermost one. A library user gets
silence by default, and the same reporters if asked.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Task:
    def __init__(self, description: str, total: float | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0.0
        self.start = time.monotonic()

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None while nothing is done or the total is unknown)."""
        if not self.total or self.done <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return max(0.0, elapsed * (self.total - self.done) / self.done)

    def line(self) -> str:
        elapsed = _duration(time.monotonic() - self.start)
        if self.total:
            eta = self.eta()
            left = f", ~{_duration(eta)} left" if eta is not None else ""
            return (f"{self.description}: {_amount(self.done, self.unit)}/{_amount(self.total, self.unit)} {self.unit} "
                    f"({self.done / self.total:.0%}), {elapsed}{left}")
        amount = f"{_amount(self.done, self.unit)} {self.unit}, " if self.done else ""
        return f"{self.description}: {amount}{elapsed}"


def _amount(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return f"{int(value)}"


class Reporter:
    """Silent: the default for library use."""

    def begin(self, task: Task) -> None: ...

    def update(self, task: Task) -> None: ...

    def end(self, task: Task) -> None: ...

    def set_total(self, task: Task) -> None:
        self.update(task)


class LineReporter(Reporter):
    """A line when a task starts, at most every `interval` seconds while it advances, and when it ends."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.interval = float(os.environ.get("TASKFED_PROGRESS_SECONDS", 5)) if interval is None else interval
        self._last: dict[int, float] = {}

    def _print(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)

    def begin(self, task: Task) -> None:
        self._last[id(task)] = time.monotonic()
        self._print(f"{task.description}: started" + (f" ({_amount(task.total, task.unit)} {task.unit})" if task.total else ""))

    def update(self, task: Task) -> None:
        now = time.monotonic()
        if now - self._last.get(id(task), 0.0) >= self.interval:
            self._last[id(task)] = now
            self._print(task.line())

    def end(self, task: Task) -> None:
        self._last.pop(id(task), None)
        self._print(f"{task.description}: done in {_duration(time.monotonic() - task.start)}")


class RichReporter(Reporter):
    """rich's live bars on a terminal (one per running task), on the given console."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self._ids: dict[int, int] = {}

    def begin(self, task: Task) -> None:
        if not self._ids:
            self.progress.start()
        self._ids[id(task)] = self.progress.add_task(task.description, total=task.total, unit=task.unit)

    def update(self, task: Task) -> None:  # the unit too: set_total may change what is counted (rows, steps)
        self.progress.update(self._ids[id(task)], completed=task.done, total=task.total, unit=task.unit)

    def end(self, task: Task) -> None:
        """The bar complete (a task without a total too) and its clock stopped: a finished phase's elapsed
        time must not go on ticking beside the phases that follow it."""
        rid = self._ids.pop(id(task))
        done = task.total if task.total else max(task.done, 1)
        self.progress.update(rid, completed=done, total=done, unit=task.unit)
        self.progress.stop_task(rid)
        if not self._ids:
            self.progress.stop()


_reporter: Reporter = Reporter()
_stack: list[Task] = []


@contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Within the block, tasks report to `reporter`."""
    global _reporter
    old, _reporter = _reporter, reporter
    try:
        yield reporter
    finally:
        _reporter = old


def for_console(console) -> Reporter:
    """A rich bar on a terminal, plain lines elsewhere."""
    return RichReporter(console) if console.is_terminal else LineReporter(console.file)


@contextmanager
def task(description: str, total: float | None = None, unit: str = "") -> Iterator[Task]:
    t = Task(description, total, unit)
    _stack.append(t)
    _reporter.begin(t)
    try:
        yield t
    finally:
        _stack.remove(t)
        _reporter.end(t)


def advance(amount: float = 1) -> None:
    """Progress on the innermost running task (nothing when none runs)."""
    if _stack:
        _stack[-1].done += amount
        _reporter.update(_stack[-1])


def set_total(total: float | None, unit: str | None = None) -> None:
    """The innermost task's total (and unit), once known (e.g. a round's steps once its packs are formed)."""
    if _stack:
        _stack[-1].total = total
        if unit is not None:
            _stack[-1].unit = unit
        _reporter.set_total(_stack[-1])
