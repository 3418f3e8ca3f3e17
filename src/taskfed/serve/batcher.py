"""One thread owns the base model and its adapter bank; every request is routed and decoded there.

Each turn of the loop: requests that gave up (timeout, client gone, a stop string seen) leave; the live rows
take one decoding step; requests waiting in the bounded queue join (up to `max_batch` rows): their routing
embeddings are computed in one batch, their prompts prefilled in one batch, and from the next turn they
decode with the rest (continuous batching, evaluation/generate.py's Decoder). Rows on different adapters or
mixes share every step: the bank applies each row's own mix. A finished row leaves at once.

A reload installs a newer run between two turns: its adapters go into free bank slots, and the slots of a
run that is no longer current are freed only once none of its requests is left, so a request finishes on
the adapters it started with. Slot 0 stays zero: the base model, and the filler of rows with fewer terms.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from taskfed.errors import TaskfedError
from taskfed.evaluation.generate import GREEDY, Decoder, Sampling
from taskfed.model.bank import RowMix
from taskfed.runtime import Runtime
from taskfed.serve.run import BASE, Ask, Decision, ServedRun

Emit = Callable[[str, Any], None]  # ("decision", Decision) | ("token", id) | ("done", "stop" | "length") | ("error", message)


@dataclass
class Ticket:
    run: ServedRun
    ask: Ask
    instruction: str  # what the router embeds
    prompt: list[int]  # what the model continues
    max_tokens: int
    emit: Emit
    sampling: Sampling = field(default_factory=lambda: GREEDY)  # greedy rows share one (it holds no state they use)
    cancelled: threading.Event = field(default_factory=threading.Event)
    n_out: int = 0


class Batcher:
    def __init__(self, rt: Runtime, run: ServedRun, max_batch: int = 32, max_queue: int = 256):
        self.rt, self.max_batch = rt, max_batch
        self.waiting: queue.Queue[Ticket] = queue.Queue(maxsize=max_queue)
        self.commands: queue.Queue[tuple[Callable[[], Any], threading.Event, list]] = queue.Queue()
        self.dec = Decoder(rt)
        self.live: list[Ticket] = []
        self.joining: list[Ticket] = []
        self.installed: list[ServedRun] = []
        self.current: ServedRun | None = None
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "max_rows": 0}
        self._stop = threading.Event()
        self._gate = threading.Lock()  # held for each turn; `paused()` holds it to stop the loop between turns
        self._install(run)
        self.thread = threading.Thread(target=self._loop, name="taskfed-batcher", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------- from other threads
    def submit(self, ticket: Ticket) -> None:
        """Queues a request; raises queue.Full when the queue is at its bound."""
        self.waiting.put_nowait(ticket)

    def install(self, run: ServedRun, timeout: float = 600.0) -> None:
        """Loads `run` into the bank between two turns and makes it current (returns when done)."""
        self._call(lambda: self._install(run), timeout)

    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        done, box = threading.Event(), []
        self.commands.put((fn, done, box))
        if not done.wait(timeout):
            raise TimeoutError("the batcher did not run the command in time")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No turn runs inside the block (requests queue up): for using the model from another thread, e.g. a
        test's offline generation on the same bank, or letting a burst queue up before it decodes together."""
        with self._gate:
            yield

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    # ----------------------------------------------------------------- the bank's slots
    def _install(self, run: ServedRun) -> None:
        keep = [r for r in self.installed if r is self.current or any(t.run is r for t in self.live)]
        used = {s for r in keep for s in r.slots.values()}
        free = (s for s in range(1, 1 << 20) if s not in used)
        slots = {name: next(free) for name in sorted(run.adapters)}
        gate_slots = self._gate_slots(keep, run)
        self.rt.ensure_slots(max([0, *used, *slots.values()]) + 1)
        for name, slot in slots.items():
            self.rt.bank.load(slot, run.adapters[name])
        for cid, g in gate_slots.items():
            self.rt.bank.load_gate(g, run.gates[cid])
        run.slots, run.gate_slots = slots, gate_slots
        self.installed = [*keep, run]
        self.current = run

    def _gate_slots(self, keep: list[ServedRun], run: ServedRun) -> dict[str, int]:
        """Bank gates for `run`'s clients beside those of the runs kept (their requests still decode): gated
        rows of two runs share a batch, so the runs' gates must share one width and top-k."""
        if not run.gates:
            return {}
        width = len(next(iter(run.router.params["models"].values()))["logits"])
        for other in keep:
            if other.gates and (len(next(iter(other.router.params["models"].values()))["logits"]), other.router.params.get("top_k")) \
                    != (width, run.router.params.get("top_k")):
                raise TaskfedError(f"{run.folder}: its gates ({width} logits, top-k {run.router.params.get('top_k')}) "
                                   f"differ from those of {other.folder}, whose requests are still decoding; reload "
                                   f"once they are done.")
        used = {g for r in keep for g in r.gate_slots.values()}
        free = (g for g in range(1 << 20) if g not in used)
        gate_slots = {cid: next(free) for cid in sorted(run.gates)}
        self.rt.bank.ensure_gates(max([*used, *gate_slots.values()]) + 1, width)
        return gate_slots

    def _row(self, run: ServedRun, d: Decision) -> tuple[list[int], list[float], int]:
        """A decision as a row of the bank's mix: slots, weights, and its gate (-1: none)."""
        if d.adapters == [BASE]:
            return [0], [0.0], -1
        if d.gate is not None:  # one term per logit, weighed per token by the client's gate
            slots = [run.slots[d.adapters[i]] for i in run.gate_row(d)]
            return slots, [0.0] * len(slots), run.gate_slots[d.gate]
        return [run.slots[a] for a in d.adapters], list(d.weights), -1

    # ----------------------------------------------------------------- the loop
    # What ServedRun.decide needs computed on the model (the batch's routed inputs at once).
    def embed(self, texts: list[str], layers: int | None) -> torch.Tensor:
        return self.rt.hidden_states(texts, None, "mean", layers=None if layers == self.rt.n_layers else layers)

    def last_states(self, texts: list[str], slots: list[int]) -> torch.Tensor:
        return self.rt.hidden_states(texts, RowMix.one_hot(slots), "last")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._gate:
                    self._turn()
            except Exception as exc:  # a bug or an OOM must not kill the server: fail what is in flight
                for t in self.live + self.joining:
                    fail(t, f"generation failed ({type(exc).__name__}: {exc})")
                self.live, self.joining, self.dec = [], [], Decoder(self.rt)

    def _turn(self) -> None:
        while not self.commands.empty():
            fn, done, box = self.commands.get_nowait()
            try:
                box.append(fn())
            except BaseException as exc:  # handed to the caller
                box.append(exc)
            done.set()
        gone = [i for i, t in enumerate(self.live) if t.cancelled.is_set()]
        if gone:
            self._keep([i for i in range(len(self.live)) if i not in gone])
        new: list[Ticket] = []
        try:
            if not self.live:  # idle: wait a little for work (and look at commands again soon)
                new.append(self.waiting.get(timeout=0.05))
            while len(self.live) + len(new) < self.max_batch:
                new.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        new = [t for t in new if not t.cancelled.is_set()]
        self.joining = new  # failed with the live rows if this turn raises
        if not self.live and not new:
            return
        tokens = self.dec.step() if self.live else []
        if new:
            tokens += self._admit(new)
        self.live, self.joining = self.live + new, []
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.live))
        eos = self.rt.tokenizer.eos_token_id
        keep = []
        for i, (t, tok) in enumerate(zip(self.live, tokens)):
            t.n_out += 1
            self.stats["tokens"] += 1
            if tok == eos:
                t.emit("done", "stop")
                continue
            t.emit("token", tok)
            if t.n_out >= t.max_tokens:
                t.emit("done", "length")
            elif not t.cancelled.is_set():
                keep.append(i)
        self._keep(keep)

    def _admit(self, new: list[Ticket]) -> list[int]:
        rows: list[tuple[list[int], list[float], int]] = []
        by_run: dict[int, list[int]] = {}
        for i, t in enumerate(new):
            by_run.setdefault(id(t.run), []).append(i)
        decisions: list[Decision | None] = [None] * len(new)
        for members in by_run.values():
            for i, d in zip(members, self._decide([new[i] for i in members])):
                decisions[i] = d
        routed = [i for i, d in enumerate(decisions) if d is not None]
        if len(routed) < len(new):  # who failed to route has had its error; the others decode (`new` is the
            new[:] = [new[i] for i in routed]  # caller's list: they join the live rows)
            decisions = [decisions[i] for i in routed]
            if not new:
                return []
        for t, d in zip(new, decisions):
            t.emit("decision", d)
            rows.append(self._row(t.run, d))
        k = max(len(idx) for idx, _, _ in rows)
        idx = torch.tensor([r[0] + [0] * (k - len(r[0])) for r in rows], dtype=torch.long)
        w = torch.tensor([r[1] + [0.0] * (k - len(r[1])) for r in rows], dtype=torch.float32)
        mix = RowMix(idx, w)
        gated = [t.run for t, d in zip(new, decisions) if d.gate is not None]
        if gated:  # top-k is one per batch: _gate_slots keeps the runs served together alike
            mix = RowMix(idx, w, gate=torch.tensor([r[2] for r in rows], dtype=torch.long),
                         top_k=gated[0].router.params.get("top_k"), n=self.rt.bank.n_slots)
        self.stats["requests"] += len(new)
        return self.dec.admit([t.prompt for t in new], mix, [t.sampling for t in new])

    def _decide(self, tickets: list[Ticket]) -> list[Decision | None]:
        """The routing decisions of tickets of one run, in one batch; if the batch fails, ticket by ticket, so
        that one request the router cannot handle fails alone (None), not every request joining with it."""
        run = tickets[0].run
        try:
            return run.decide(self, [t.ask for t in tickets], [t.instruction for t in tickets])
        except Exception:  # noqa: BLE001 - found below, ticket by ticket
            pass
        out: list[Decision | None] = []
        for t in tickets:
            try:
                out.append(run.decide(self, [t.ask], [t.instruction])[0])
            except Exception as exc:
                fail(t, f"routing failed ({type(exc).__name__}: {exc})")
                out.append(None)
        return out

    def _keep(self, rows: list[int]) -> None:
        self.dec.keep(rows)
        self.live = [self.live[i] for i in rows]

    def snapshot(self) -> dict[str, Any]:
        return {"queued": self.waiting.qsize(), "live": len(self.live), **self.stats, "time": time.time()}


def fail(t: Ticket, message: str) -> None:
    """Tells a ticket it failed; an emit that raises (its request's event loop gone) cannot take the thread down."""
    t.cancelled.set()
    try:
        t.emit("error", message)
    except Exception:  # noqa: BLE001 - nobody is left to tell
        pass
