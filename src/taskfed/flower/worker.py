"""A long-lived taskfed worker per SuperNode: the loaded runtime and the client stay in one process.

flwr 1.41's SuperNode starts a fresh ClientApp process for every message; without this, every message
re-imports torch and transformers and reloads the model. Instead the ClientApp process only forwards: it
imports nothing heavier than flwr, sends the message's content to this node's worker over a Unix socket
and returns the worker's reply. The worker runs `node.handle`, the very code a ClientApp would run.

- One worker per SuperNode (keyed by Flower's node id), started by the first message that finds none. Its
  socket lives in a folder of the user's own (mode 0700, the socket 0600) and the worker checks each
  peer's uid (SO_PEERCRED): only the node's user can talk to it.
- It stops when the run ends (the server's `query.bye`), when the SuperNode process it watches is gone
  (checked every second), or after `IDLE_SECONDS` without a message.
- A worker that dies (crash, OOM kill) costs one message a restart: the forwarding ClientApp finds the
  socket dead, starts a fresh worker and sends the message again; the fresh worker reads the client's
  state from its store on disk, as every message does.

Wire format (both ways): an 8-byte length and a JSON header, then an 8-byte length and the RecordDict as
Flower's own protobuf (`recorddict_to_proto`): data only, no pickle.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

IDLE_SECONDS = 3600.0
START_TIMEOUT = 180.0
MAX_FRAME = 1 << 34  # 16 GiB: far above any adapter set, below a corrupt length's absurdities


class WorkerError(RuntimeError):
    """The worker ran the message and it failed there (the node's reply is then an error)."""


class WorkerGone(ConnectionError):
    """No worker answered on the socket (none started yet, or it died)."""


# ----------------------------------------------------------------------------- framing
def _send(sock: socket.socket, header: dict[str, Any], content: RecordDict | None) -> None:
    body = recorddict_to_proto(content).SerializeToString() if content is not None else b""
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("!Q", len(head)) + head + struct.pack("!Q", len(body)) + body)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerGone("the worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], RecordDict | None]:
    parts = []
    for _ in range(2):
        (n,) = struct.unpack("!Q", _read_exact(sock, 8))
        if n > MAX_FRAME:
            raise WorkerGone(f"frame of {n} bytes refused")
        parts.append(_read_exact(sock, n))
    header = json.loads(parts[0])
    if not parts[1]:
        return header, None
    proto = ProtoRecordDict()
    proto.ParseFromString(parts[1])
    return header, recorddict_from_proto(proto)


# ----------------------------------------------------------------------------- the ClientApp's side
def home() -> Path:
    """The user's own folder for workers' sockets (short: a Unix socket path is at most 107 bytes)."""
    folder = Path(tempfile.gettempdir()) / f"taskfed-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder}: not a private folder of this user; remove it.")
    return folder


def socket_path(node_id: int) -> Path:
    return home() / f"w{node_id}.sock"


def supernode_pid() -> int:
    """The SuperNode this ClientApp serves: the nearest ancestor running `flower-supernode` (flwr starts
    ClientApps through helper processes), else the parent."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"flower-supernode" in cmdline:
                return pid
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return os.getppid()


def forward(kind: str, content: RecordDict, node_config: dict[str, Any], run_id: int, node_id: int,
            watch_pid: int | None = None) -> RecordDict:
    """`node.handle(kind, content, ...)` on this node's worker, started if none answers (once more after a
    worker that died mid-message)."""
    path = socket_path(node_id)
    header = {"kind": kind, "node_config": node_config, "run_id": run_id}
    for attempt in range(2):
        try:
            return _call(path, header, content)
        except (WorkerGone, ConnectionRefusedError, FileNotFoundError, ConnectionResetError, BrokenPipeError):
            if attempt:
                raise
            start(path, watch_pid or supernode_pid())
    raise AssertionError("unreachable")


def _call(path: Path, header: dict[str, Any], content: RecordDict | None) -> RecordDict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        _send(sock, header, content)
        reply, body = _recv(sock)
    if not reply.get("ok"):
        raise WorkerError(reply.get("error", "the worker failed"))
    return body if body is not None else RecordDict()


def start(path: Path, watch_pid: int) -> None:
    """A fresh worker on `path` (one at a time: a lock file serialises concurrent starts)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(path):
            return  # another ClientApp started it meanwhile
        path.unlink(missing_ok=True)
        log = open(path.with_suffix(".log"), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "taskfed.flower.worker", str(path), "--watch", str(watch_pid)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(path):
            if proc.poll() is not None:
                tail = path.with_suffix(".log").read_text(errors="replace")[-500:]
                raise WorkerGone(f"the taskfed worker exited at start ({tail.strip()})")
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerGone(f"the taskfed worker did not listen within {START_TIMEOUT:g} s")
            time.sleep(0.05)


def _answers(path: Path) -> bool:
    try:
        return _call(path, {"kind": "ping"}, None) is not None
    except (OSError, WorkerGone, WorkerError):
        return False


def stop(node_id: int) -> None:
    """Ends this node's worker, if one runs (the run is over)."""
    path = socket_path(node_id)
    try:
        _call(path, {"kind": "bye"}, None)
    except (OSError, WorkerGone, WorkerError):
        pass


# ----------------------------------------------------------------------------- the worker
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, PermissionError):
        return False
    except (OSError, IndexError):
        return True


def serve(path: Path, watch_pid: int, idle: float = IDLE_SECONDS) -> None:
    from taskfed.flower import node  # the heavy imports: once, here

    old = os.umask(0o177)  # the socket is born 0600
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(8)
    server.settimeout(1.0)
    path.with_suffix(".pid").write_text(str(os.getpid()))
    last = time.monotonic()
    try:
        while _alive(watch_pid) and time.monotonic() - last < idle:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid != os.getuid():
                    continue  # not the node's user: no answer at all
                last = time.monotonic()
                header, content = _recv(conn)
                kind = header.get("kind")
                if kind == "ping":
                    _send(conn, {"ok": True}, RecordDict())
                    continue
                if kind == "bye":
                    _send(conn, {"ok": True}, RecordDict())
                    return
                try:
                    reply = node.handle(kind, content, header["node_config"], header["run_id"])
                except Exception as exc:  # the message failed, the worker goes on
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    _send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc} "
                                                       f"({Path(where.filename).name}:{where.lineno})"}, None)
                    continue
                _send(conn, {"ok": True}, reply)
    finally:
        server.close()
        path.unlink(missing_ok=True)
        path.with_suffix(".pid").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="taskfed's long-lived worker for one SuperNode.")
    parser.add_argument("socket", type=Path)
    parser.add_argument("--watch", type=int, required=True, help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS)
    args = parser.parse_args()
    import taskfed.flower  # noqa: F401  (telemetry off)

    serve(args.socket, args.watch, args.idle)


if __name__ == "__main__":
    main()
