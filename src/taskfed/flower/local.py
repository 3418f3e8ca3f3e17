"""A SuperLink and N SuperNodes on 127.0.0.1, with TLS and SuperNode authentication, for tests, benchmarks
and a first try of the Deployment Engine (docs/flower.md walks through the same steps by hand).

Every process is started in its own session and stopped by its PID (its process group: the SuperLink's
ServerApp and the SuperNodes' ClientApp children go with it), SIGTERM first, SIGKILL after a timeout.
The certificates are throwaway: a fresh CA per federation, a server certificate for 127.0.0.1/localhost.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfed.errors import TaskfedError

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- TLS and keys
def _refuse_existing(paths: list[Path], force: bool) -> None:
    """A key is an identity and a certificate is trusted by someone: never replaced without `--force`."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise TaskfedError(f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; "
                           f"refusing to overwrite (use --force to replace).")
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            raise TaskfedError(f"{p}: is a directory.")


def _check_name(name: str) -> None:
    """A key's file name inside the folder: no path separators, no `..`, nothing hidden or empty."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise TaskfedError(f"node key name '{name}': expected a plain file name (no '/', no '..', not hidden).")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TaskfedError(f"{folder}: exists and is not a folder.") from None
    except OSError as exc:
        raise TaskfedError(f"{folder}: cannot create the folder ({exc.strerror}).") from None


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), force: bool = False) -> dict[str, Path]:
    """A throwaway CA and a server certificate for `hosts`, as PEM files: ca.crt, server.pem, server.key.
    Existing files are refused unless `force`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    _refuse_existing(list(paths.values()), force)
    _make_folder(folder)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, sans: list | None = None):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("taskfed throwaway CA", ca_key, "taskfed throwaway CA", ca_key, True)
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h) for h in hosts]
    server = cert(hosts[0], server_key, "taskfed throwaway CA", ca_key, False, sans)
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (what flower-supernode and `flwr supernode register` read).
    `name` is a plain file name inside `folder`; an existing key is refused unless `force`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_name(name)
    folder = Path(folder)
    private, public = folder / name, folder / f"{name}.pub"
    _refuse_existing([private, public], force)
    _make_folder(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    # SuperExec polls for tasks (a ClientApp or ServerApp to start) once a second by default: every message
    # would wait for it. 0.05 s costs a few idle wake-ups and nothing else.
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.05", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # flwr's own children (superexec, clientapp)
    return env


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc; elsewhere none): flwr starts some children, e.g. the
    SuperLink's superexec, in sessions of their own, out of reach of a signal to the parent's group."""
    out, todo = [], [pid]
    while todo:
        try:
            kids = [int(k) for k in Path(f"/proc/{todo.pop()}/task").glob("*/children")
                    for k in k.read_text().split()]
        except (OSError, ValueError):
            continue
        out += kids
        todo += kids
    return out


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process's group (it was started in its own session) and to the groups of its
    descendants, SIGKILL to whatever is still there."""
    if proc.poll() is not None:
        return
    family = [proc.pid] + _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in family:
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        while any(_alive(p) for p in family[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)  # children of a dead parent are reaped by init, a moment later
        if not any(_alive(p) for p in family[1:]):
            return


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _workers_watching(pid: int) -> list[int]:
    """The taskfed workers (flower/worker.py) that serve the SuperNode `pid`: they run in sessions of their
    own, so a signal to the SuperNode's family misses them."""
    from taskfed.flower import worker

    out = []
    for f in worker.home().glob("*.pid"):
        try:
            w = int(f.read_text())
        except (OSError, ValueError):
            continue
        if f"--watch {pid}".encode() in _cmdline(w):
            out.append(w)
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class LocalFederation:
    """`with LocalFederation(workdir, node_configs) as fed: fed.run(app_dir, run_config)`."""

    workdir: Path
    node_configs: list[dict[str, Any]]
    auth: bool = True  # SuperNode authentication: only registered public keys may connect
    startup_timeout: float = 120.0
    env_extra: dict[str, str] = field(default_factory=dict)  # e.g. OMP_NUM_THREADS, TASKFED_CACHE for the nodes
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)  # more for one node, e.g. a TASKFED_FAULT
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)  # the running SuperNode of each index
    node_ids: dict[int, int] = field(default_factory=dict)  # Flower's node id of each index (from its key)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # a restarted node appends to its log
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(self.env, **(env or {})),
                                cwd=self.workdir, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def __enter__(self) -> "LocalFederation":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        self.env = flower_env(home, **self.env_extra)
        try:
            self.tls = make_tls(self.workdir / "tls", force=True)  # its own throwaway CA, fresh per federation
            # The CLI's connection to this SuperLink (Control API), verified against the throwaway CA.
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "{self.address}"\n'
                f'root-certificates = "{self.tls["ca"]}"\n')
            link = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile",
                    str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"]), "--host", "127.0.0.1",
                    "--port", str(self.port), "--disable-runtime-dependency-installation"]
            self.superlink = self._start("superlink", link + (["--enable-supernode-auth"] if self.auth else []))
            self._wait_port()
            self.keys = [make_node_key(self.workdir / "keys", f"node{i}", force=True)
                         for i in range(len(self.node_configs))]
            if self.auth:
                for i, (_, public) in enumerate(self.keys):
                    self.node_ids[i] = self._register(public)
            for i in range(len(self.node_configs)):
                self.start_node(i, self.node_env.get(i))
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):  # nodes first, the SuperLink last
            stop(proc)

    # ----------------------------------------------------------------- one node
    def start_node(self, i: int, env: dict[str, str] | None = None) -> subprocess.Popen:
        """SuperNode `i` with its key and node config (again, after `kill_node`: the same identity)."""
        private = self.keys[i][0]
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in self.node_configs[i].items())
        self.nodes[i] = self._start(f"supernode{i}", [
            str(BIN / "flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.tls["ca"]),
            "--auth-supernode-private-key", str(private), "--node-config", config,
            "--host", "127.0.0.1", "--port", str(free_port())], env)
        return self.nodes[i]

    def kill_node(self, i: int, graceful: bool = False) -> None:
        """SuperNode `i` and everything of it gone, its taskfed worker included. By default SIGKILL: a crash,
        no cleanup, and the SuperLink learns of it only when the node's heartbeats stop. `graceful`: SIGTERM
        first, and the SuperNode tells the SuperLink it is leaving (it can come back at once)."""
        proc = self.nodes[i]
        workers = _workers_watching(proc.pid)  # before the node is gone: they are found by the pid they watch
        family = [proc.pid] + _descendants(proc.pid)
        if graceful:
            stop(proc)
        for pid in family + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in family[1:] + workers) and time.monotonic() < deadline:
            time.sleep(0.1)

    def node_status(self, i: int) -> str:
        """The SuperLink's view of node `i`: online, offline, registered, ... ("" if it cannot tell)."""
        out = self.flwr("supernode", "list", "local-tls", "--format", "json", timeout=60)
        try:
            nodes = json.loads(out.stdout[out.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            return ""
        return next((str(n.get("status", "")) for n in nodes if str(n.get("node-id")) == str(self.node_ids.get(i))), "")

    def wait_node(self, i: int, status: str, timeout: float = 120.0) -> None:
        """Until the SuperLink reports node `i` as `status` (a killed node turns offline once it has missed
        its heartbeats: up to 2 x 30 s in flwr 1.41)."""
        deadline = time.monotonic() + timeout
        while (now := self.node_status(i)) != status:
            if time.monotonic() > deadline:
                raise TaskfedError(f"node {i} is {now or 'unknown'}, not {status}, after {timeout:g} s.")
            time.sleep(1.0)

    def restart_node(self, i: int, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        """SuperNode `i` again after `kill_node`, with its key (so its node id), once the SuperLink lets it
        back: the same key cannot be activated while the old node still counts as online."""
        self.wait_node(i, "offline", timeout)
        self.start_node(i, env)
        self.wait_node(i, "online", timeout)

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink runs (one per run in progress)."""
        return [p for p in _descendants(self.superlink.pid) if b"flwr-serverapp" in _cmdline(p)]

    def _wait_port(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise TaskfedError(f"flower-superlink exited at start (see {self.workdir / 'logs' / 'superlink.log'}).")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TaskfedError(f"flower-superlink did not listen on {self.address} within {self.startup_timeout:g} s.")

    def _register(self, public: Path) -> int:
        """The public key registered with the SuperLink: the node id it will have."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            done = self.flwr("supernode", "register", str(public), "local-tls", "--format", "json")
            if done.returncode == 0:
                return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])
            if time.monotonic() > deadline:
                raise TaskfedError(f"flwr supernode register failed: {(done.stdout + done.stderr).strip()[-300:]}")
            time.sleep(0.5)

    def run(self, app_dir: Path, run_config: dict[str, Any], done: Path, timeout: float = 600.0) -> str:
        """Submits the app (`flwr run`) and waits until `done` exists (the ServerApp's last write); the run id."""
        run_id = self.submit(app_dir, run_config)
        self.wait(run_id, done, timeout)
        return run_id

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> str:
        """`flwr run` of the app with these run-config overrides; the run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        started = self.flwr("run", str(app_dir), "local-tls", "--run-config", overrides, "--format", "json")
        try:
            reply = json.loads(started.stdout[started.stdout.index("{"):])
        except ValueError:
            reply = {}
        if started.returncode != 0 or not reply.get("success", True) or reply.get("run-id") is None:
            raise TaskfedError(f"flwr run failed: {(started.stdout + started.stderr).strip()[-500:]}")
        return str(reply["run-id"])

    def wait(self, run_id: str, done: Path, timeout: float = 600.0) -> None:
        """Until `done` exists; an error if the run ends without it or takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while not done.exists():
            status = self._status(run_id)
            if status.startswith("finished") and not done.exists():
                raise TaskfedError(f"flower run {run_id} ended as {status} without writing {done} "
                                   f"(logs: flwr log {run_id}, {self.workdir / 'logs'}).")
            if time.monotonic() > deadline:
                raise TaskfedError(f"flower run {run_id} did not finish within {timeout:g} s (status {status}).")
            time.sleep(1.0)

    def _status(self, run_id: str) -> str:
        out = self.flwr("ls", "local-tls", "--run-id", run_id, "--format", "json", timeout=60)
        try:
            runs = json.loads(out.stdout[out.stdout.index("{"):]).get("runs", [])
            return str(runs[0].get("status", "")) if runs else ""
        except (ValueError, IndexError):
            return ""
