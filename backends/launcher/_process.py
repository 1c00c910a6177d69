"""Process-group, port and health helpers for :mod:`backends.launcher._cluster`.

Why separate: these are small OS-level mechanisms (is a port free, is any
process of a group still alive, stop groups with a deadline, read a log
tail) with no knowledge of PD; keeping them out of ``cluster.py`` leaves that
module about the cluster's life cycle only.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["ManagedProcess", "stop_all", "port_in_use", "require_free_ports", "wait_ports_free", "stop_groups", "log_tail"]

_POLL = 0.2


class ManagedProcess:
    """One command in its own session, output to ``log_path``; a context manager that always stops it.

    Parameters
    ----------
    name
        Label for messages (``prefill-0``, ``router``).
    argv, env
        The command and the variables added to this process's environment.
    log_path
        Its log; each start appends ``# NAME ARGV`` and ``# pid N`` before the output.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, list(argv), dict(env or {})
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None

    def start(self, append: bool = False) -> "ManagedProcess":
        """Start it without waiting; ``append`` keeps the earlier log (a restart)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a" if append else "w", encoding="utf-8") as log:
            log.write(f"# sgl-pd: {self.name} {' '.join(self.argv)}\n")
            log.flush()
            self._proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.write(f"# pid {self._proc.pid}\n")  # lets tests and people find the process afterwards
        return self

    @property
    def pid(self) -> int | None:
        """Its pid, which is also its process group id; ``None`` before start."""
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        """The exit code once the main process has exited, else ``None`` (also before start)."""
        return None if self._proc is None else self._proc.poll()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to its whole process group (fault injection: SIGSTOP, SIGKILL, ...)."""
        if self._proc is not None:
            _signal_group(self._proc.pid, sig)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM its group, SIGKILL after ``grace`` seconds; idempotent.

        Raises
        ------
        RuntimeError
            Processes survived SIGKILL for 10 s (stuck in the kernel).
        """
        stop_all([self], grace)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> "ManagedProcess":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(processes: list[ManagedProcess], grace: float) -> None:
    """Stop several processes at once (their grace periods overlap); see :meth:`ManagedProcess.stop`."""
    procs = []
    for managed in processes:
        proc, managed._proc = managed._proc, None
        if proc is not None:
            procs.append(proc)
    if procs:
        stop_groups(procs, grace)


def port_in_use(port: int) -> bool:
    """Whether something listens on ``port`` (any interface, IPv4).

    Binds the wildcard address with ``SO_REUSEADDR`` as uvicorn does: sockets
    in TIME_WAIT do not count, a listener on any address does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def require_free_ports(spec, error: type[Exception]) -> None:
    """Raise ``error`` naming the first port of ``spec`` that is taken."""
    for port in spec.ports:
        if port_in_use(port):
            raise error(
                f"Port {port} needed by {spec.role} server {spec.index} ({spec.url}) is "
                f"already in use. Stop what holds it (e.g. `ss -ltnp | grep :{port}`) "
                f"or choose another base_port."
            )


def wait_ports_free(spec, timeout: float, error: type[Exception]) -> None:
    """Wait up to ``timeout`` s for the ports of ``spec`` to be released."""
    deadline = time.monotonic() + timeout
    while any(port_in_use(p) for p in spec.ports) and time.monotonic() < deadline:
        time.sleep(_POLL)
    require_free_ports(spec, error)


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process belongs to process group ``pgid``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_groups(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.Popen]:
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        for proc in alive:
            proc.poll()  # reap the group leader so it does not linger as a zombie
        alive = [p for p in alive if group_alive(p.pid)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    return alive


def stop_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each leader's group; SIGKILL what is left after ``grace`` seconds.

    Each process was started with ``start_new_session=True``, so its pid is
    its group id and the group holds every process the server spawned.
    """
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a frozen (SIGSTOPped) group acts on SIGTERM only once resumed
    left = _wait_groups(procs, grace)
    for proc in left:
        _signal_group(proc.pid, signal.SIGKILL)
    left = _wait_groups(left, 10.0)
    for proc in procs:
        wait_quietly(proc, 1.0)
    if left:
        raise RuntimeError(
            f"Process groups {[p.pid for p in left]} survived SIGKILL for 10 s; check "
            f"`ps -eo pid,pgid,stat,args` for processes stuck in the kernel (state D)."
        )


def wait_quietly(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for ``proc`` to exit, at most ``timeout`` s, without raising."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def is_healthy(client: httpx.Client, url: str) -> bool:
    """``GET {url}/health`` answered 200 (it runs a 1-token generation)."""
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int, max_line: int = 400) -> str:
    """The last ``lines`` lines of a log, each cut to ``max_line`` characters."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(t if len(t) <= max_line else t[:max_line] + " ..." for t in tail)
