"""Engines: the places where clients live, as the one federation driver (`taskfed.federation`) sees them.

An engine is a transport. It knows nothing of a particular method: it runs the method's *client side* (an
instance of its own, built from the federation's public facts) where each client's data is, and hands the
server side what crosses the line, counted in bytes:

    connect()                     -> Roster: who the clients are (ids, row counts, tasks), the run's tasks
    init_adapter()                -> the shared initial adapter (the server needs it to build the method)
    setup(fed)                    -> each client's setup arrays (`Method.setup_client`), bytes up, and why
                                     each client that gave none usable is out
    attach(fed)                   -> the federation's facts changed (a client left out at setup)
    stream(round, jobs)           -> the round's results in plan order, lazily, and the round's stats
    evaluate(mode, asks, downlink)-> per client a ClientEval (scores per task, the routing it used), and
                                     why each client that gave none usable is out
    save_client_files(folder, lora, downlink) -> ClientFiles: the client-owned adapters and arrays, where the engine put
                                     them, relative to `folder` (none where the nodes keep them)
    client_state()                -> the clients' stores for the driver's checkpoint, or None where the
                                     clients keep their own (a Flower node commits its store per round)
    restore_clients(state, where) -> the clients as at a checkpoint
    close()

`InProcessEngine` (engine/inprocess.py) holds every client in this process; `FlowerEngine`
(flower/engine.py) sends each client's part to its SuperNode over a Flower Grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from taskfed.methods.base import Downlink, Federation, Job, Result


@dataclass
class ClientFiles:
    """What the clients kept at the end of a run, relative to the run folder: (client, adapter name) -> PEFT
    folder (`Method.client_adapters`), (client, array file name) -> .safetensors (`Method.client_arrays`)."""

    adapters: dict[tuple[str, str], str] = field(default_factory=dict)
    arrays: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class ClientInfo:
    n_train: int
    tasks: list[str]
    data: str = ""  # digest of the client's training and test rows (population.data_digest)
    base: str = ""  # fingerprint of the base model it loaded (Runtime.fingerprint)


@dataclass
class Roster:
    """What the server learns when the clients connect."""

    clients: dict[str, ClientInfo]
    seen: list[str]  # the federation's (trained) tasks
    unseen: list[str]  # held out of training, evaluated in mode `unseen`


@dataclass
class RoundStats:
    bytes_up: int = 0
    bytes_down: int = 0
    loss: float = float("nan")
    compute_seconds: float = 0.0  # forward, backward and optimizer steps (the rest is engine overhead)
    tokens: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # "client/adapter" or client -> why it was refused
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific timings (e.g. a node's load time)


class Engine(Protocol):
    name: str  # "inprocess", "flower": recorded in metrics.json

    def connect(self) -> Roster: ...

    def init_adapter(self): ...

    def setup(self, fed: Federation) -> tuple[dict[str, dict[str, np.ndarray]], int, dict[str, str]]: ...

    def attach(self, fed: Federation) -> None: ...

    def stream(self, round_idx: int, jobs: list[Job]) -> tuple[Iterator[Result], RoundStats]: ...

    def evaluate(self, mode: str, asks: dict[str, list[str]], downlink: Callable[[str], Downlink]) -> tuple[dict, dict[str, str]]: ...

    def save_client_files(self, folder, lora: dict, downlink: Callable[[str], Downlink] | None = None) -> "ClientFiles": ...

    def client_state(self) -> dict | None: ...

    def restore_clients(self, state: dict | None, where) -> None: ...

    def close(self) -> None: ...
