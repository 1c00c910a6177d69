"""Abort a leg again until it has answered: closes the race of an abort that arrives first.

Why: when one leg of a pair fails, the other is aborted at once with
``/abort_request``. But the surviving leg may still be on its way (queued on a
pool thread, or in the server's tokenizer): SGLang ignores an abort for a
request id it has not seen yet, and the leg then waits alone for a partner
that never comes, holding a slot until SGLang's 300 s bootstrap timeout (found
in CI: two such prefill legs kept a server "not idle", so ``flush_cache``
failed). The :class:`AbortFollowUp` thread re-sends the abort with a growing
pause until the leg answers or its deadline passes; a leg that already answered
costs nothing.

One daemon thread per dispatcher, whatever the number of aborts: a failure
storm grows a heap, not the thread count.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["AbortFollowUp"]

SendAbort = Callable[[str, list[str]], None]


@dataclass(order=True)
class _Watch:
    due: float
    seq: int
    server: str = field(compare=False)
    rids: list[str] = field(compare=False)
    settled: threading.Event = field(compare=False)
    deadline: float = field(compare=False)
    pause: float = field(compare=False)


class AbortFollowUp:
    """Re-sends aborts for legs that have not answered yet.

    Parameters
    ----------
    send_abort
        ``send_abort(server, rids)``; must not raise (the server may be dead).
    first_pause, max_pause
        Seconds before the first re-send, doubling up to ``max_pause``. SGLang
        answers an aborted request in ~10 ms, so a leg still silent after
        ``first_pause`` most likely missed the abort.
    """

    def __init__(self, send_abort: SendAbort, first_pause: float = 0.2, max_pause: float = 2.0) -> None:
        self._send_abort = send_abort
        self.first_pause, self.max_pause = first_pause, max_pause
        self._heap: list[_Watch] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pd-abort-follow-up", daemon=True)
        self._thread.start()

    def watch(self, server: str, rids: list[str], settled: threading.Event, deadline: float) -> None:
        """Abort ``rids`` on ``server`` again until ``settled`` is set or ``deadline`` (monotonic) passes.

        The caller has sent the first abort itself; past ``deadline`` the leg's
        own timeout closes its connection, which SGLang also treats as an abort.
        """
        if settled.is_set():
            return
        with self._wake:
            if self._closed:
                return
            due = time.monotonic() + self.first_pause
            heapq.heappush(self._heap, _Watch(due, next(self._seq), server, list(rids), settled, deadline,
                                              self.first_pause))
            self._wake.notify()

    def pending(self) -> int:
        """Legs still being watched."""
        with self._wake:
            return len(self._heap)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._heap.clear()
            self._wake.notify()
        self._thread.join(timeout=5.0)

    def _next_due(self) -> _Watch | None:
        """Block until a watch is due (None once closed); drop the settled and expired ones."""
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0].settled.is_set() or self._heap[0].deadline <= now):
                    heapq.heappop(self._heap)
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap)
                self._wake.wait(self._heap[0].due - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (watch := self._next_due()) is not None:
            if watch.settled.is_set():
                continue
            self._send_abort(watch.server, watch.rids)
            watch.pause = min(2 * watch.pause, self.max_pause)
            watch.due = time.monotonic() + watch.pause
            with self._wake:
                if not self._closed:
                    heapq.heappush(self._heap, watch)
