"""Watch the servers of a :class:`~backends.launcher._cluster.PDCluster` and restart the ones that die.

Why: a PD cluster should survive one server crashing (a poison request, the
OOM killer) or going silently useless (SGLang 0.5.23's mooncake transfer
thread dies on a race and the server then hangs every PD request while
``/health`` still passes). Without a watchdog one such event costs the whole
deployment, or every later request waits out a timeout.

How: ONE daemon thread per cluster polls, every ``poll_interval`` seconds,
each server's exit code and the bytes its log gained since the last poll.
An exit, or the line SGLang writes when the transfer thread dies, makes it
restart that server through the cluster's own restart path (stop its group,
wait for its ports, relaunch it with the same flags and the log appended,
wait until healthy). Attempts are bounded per server within a time window
and spaced by exponential backoff, so a server that dies on start-up does
not spin; when they are exhausted the server stays down (the others keep
serving) and :meth:`PDCluster.restart` is the way back. Restarts run one at
a time on that thread: two servers that die together come back one after
the other.

Who may touch a server when: :class:`Gate`, shared by the cluster and the
thread. ``restart()`` and ``kill()`` hold a server's lock while they act, and
the thread holds it from its last check to the end of its restart, so a user
restart or kill never interleaves with a supervised one. ``kill()`` marks the
server *held* (down on purpose) before it signals, so the thread never
mistakes a fault injection for a crash. Besides the gate the thread uses only
the cluster's public methods, so tests drive it with a stand-in cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["Gate", "RestartEvent", "Supervisor", "TRANSFER_THREAD_DEAD"]

logger = logging.getLogger(__name__)

#: What SGLang 0.5.23 logs when the mooncake transfer thread dies; the server stays "healthy" but useless.
TRANSFER_THREAD_DEAD = "Transfer thread failed because of"
#: ``ManagedProcess.start`` writes this at the head of every (re)start; text before it is an older process's.
_START_HEADER = b"# sgl-pd: "
_MAX_READ = 8 * 1024 * 1024
_SKIPPED = object()


class Gate:
    """What a cluster's callers and its supervisor thread agree on, per server.

    Attributes
    ----------
    closing : threading.Event
        Set while the cluster stops: no launch, no restart.
    held : set of str
        Servers down on purpose (``kill()``, a failed ``restart()``, restarts
        exhausted); the supervisor leaves them alone until ``restart()``.
    """

    def __init__(self, names: list[str]) -> None:
        self.closing = threading.Event()
        self.held: set[str] = set()
        # Re-entrant: the supervisor holds it while it calls the cluster's restart(), which takes it too.
        self._locks = {name: threading.RLock() for name in names}

    def lock(self, name: str) -> threading.RLock:
        """The lock ``restart()``, ``kill()`` and the supervisor hold while they act on ``name``."""
        return self._locks[name]

    def is_held(self, name: str) -> bool:
        return self.closing.is_set() or name in self.held

    def reset(self) -> None:
        self.held.clear()
        self.closing.clear()


@dataclass(frozen=True)
class RestartEvent:
    """One restart attempt, or the end of attempts, for one server.

    Attributes
    ----------
    server : str
        Its name (``"prefill-0"``).
    reason : str
        ``"exited with code N"``, ``"transfer thread died"`` or ``"not running"``.
    time : float
        When the failure was noticed (``time.time()``).
    attempt : int
        1-based number of this attempt within the window; for ``"gave up"``,
        the attempts already made.
    outcome : str
        ``"restarted"``, ``"failed"`` (the attempt did not get healthy) or
        ``"gave up"`` (attempts exhausted: it stays down until ``restart()``).
    seconds_to_healthy : float or None
        From noticing the failure to healthy again (backoff included).
    detail : str
        Why an attempt failed or why attempts ended; empty otherwise.
    """

    server: str
    reason: str
    time: float
    attempt: int
    outcome: str
    seconds_to_healthy: float | None = None
    detail: str = ""

    def __str__(self) -> str:
        back = self.seconds_to_healthy
        healthy = f", healthy again after {back:.1f} s" if back is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.server} {self.reason}: attempt {self.attempt} {self.outcome}{healthy}{detail}"


class Supervisor:
    """The watchdog thread of one cluster.

    Parameters
    ----------
    cluster
        Its ``servers``, ``log_path(spec)``, ``pid(role, index)``, ``exited()``
        and ``restart(role, index)`` (which raises when the server does not
        come back, and then holds it) are all the supervisor uses.
    gate : Gate
        Shared with the cluster.
    max_restarts : int
        Attempts per server within ``window`` seconds before giving up.
    backoff : float
        Seconds before the first attempt; doubles with each attempt in the window.
    window : float
        Seconds after which an attempt no longer counts against ``max_restarts``.
    poll_interval : float
        Seconds between two looks at every server.
    """

    def __init__(self, cluster, gate: Gate, max_restarts: int = 3, backoff: float = 1.0,
                 window: float = 600.0, poll_interval: float = 0.5) -> None:
        self._cluster, self._gate = cluster, gate
        self.max_restarts, self.backoff, self.window = max_restarts, backoff, window
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._events: list[RestartEvent] = []
        self._attempts: dict[str, deque[float]] = {}
        self._offsets: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="sgl-pd-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """End the thread and wait up to ``timeout`` s; set ``gate.closing`` first to cut a restart short."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the supervisor thread did not end within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def events(self) -> list[RestartEvent]:
        with self._lock:
            return list(self._events)

    # ----- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            for spec in self._cluster.servers:
                if self._stop.is_set():
                    return
                try:
                    failure = self._check(spec)
                    if failure is not None:
                        self._recover(spec, *failure)
                except Exception:  # a bug or an OS hiccup must not end the watch of every other server
                    logger.exception("supervisor: checking %s failed", spec.name)

    def _check(self, spec) -> tuple[int | None, str] | None:
        """``(pid, reason)`` when ``spec`` needs a restart, else ``None``."""
        lock = self._gate.lock(spec.name)
        if not lock.acquire(blocking=False):
            return None  # a restart() or kill() is at it: look again next round
        try:
            fresh = self._new_log_text(spec)
            if self._gate.is_held(spec.name):
                return None
            pid, code = self._cluster.pid(spec.role, spec.index), self._cluster.exited().get(spec.name)
        finally:
            lock.release()
        if pid is None:
            return None, "not running"
        if code is not None:
            return pid, f"exited with code {code}"
        if TRANSFER_THREAD_DEAD.encode() in fresh:
            return pid, "transfer thread died"
        return None

    def _new_log_text(self, spec) -> bytes:
        """The log's bytes since the last call, up to the last full line, from the current process only."""
        try:
            with open(self._cluster.log_path(spec), "rb") as log:
                log.seek(self._offsets.get(spec.name, 0))
                chunk = log.read(_MAX_READ)
        except OSError:
            return b""
        end = chunk.rfind(b"\n") + 1 if len(chunk) < _MAX_READ else len(chunk)  # a half-written line waits
        self._offsets[spec.name] = self._offsets.get(spec.name, 0) + end
        chunk = chunk[:end]
        # A restart by anyone appends a header; what came before it is the old process's.
        return chunk[max(chunk.rfind(_START_HEADER), 0):]

    def _recover(self, spec, pid: int | None, reason: str) -> None:
        noticed, noticed_wall = time.monotonic(), time.time()
        recent = self._attempts.setdefault(spec.name, deque())
        while not self._stop.is_set():
            while recent and time.monotonic() - recent[0] > self.window:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                if self._attempt(spec, pid, give_up=True) is None:
                    self._record(RestartEvent(spec.name, reason, noticed_wall, len(recent), "gave up", None,
                                              f"{len(recent)} attempts within {self.window:.0f} s; "
                                              "left down until restart()"))
                return
            attempt = len(recent) + 1
            delay = self.backoff * 2 ** (attempt - 1)
            logger.warning("%s %s; restarting it in %.0f s (attempt %d of %d)",
                           spec.name, reason, delay, attempt, self.max_restarts)
            if self._stop.wait(delay):
                return
            error = self._attempt(spec, pid)
            if error is _SKIPPED or self._stop.is_set() or self._gate.closing.is_set():
                return  # restarted, killed or stopped by someone else meanwhile
            recent.append(time.monotonic())
            if error is None:
                self._record(RestartEvent(spec.name, reason, noticed_wall, attempt, "restarted",
                                          round(time.monotonic() - noticed, 2)))
                return
            self._record(RestartEvent(spec.name, reason, noticed_wall, attempt, "failed", None, error))
            pid = None  # a failed restart() leaves the server stopped; the next attempt starts from there

    def _attempt(self, spec, pid: int | None, give_up: bool = False) -> str | object | None:
        """Restart (or hold) ``spec`` if it is still the process seen failing.

        Returns ``None`` when done, the first line of the error when the
        restart failed, ``_SKIPPED`` when someone else acted on it meanwhile.
        Never waits for the lock: a caller may hold it while it stops the
        cluster and waits for this thread.
        """
        lock = self._gate.lock(spec.name)
        if not lock.acquire(blocking=False):
            return _SKIPPED  # a caller's restart() or kill() is at it: theirs now
        try:
            if self._gate.is_held(spec.name) or self._cluster.pid(spec.role, spec.index) != pid:
                return _SKIPPED
            if give_up:
                self._gate.held.add(spec.name)
                return None
            try:
                self._cluster.restart(spec.role, spec.index)
            except Exception as exc:
                self._gate.held.discard(spec.name)  # restart() holds a server it failed to bring back; we retry
                text = str(exc).strip()
                return text.splitlines()[0] if text else type(exc).__name__
            return None
        finally:
            lock.release()

    def _record(self, event: RestartEvent) -> None:
        with self._lock:
            self._events.append(event)
        logger.warning("supervisor: %s", event)
