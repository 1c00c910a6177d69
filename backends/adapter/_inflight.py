"""Requests in flight through one client: the load routing sees, and the legs an abort reaches.

One registry for both, so they cannot disagree: a request is counted as load
on its route's servers from routing until it finishes (its prefill is when
other requests' routing most needs to see it), its uncached prompt tokens as
queued prefill work on its cache holder until its prefill is done, and each
leg is listed by server and request id while it is on the wire, under the
program that sent it, so ``end_program`` can abort what a finished program
left behind.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

from backends.adapter._route import Route

__all__ = ["InFlight", "Track"]

#: ``track(server, rids, started)``: a leg went on the wire (``started``) or came back.
Track = Callable[[str, list[str], bool], None]


class InFlight:
    """Thread-safe counts of requests per server and the legs of each program."""

    def __init__(self) -> None:
        self._loads: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()  # uncached prompt tokens not yet prefilled
        self._pending: Counter[str] = Counter()  # requests not yet prefilled
        self._legs: dict[str | None, set[tuple[str, str]]] = defaultdict(set)
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, route: Route) -> Iterator[Callable[[], None]]:
        """Count ``route``'s servers (and prefill DP rank) as loaded while the block runs.

        Yields ``prefilled()``: call it when the prefill is done, to stop
        counting the route's uncached tokens as queued prefill work earlier
        than the block's end (a PD request decodes long after). Idempotent.
        """
        queued = {name: route.uncached_tokens for name in {route.cache_holder, (route.prefill or route.colocated).url}}
        released = False

        def prefilled() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._queued.subtract(queued)
                    self._pending.subtract(queued.keys())

        with self._lock:
            self._loads.update(route.counted)
            self._queued.update(queued)
            self._pending.update(queued.keys())
        try:
            yield prefilled
        finally:
            prefilled()
            with self._lock:
                self._loads.subtract(route.counted)

    def tracker(self, program: str | None) -> Track:
        """The callback the dispatcher reports legs to, filed under ``program`` (``None``: no program)."""

        def track(server: str, rids: list[str], started: bool) -> None:
            with self._lock:
                legs = self._legs[program]
                for rid in rids:
                    (legs.add if started else legs.discard)((server, rid))
                if not legs:
                    self._legs.pop(program, None)

        return track

    def take_legs(self, program: str) -> list[tuple[str, str]]:
        """Forget and return the ``(server, rid)`` legs of ``program`` still on the wire."""
        with self._lock:
            return sorted(self._legs.pop(program, set()))

    def loads(self, names: tuple[str, ...] | list[str] | None = None) -> dict[str, int]:
        """Requests in flight per server (or DP rank ``URL#dpR``); all loaded ones, or exactly ``names``."""
        with self._lock:
            if names is None:
                return {name: n for name, n in self._loads.items() if n}
            return {name: self._loads[name] for name in names}

    def prefill_queue(self, names: tuple[str, ...] | list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """This client's requests not yet prefilled, and their uncached prompt tokens, per server (or DP rank)."""
        with self._lock:
            return {name: self._pending[name] for name in names}, {name: self._queued[name] for name in names}
