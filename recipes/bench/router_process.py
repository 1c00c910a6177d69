"""sglang-router (Rust, or its Python ``--mini-lb``) as a benchmark route, one process per run.

Why its own process per run: the Rust router's cache-aware tree lives in the
router, so a router started for one run and stopped after it starts cold like
every other route. The process itself is a :class:`backends.RouterProcess`
(own session, stopped on close, errors and Ctrl-C). Ports come from 36000 up,
skipping taken ones, since other people launch routers on this range too.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
from pathlib import Path

from backends import ROUTER_MODULE, RouterPortTaken, RouterProcess
from recipes.bench.routes import HttpRoute


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
        self._router: RouterProcess | None = None

    def launch(self) -> None:
        """Start the router process without waiting for it (routes of a group start together)."""
        port = self.ports.take()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", ROUTER_MODULE, *self.router_args, "--host", "127.0.0.1", "--port", str(port)]
        if "--mini-lb" not in self.router_args:
            # The Rust router also binds a Prometheus exporter (default port 29000): one per router.
            argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.ports.take())]
        self._router = RouterProcess(argv, self.url, self.log_path).start()

    def open(self) -> None:
        """Wait until the (launched, else launched now) router routes; relaunch when its port was taken meanwhile."""
        for _ in range(5):
            if self._router is None:
                self.launch()
            try:
                self._router.wait_ready(self.startup_timeout)
                break
            except RouterPortTaken:
                self.close()
            except Exception as exc:
                self.close()
                raise RuntimeError(f"{self.name}: {exc} (log: {self.log_path})") from exc
            except BaseException:
                self.close()
                raise
        else:
            raise RuntimeError(f"{self.name}: every port tried was taken while the router started")
        super().open()

    @property
    def sessions(self) -> set[int]:
        """The router's session (its pid), for load accounting."""
        pid = self._router.pid if self._router is not None else None
        return {pid} if pid is not None else set()

    def close(self) -> None:
        super().close()
        router, self._router = self._router, None
        if router is not None:
            router.close()
