"""sglang-router (Rust, or its Python ``--mini-lb``) as a benchmark route, one process per run.

Why its own process per run: the Rust router's cache-aware tree lives in the
router, so a router started for one run and stopped after it starts cold like
every other route. The router runs in its own session and is stopped (SIGTERM,
then SIGKILL of its whole process group) on close, errors and Ctrl-C. Ports
come from 36000 up, skipping taken ones, since other people launch routers
on this range too.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from backends._procs import stop_groups
from recipes.bench.routes import HttpRoute


#: ``python -m sglang_router.launch_router`` with one optional import blocked. The
#: launcher imports its mini-lb, which tries ``sglang.srt.tracing.trace`` (inside a
#: ``try/except ImportError``) and so loads all of SGLang and torch: ~850 MB RSS and
#: ~8 s of CPU per router, for tracing that is off by default. Marking that module
#: missing leaves every routing code path the same and makes a router ~100 MB and
#: ready in ~2 s, which matters on a shared 24 GB machine (an OOM kill took down a
#: shared prefill server while three full-size routers were up).
_LAUNCH = ("import runpy, sys; sys.modules['sglang.srt.tracing.trace'] = None; "
           "runpy.run_module('sglang_router.launch_router', run_name='__main__', alter_sys=True)")


class PortPicker:
    """Hands out free ports from ``start`` up, never the same one twice in this process.

    Routers of one group are launched together, so a port that merely looks
    free could be handed to two of them; other people launch routers on the
    same range too, which the bind test skips.
    """

    def __init__(self, start: int, span: int = 1000) -> None:
        self.start, self.span = start, span
        self._next = start
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for port in range(self._next, self.start + self.span):
                if _bindable(port):
                    self._next = port + 1
                    return port
        raise RuntimeError(f"no free port in {self.start}..{self.start + self.span - 1}; pass another --router-port")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _PortTaken(Exception):
    """Another process bound the router's port between the check and the router's own bind."""


class RouterRoute(HttpRoute):
    """sglang-router (Rust, or its Python ``--mini-lb``) launched for this route only, so it starts cold.

    Parameters
    ----------
    router_args
        Arguments after ``launch_router`` (PD mode, workers, policies);
        ``--host`` and ``--port`` are added.
    ports
        Where ports come from (shared by every router of the invocation).
    """

    kind = "router"

    def __init__(self, name: str, router_args: list[str], ports: PortPicker, log_dir: Path,
                 startup_timeout: float = 120.0) -> None:
        super().__init__(name, url="")
        self.router_args = router_args
        self.ports = ports
        self.log_path = Path(log_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the router process without waiting for it (its start-up takes ~8 s of CPU, mostly imports)."""
        port = self.ports.take()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-c", _LAUNCH, *self.router_args, "--host", "127.0.0.1", "--port", str(port)]
        if "--mini-lb" not in self.router_args:
            # The Rust router also binds a Prometheus exporter (default port 29000): one per router.
            argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.ports.take())]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write("# " + " ".join(argv) + "\n")
            log.flush()
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            log.write(f"# pid {self._proc.pid}\n")

    def open(self) -> None:
        """Wait until the (launched, else launched now) router routes; relaunch when its port was taken meanwhile."""
        for _ in range(5):
            if self._proc is None:
                self.launch()
            try:
                self._wait_ready()
                break
            except _PortTaken:
                self.close()
            except BaseException:
                self.close()
                raise
        else:
            raise RuntimeError(f"{self.name}: every port tried was taken while the router started")
        super().open()

    @property
    def sessions(self) -> set[int]:
        """The router's session (its pid: it was started with ``start_new_session``), for load accounting."""
        return {self._proc.pid} if self._proc is not None else set()

    def _wait_ready(self) -> None:
        """Rust router: ``/readiness`` 200 once every worker registered; mini-lb: ``/health``."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "Address already in use" in self.log_path.read_text(errors="replace"):
                    raise _PortTaken()
                raise RuntimeError(f"{self.name}: router exited with code {self._proc.returncode}; see {self.log_path}")
            for path in ("/readiness", "/health"):
                try:
                    answer = httpx.get(f"{self.url}{path}", timeout=2.0, trust_env=False)
                except httpx.HTTPError:
                    break
                if answer.status_code == 200:
                    return
                if answer.status_code != 404:
                    break
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: router at {self.url} not ready after {self.startup_timeout:.0f} s; "
                           f"see {self.log_path}")

    def close(self) -> None:
        super().close()
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_groups([proc], grace=10.0)
