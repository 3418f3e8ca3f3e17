"""What a command prints when it fails, for both CLIs (`taskfed ...`, `taskfed flower ...`).

- bad input (`TaskfedError`): `error: <sentence>`, exit code 2;
- Ctrl-C or SIGTERM: `error: interrupted`, exit code 130 (SIGINT) or 143 (SIGTERM). SIGTERM is turned into
  an exception in the main thread, so a run's own cleanup (`except BaseException` around its temporary
  run folder) runs exactly as on Ctrl-C;
- a full disk (ENOSPC, EDQUOT) anywhere: `error: FILE: no space left on the device ...`, exit code 2;
- anything else (a bug): one line with the exception's type, message and place, exit code 1. Never a
  traceback with local variables: those held clients' private training rows. `TASKFED_TRACEBACK=1` adds
  the plain traceback (no locals) for a bug report.

User text (paths, task names, messages) is printed as plain text, never as rich markup: `[/x]` in a path
would crash the printer and `[hub]` would vanish.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.text import Text

from taskfed.errors import TaskfedError

console = Console(stderr=True, highlight=False)
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota, wherever a write meets it: one clean line
SOURCE = Path(__file__).resolve().parent  # the taskfed package: frames here are "ours"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def say(label: str, style: str, text: str, *, out: Console | None = None) -> None:
    """`label` styled, then `text` verbatim (no markup, no highlighting)."""
    (out or console).print(Text.assemble((label, style), " ", text), soft_wrap=True)


def place(exc: BaseException) -> str:
    """Where it was raised (file:line), and the innermost taskfed frame when that is elsewhere."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"

    def short(f: traceback.FrameSummary) -> str:
        path = Path(f.filename)
        try:
            path = path.resolve().relative_to(SOURCE.parent)
        except ValueError:
            path = Path(*path.parts[-2:])
        return f"{path}:{f.lineno}"

    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(SOURCE)]
    where = short(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        where += f", from {short(ours[-1])}"
    return where


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextmanager
def guarded(sigterm: bool = False) -> Iterator[None]:
    """A command's body: failures printed as one line with the exit codes above. `sigterm`: turn SIGTERM into
    `Terminated` for the block (commands that write run folders)."""
    installed, previous = False, None
    if sigterm:
        try:
            previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
        except ValueError:  # not the main thread: leave SIGTERM alone
            pass
    from taskfed import progress

    try:
        try:
            with progress.use(progress.for_console(console)):  # long phases show progress from their start
                yield
        except BaseException:
            # Parent folders created for a run folder that was then removed (runfolder.prepare_out).
            from taskfed.runfolder import discard_orphans

            discard_orphans()
            raise
    except TaskfedError as exc:
        say("error:", "red", str(exc))
        raise typer.Exit(code=2) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except OSError as exc:
        if exc.errno not in FULL:
            _internal(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        say("error:", "red", f"{where}no space left on the device ({exc.strerror}); free some space and rerun the "
                             f"command (a run continues from its last checkpoint with --resume).")
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        # What was kept and how to continue is the driver's line just above (runs) or the bench's: not repeated.
        say("error:", "red", f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}).")
        raise typer.Exit(code=143 if term else 130) from None
    except Exception as exc:  # a bug: one line, never locals
        _internal(exc)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _internal(exc: BaseException) -> None:
    message = " ".join(str(exc).split())
    if len(message) > 300:
        message = message[:300] + " ..."
    say("error:", "red", f"internal error: {type(exc).__name__}: {message or '(no message)'} "
                         f"(at {place(exc)}). Please report it; TASKFED_TRACEBACK=1 shows the traceback.")
    if os.environ.get("TASKFED_TRACEBACK"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    raise typer.Exit(code=1) from None
