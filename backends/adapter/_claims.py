"""Claims: prompts just routed to a radix cache, counted as cached there before its events say so.

A PD prefill server announces a prompt's blocks only after its KV transfer, so
for a while after routing the servers' events do not show what the router
already knows: requests sharing the prompt's prefix should follow it. A claim
covers its whole prompt's chunk keys (as :mod:`._token_index` computes them)
for ``ttl_s``, or until the events confirm its last key.

Until its request is prefilled a claim is *pending*: its prefix is being
computed, not yet reusable; a request sharing it and batched with it computes
it again. A key claimed twice stays with the first claim, so a follower finds
the request computing its prefix (its *leader*), not another follower. Each
key's presence implies its whole prefix was claimed (keys are chained), so
whatever the overlay loses, a match never counts tokens nobody claimed.
"""

from __future__ import annotations

import heapq
import threading
from itertools import count

__all__ = ["Claim", "ClaimOverlay"]


class Claim:
    """One prompt routed to ``holder``: its keys count as cached there until ``expires``.

    ``ready`` once its prefill ended; ``done`` is set then, or when the claim is
    dropped, releasing the requests waiting to reuse its prefix.
    """

    __slots__ = ("holder", "keys", "expires", "ready", "done")

    def __init__(self, holder: str, keys: list[int], expires: float):
        self.holder, self.keys, self.expires, self.ready, self.done = holder, keys, expires, False, threading.Event()


class ClaimOverlay:
    """The live claims per key and holder, bounded in keys. Not thread-safe: its owner locks.

    Parameters
    ----------
    max_keys
        Claimed keys kept overall; the claims closest to expiry go first.
    """

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.by_key: dict[int, dict[str, Claim]] = {}  # key -> {holder: first live claim of it}
        self._heap: list[tuple[float, int, Claim]] = []  # by expiry; dropped claims stay until then
        self._keys, self._tie = 0, count()

    def add(self, holder: str, keys: list[int], expires: float) -> Claim:
        claim, by_key = Claim(holder, keys, expires), self.by_key
        for key in keys:  # a key already claimed stays with the claim computing it
            d = by_key.get(key)
            if d is None:
                by_key[key] = {holder: claim}
            elif holder not in d:
                d[holder] = claim
        heapq.heappush(self._heap, (expires, next(self._tie), claim))
        self._keys += len(keys)
        while self._keys > self.max_keys and self._heap:
            self.drop(heapq.heappop(self._heap)[2])
        return claim

    def confirmed(self, holder: str, key: int) -> None:
        """Events now hold ``key`` on ``holder``: the claim ending there is no longer needed."""
        claim = self.by_key.get(key, {}).get(holder) if self.by_key else None
        if claim is not None and claim.keys[-1] == key:
            self.drop(claim)

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            self.drop(heapq.heappop(heap)[2])

    def forget(self, holder: str) -> None:
        for _, _, claim in self._heap:
            if claim.holder == holder:
                self.drop(claim)

    def live(self, holder: str) -> int:
        return sum(1 for _, _, c in self._heap if c.holder == holder and c.expires is not None)

    def drop(self, claim: Claim) -> None:
        """Remove a claim's keys and release its waiters; its heap entry stays until its expiry time."""
        claim.done.set()
        if claim.expires is None:
            return
        claim.expires = None
        self._keys -= len(claim.keys)
        by_key = self.by_key
        for key in claim.keys:
            d = by_key.get(key)
            if d is not None and d.get(claim.holder) is claim:
                del d[claim.holder]
                if not d:
                    del by_key[key]
        claim.keys = []
