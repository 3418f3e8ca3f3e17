"""Deterministic fault injection for the crash tests: `TASKFED_FAULT=<point>[@<n>][:<action>]` makes the
process fail at the n-th time (default the first) it passes the named point.

Actions: `kill` (default: SIGKILL to itself, what `kill -9` or a power cut does: no cleanup, no flush),
`enospc` (an OSError "No space left on device", as a full disk raises it), `raise` (an exception, for
tests that stop a run inside their own process) and `hang` (never returns: a node that never answers, until
something kills it).

Points: setup.done, checkpoint.files, checkpoint.before_rename, checkpoint.after_rename,
round-<r>.aggregate (after round r's first upload is folded in), eval.<mode> (that mode generated, not yet
checkpointed), final.before_rename (the run folder written, not yet in place), final.after_rename (in place,
the checkpoints not yet removed); on a Flower node,
node.round-<r> (round r's message received, nothing trained yet). Points are named where the
driver and the checkpoint writer call `hit`; an unset variable costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

_HITS: Counter = Counter()


class InjectedFault(RuntimeError):
    pass


def reset() -> None:
    _HITS.clear()


def hit(point: str) -> None:
    spec = os.environ.get("TASKFED_FAULT")
    if not spec:
        return
    name, _, action = spec.partition(":")
    name, _, nth = name.partition("@")
    if name != point:
        return
    _HITS[point] += 1
    if _HITS[point] != int(nth or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "raise":
        raise InjectedFault(f"injected fault at {point}")
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
