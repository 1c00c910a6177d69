"""Which servers are in rotation: passive failure counting plus active probes.

A server leaves rotation when a request finds it unreachable (one connection
failure is proof enough) or after ``failure_threshold`` consecutive server
errors (the circuit breaker opens). While out, a background thread probes its
``/health``: an unreachable server every ``probe_interval`` seconds, a server
whose breaker opened only after ``breaker_cooldown`` (it may answer health
checks while failing real requests). The first successful probe brings it
back. The probe is SGLang's own 1-token generation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from backends.adapter._transport import Timeouts, Transport
from backends.errors import PDError

__all__ = ["ServerHealth", "HealthTracker", "answers_health", "refuses_connections"]

logger = logging.getLogger(__name__)


@dataclass
class ServerHealth:
    """Rotation state of one server."""

    healthy: bool = True
    consecutive_failures: int = 0
    last_error: str = ""
    out_since: float | None = None
    probe_at: float = 0.0


class HealthTracker:
    """Thread-safe rotation state for every server of the adapter.

    Parameters
    ----------
    servers
        URLs to track.
    probe
        ``probe(url) -> bool``: one health check with its own short timeout.
    failure_threshold
        Consecutive server errors (5xx, timeouts) that take a server out.
    probe_interval
        Seconds between probes of a server that is out of rotation.
    breaker_cooldown
        Seconds a server stays out after its breaker opened before the first probe.
    on_recover
        Called with the URL when a server comes back (e.g. to forget its
        prefix record: a restarted server has an empty cache).
    """

    def __init__(
        self,
        servers: list[str],
        probe: Callable[[str], bool],
        *,
        failure_threshold: int = 3,
        probe_interval: float = 1.0,
        breaker_cooldown: float = 10.0,
        on_recover: Callable[[str], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or probe_interval <= 0 or breaker_cooldown < 0:
            raise ValueError("need failure_threshold >= 1, probe_interval > 0 and breaker_cooldown >= 0")
        self._state = {url: ServerHealth() for url in servers}
        self._probe = probe
        self._threshold = failure_threshold
        self._interval = probe_interval
        self._cooldown = breaker_cooldown
        self._on_recover = on_recover
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def available(self, servers: list[str] | tuple[str, ...]) -> list[str]:
        with self._lock:
            return [url for url in servers if self._state[url].healthy]

    def snapshot(self) -> dict[str, ServerHealth]:
        with self._lock:
            return {url: ServerHealth(**vars(state)) for url, state in self._state.items()}

    def record_success(self, url: str) -> None:
        with self._lock:
            if url in self._state:
                self._state[url].consecutive_failures = 0

    def record_failure(self, url: str, error: str, *, unreachable: bool = False) -> None:
        """Count a failure; take the server out if it is unreachable or over the threshold.

        A URL this tracker does not know (not one of its servers) is logged and ignored.
        """
        with self._lock:
            state = self._state.get(url)
            if state is None:
                logger.warning("failure of unknown server %s not counted: %s", url, error)
                return
            state.consecutive_failures += 1
            state.last_error = error
            if state.healthy and (unreachable or state.consecutive_failures >= self._threshold):
                state.healthy = False
                state.out_since = time.monotonic()
                state.probe_at = state.out_since + (self._interval if unreachable else self._cooldown)
                logger.warning("taking %s out of rotation: %s", url, error)
                self._ensure_prober()

    def forgive(self, url: str, error: str) -> None:
        """Take back one failure counted for ``error``: it proved to be the request's own, not the server's."""
        with self._lock:
            state = self._state.get(url)
            if state is None or state.consecutive_failures == 0:
                return
            state.consecutive_failures -= 1
            if not state.healthy and state.last_error == error and state.consecutive_failures < self._threshold:
                state.healthy = True
                logger.info("%s back in rotation: the failure that took it out was a request's own", url)

    def _ensure_prober(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="pd-health-prober", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [url for url, state in self._state.items() if not state.healthy and state.probe_at <= now]
            for url in due:
                if self._stop.is_set():
                    return
                if self._probe_safely(url):
                    self._restore(url)
                else:
                    with self._lock:
                        self._state[url].probe_at = time.monotonic() + self._interval
            self._stop.wait(min(self._interval, 0.5))

    def _probe_safely(self, url: str) -> bool:
        """One probe; an unexpected error counts as a failed probe instead of ending the prober.

        A dead prober would keep every server that is out of rotation out for good.
        """
        try:
            return bool(self._probe(url))
        except Exception:  # noqa: BLE001 - logged, and the probe is retried
            logger.exception("health probe of %s raised; trying again in %.1f s", url, self._interval)
            return False

    def _restore(self, url: str) -> None:
        with self._lock:
            state = self._state[url]
            if state.healthy:
                return
            state.healthy = True
            state.consecutive_failures = 0
            state.out_since = None
        logger.warning("%s passed its health check; back in rotation", url)
        if self._on_recover is not None:
            try:
                self._on_recover(url)
            except Exception:  # noqa: BLE001 - the server is back either way
                logger.exception("on_recover(%s) raised", url)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def refuses_connections(transport: Transport, url: str, within: float = 2.0) -> bool:
    """Whether ``url`` refuses connections within ``within`` seconds (its process is gone).

    Asked right after a connection to it broke: a server that answers
    ``/health`` is alive (a stale keep-alive broke), one that refuses died;
    one that does neither is slow or frozen, not dead.
    """
    deadline, probe = time.monotonic() + within, Timeouts(connect=0.5, first_byte=1.0, total=1.0)
    while time.monotonic() < deadline:
        try:
            transport.request("GET", f"{url}/health", timeouts=probe)
            return False
        except PDError as exc:
            if exc.unreachable:
                return True
        time.sleep(0.1)
    return False


def answers_health(transport: Transport, url: str) -> bool:
    """Whether ``url`` answers ``/health`` with success: the probe that brings a server back."""
    try:
        return transport.request("GET", f"{url}/health", timeouts=Timeouts(connect=1.0, first_byte=5.0, total=10.0)).ok
    except PDError:
        return False
