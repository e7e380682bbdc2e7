"""Real services for the integration tests, on 127.0.0.1: PostgreSQL, an MLflow server, Ray nodes.

Each is a context manager that stops exactly what it started (by PID or process group), even when the test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _pg_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    bindir = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
    return bindir if (bindir / "initdb").exists() else None


def postgres_available() -> bool:
    return _pg_bindir() is not None


@contextmanager
def postgres(databases: tuple[str, ...] = ("mlflow", "optuna")) -> Iterator[str]:
    """A private PostgreSQL cluster (initdb + pg_ctl) on 127.0.0.1; yields 'postgresql://agch@127.0.0.1:PORT'.

    Its files live in a fresh directory under /tmp (reachable by the postgres user when we are root, since initdb
    refuses to run as root), removed afterwards.
    """
    bindir = _pg_bindir()
    assert bindir is not None, "PostgreSQL server binaries not found (pg_config --bindir)"
    tmp = Path(tempfile.mkdtemp(prefix="agch-pg-"))
    data, sock = tmp / "pgdata", tmp / "pgsock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        for path in (tmp, sock):
            shutil.chown(path, "postgres")
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "agch", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(tmp / "pg.log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        for name in databases:
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "agch", name],
                           check=True, capture_output=True)
        yield f"postgresql://agch@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


class Process:
    """A server started in its own process group, stopped by signalling that group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log_path = args, log
        self.node_id: str | None = None
        """set for a Ray node (start_ray_worker)."""
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}; log: {self.log_path}")
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the process group, wait; then SIGKILL whatever is left of the session it started.

        A Ray node puts its worker processes in process groups of their own (same session), so SIGKILL as a
        simulated machine loss goes to the whole session at once: a node's trials die with it.
        """
        if self.proc.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    self._kill_session()
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._kill_session()
        self.log.close()

    def _kill_session(self) -> None:
        for pid in session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _process_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/PID/stat after the command (state, ppid, pgrp, session, ...) of every process."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes in session `sid` (Linux /proc)."""
    return [pid for pid, fields in _process_stats().items() if int(fields[3]) == sid and fields[0] != "Z"]


def children(parents: set[int]) -> dict[int, str]:
    """pid -> the first word of the command line of each process whose parent is in `parents` (Linux /proc)."""
    found = {}
    for pid, fields in _process_stats().items():
        if int(fields[1]) in parents:
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
            except OSError:
                continue
    return found


def start_mlflow(backend_uri: str, artifacts: Path, log: Path, port: int | None = None) -> tuple[Process, str]:
    """`mlflow server --app-name agch` (as docker-compose.yml runs it) with one worker; returns the process and its
    http URI once /health answers."""
    port = port or free_port()
    proc = Process([str(VENV_BIN / "mlflow"), "server", "--app-name", "agch", "--backend-store-uri", backend_uri,
                    "--serve-artifacts",
                    "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost"],
                   log, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(lambda: proc.alive() and healthy(), 90, f"MLflow server on {uri} (log: {log})")
    return proc, uri


# Token auth on, as in docker-compose.yml; every process of the cluster (and the driver) gets the same token.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray_head(log: Path, num_cpus: int = 2) -> tuple[Process, str]:
    """A Ray head node (`ray start --head --block`); returns the process and its address."""
    port = free_port()
    proc = Process([str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                    "--num-gpus=0", "--include-dashboard=false", "--node-ip-address=127.0.0.1"], log, env=RAY_ENV)
    address = f"127.0.0.1:{port}"
    wait_for(lambda: proc.alive() and len(alive_nodes(address)) >= 1, 120, f"Ray head (log: {log})")
    return proc, address


def start_ray_worker(address: str, log: Path, num_cpus: int = 2) -> Process:
    """A Ray node joining `address`; returns once the cluster lists it alive, with its id as `.node_id`."""
    before = alive_nodes(address)
    proc = Process([str(VENV_BIN / "ray"), "start", "--block", f"--address={address}", f"--num-cpus={num_cpus}",
                    "--num-gpus=0", "--node-ip-address=127.0.0.1"], log, env=RAY_ENV)
    new: set[str] = set()

    def joined() -> bool:
        new.update(alive_nodes(address) - before)
        return proc.alive() and bool(new)

    wait_for(joined, 120, f"Ray worker node (log: {log})")
    proc.node_id = new.pop()
    return proc


def alive_nodes(address: str) -> set[str]:
    """Ids of the cluster's alive nodes, asked from a separate process so this one never joins Ray."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))")
    done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **RAY_ENV})
    lines = done.stdout.strip().splitlines()
    return set(lines[-1].split()) if done.returncode == 0 and lines else set()
