"""SGLang's own router (sglang-router 0.3.2) in PD mode: its command line and its process.

Why here: ``router_frontend`` runs it and ``multinode_plan`` prints its command;
both build that command with :func:`router_argv`. :class:`RouterProcess` owns
the running router: it starts in its own session so that one ``killpg``
reaches everything it spawned, and it is stopped on ``close()``, context exit,
exceptions, ``atexit`` and SIGTERM (turned into ``SystemExit`` so ``finally``
blocks run).
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

from backends._procs import stop_groups


def router_argv(prefill: Sequence[tuple[str, int]], decode: Sequence[str], *, host: str, port: int,
                policy: str = "cache_aware", python: str = sys.executable) -> list[str]:
    """``python -m sglang_router.launch_router --pd-disaggregation ...`` for these servers.

    Parameters
    ----------
    prefill
        ``(url, bootstrap_port)`` per prefill server.
    decode
        Decode server URLs.
    host, port
        Where the router listens; its Prometheus exporter takes ``port + 1``
        (its default, 29000, would collide between two routers on one host).
    """
    argv = [python, "-m", "sglang_router.launch_router", "--pd-disaggregation"]
    for url, bootstrap_port in prefill:
        argv += ["--prefill", url, str(bootstrap_port)]
    for url in decode:
        argv += ["--decode", url]
    return argv + ["--policy", policy, "--host", host, "--port", str(port),
                   "--prometheus-port", str(port + 1)]


class RouterProcess:
    """A running router; a context manager that always stops it.

    Parameters
    ----------
    argv
        From :func:`router_argv`.
    url
        Where it answers, e.g. ``http://127.0.0.1:30080``.
    log_path
        File for its output.
    """

    def __init__(self, argv: list[str], url: str, log_path: Path) -> None:
        self.argv = argv
        self.url = url
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        self._previous_sigterm = None

    def __enter__(self) -> "RouterProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> float:
        """Wait until ``/readiness`` answers 200 (every worker registered); return the seconds waited.

        Raises
        ------
        RuntimeError
            The router exited or is not ready in time, with the end of its log.
        """
        started = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() - started < timeout:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"the router exited with code {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readiness").status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"the router at {self.url} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the router's process group (SIGTERM, then SIGKILL). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_groups([proc], grace=10.0)
        atexit.unregister(self.close)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
