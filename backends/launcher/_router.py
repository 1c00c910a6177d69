"""SGLang's own router (sglang-router 0.3.2): its command line and its process.

Why in the launcher: it is one more server process to start and always stop,
and the recipes that compare against it (``router_frontend``,
``bench_failover``, the benchmark) or print its command (``multinode_plan``)
must not each handle processes themselves.

A :class:`RouterProcess` is a :class:`~._process.ManagedProcess` (own session,
one ``killpg`` reaches everything it spawned), stopped on ``close()``,
context exit, exceptions, ``atexit`` and SIGTERM (turned into ``SystemExit``
so ``finally`` blocks run).
"""

from __future__ import annotations

import atexit
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

from backends.errors import ClusterStartError
from backends.launcher._process import ManagedProcess, log_tail

__all__ = ["LAUNCH_MODULE", "RouterPortTaken", "RouterProcess", "router_argv"]

LAUNCH_MODULE = "sglang_router.launch_router"

#: ``python -m sglang_router.launch_router`` with one optional import blocked. The
#: launcher imports its mini-lb, which tries ``sglang.srt.tracing.trace`` (inside a
#: ``try/except ImportError``) and so loads all of SGLang and torch: ~850 MB RSS and
#: ~8 s of CPU per router, for tracing that is off by default. Marking that module
#: missing leaves every routing code path the same and makes a router ~100 MB and
#: ready in ~2 s, which matters on a shared 24 GB machine (an OOM kill took down a
#: shared prefill server while three full-size routers were up).
_LIGHT_LAUNCH = ("import runpy, sys; sys.modules['sglang.srt.tracing.trace'] = None; "
                 f"runpy.run_module('{LAUNCH_MODULE}', run_name='__main__', alter_sys=True)")


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
    argv = [python, "-m", LAUNCH_MODULE, "--pd-disaggregation"]
    for url, bootstrap_port in prefill:
        argv += ["--prefill", url, str(bootstrap_port)]
    for url in decode:
        argv += ["--decode", url]
    return argv + ["--policy", policy, "--host", host, "--port", str(port),
                   "--prometheus-port", str(port + 1)]


class RouterPortTaken(ClusterStartError):
    """Another process bound the router's port between the caller's choice and the router's bind."""


class RouterProcess:
    """A running router (Rust, or its Python ``--mini-lb``); a context manager that always stops it.

    Parameters
    ----------
    argv
        ``python -m sglang_router.launch_router ...``, e.g. from :func:`router_argv`;
        run with the light launcher above (same router, no torch import).
    url
        Where it answers, e.g. ``http://127.0.0.1:30080``.
    log_path
        File for its output (the command line and the pid head it).
    """

    def __init__(self, argv: list[str], url: str, log_path: Path) -> None:
        self.argv = argv
        self.url = url
        self.log_path = Path(log_path)
        self._process: ManagedProcess | None = None
        self._previous_sigterm = None

    def start(self) -> "RouterProcess":
        """Start the process without waiting for it (its start-up is mostly imports)."""
        argv = self.argv
        if argv[1:3] == ["-m", LAUNCH_MODULE]:
            argv = [argv[0], "-c", _LIGHT_LAUNCH, *argv[3:]]
        self._process = ManagedProcess("router", argv, self.log_path).start()
        return self

    def __enter__(self) -> "RouterProcess":
        atexit.register(self.close)
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The router's pid, which is also its session id (it runs in its own session)."""
        return self._process.pid if self._process is not None else None

    def wait_ready(self, timeout: float) -> float:
        """Wait until the router routes; return the seconds waited.

        Ready means ``/readiness`` answers 200 (the Rust router: every worker
        registered) or, where that path is 404 (``--mini-lb``), ``/health``.

        Raises
        ------
        RouterPortTaken
            It exited because its port was taken meanwhile (pick another, retry).
        ClusterStartError
            It exited otherwise or is not ready in time, with the end of its log.
        """
        started = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() - started < timeout:
                if not self.running():
                    code = None if self._process is None else self._process.exit_code()
                    if "Address already in use" in self.log_tail(lines=50):
                        raise RouterPortTaken(f"{self.url} was taken while the router started")
                    raise ClusterStartError(f"the router exited with code {code}:\n{self.log_tail()}")
                if self._answers(client):
                    return time.monotonic() - started
                time.sleep(0.25)
        raise ClusterStartError(f"the router at {self.url} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _answers(self, client: httpx.Client) -> bool:
        for path in ("/readiness", "/health"):
            try:
                status = client.get(f"{self.url}{path}").status_code
            except httpx.HTTPError:
                return False
            if status != 404:
                return status == 200
        return False

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def close(self) -> None:
        """Stop the router's process group (SIGTERM, then SIGKILL). Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            process.stop(grace=10.0)
        atexit.unregister(self.close)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
