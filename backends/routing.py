"""Server choice: small composable policies over one view of the candidates.

A policy sees a :class:`Candidates` view (the servers it may pick from, their
in-flight loads, how much of the prompt each is believed to hold) and returns
a :class:`Choice`: the server and a short reason that ends up in metrics and
debug logs. Policies are plain objects, so they compose:
``CacheAware(fallback=LeastLoaded())``.
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Candidates:
    """What a policy may look at when choosing among ``servers``.

    Attributes
    ----------
    servers
        URLs in a stable order (the pool's order).
    loads
        In-flight requests this adapter has on each server.
    matched_chars
        Characters of the prompt each server is believed to hold in its radix cache.
    held_blocks
        Size of each server's prefix record, a proxy for how full its cache is.
    prompt_chars
        Length of the prompt being routed.
    """

    servers: tuple[str, ...]
    loads: dict[str, int] = field(default_factory=dict)
    matched_chars: dict[str, int] = field(default_factory=dict)
    held_blocks: dict[str, int] = field(default_factory=dict)
    prompt_chars: int = 0


@dataclass(frozen=True)
class Choice:
    server: str
    reason: str


class Policy(Protocol):
    def choose(self, candidates: Candidates) -> Choice: ...


class RoundRobin:
    """Each server in turn; the baseline that ignores caches and loads."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def choose(self, candidates: Candidates) -> Choice:
        with self._lock:
            turn = next(self._counter)
        return Choice(candidates.servers[turn % len(candidates.servers)], "round_robin")


class RandomChoice:
    """A uniformly random server; seeded for reproducible benchmarks."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def choose(self, candidates: Candidates) -> Choice:
        with self._lock:
            return Choice(self._random.choice(candidates.servers), "random")


class LeastLoaded:
    """Fewest in-flight requests; ties go to the emptiest cache, then round robin.

    Preferring the emptiest cache on ties spreads new prefixes over servers, so
    their radix caches hold different data (as sglang-router's smallest-tree rule).
    """

    def __init__(self) -> None:
        self._tiebreak = RoundRobin()

    def choose(self, candidates: Candidates) -> Choice:
        server, (load, _) = _lowest(candidates, self._tiebreak, lambda s: (candidates.loads.get(s, 0),
                                                                          candidates.held_blocks.get(s, 0)))
        return Choice(server, f"least_loaded(load={load})")


class SmallestCache:
    """The server with the smallest prefix record; ties go to the least loaded, then round robin.

    For prompts no server holds: spreading new prefixes by how much each
    server already caches gives every server its share of conversations,
    where the in-flight count of one instant can tie the wrong way and pile
    new conversations, and all their later turns, onto one server
    (sglang-router's cache_aware picks the smallest tree the same way).
    """

    def __init__(self) -> None:
        self._tiebreak = RoundRobin()

    def choose(self, candidates: Candidates) -> Choice:
        server, (blocks, _) = _lowest(candidates, self._tiebreak, lambda s: (candidates.held_blocks.get(s, 0),
                                                                            candidates.loads.get(s, 0)))
        return Choice(server, f"smallest_cache(blocks={blocks})")


def _lowest(candidates: Candidates, tiebreak: RoundRobin, key) -> tuple[str, tuple[int, int]]:
    """The server with the lowest ``key`` and that key; exact ties go round robin."""
    best = min(key(s) for s in candidates.servers)
    tied = tuple(s for s in candidates.servers if key(s) == best)
    return (tied[0] if len(tied) == 1 else tiebreak.choose(Candidates(tied)).server), best


class CacheAware:
    """The server holding the longest prefix of the prompt, unless loads diverge.

    Parameters
    ----------
    min_match_ratio
        Below this share of the prompt held anywhere, the match is ignored and
        ``new_prefix`` decides: a shared chat header alone should not pile every
        conversation onto one server.
    balance_abs, balance_rel
        Loads count as diverged when the chosen server has more than
        ``balance_abs`` in-flight requests above the least loaded one *and*
        more than ``balance_rel`` times its load (sglang-router's defaults);
        then ``fallback`` decides.
    new_prefix
        Policy for prompts no server holds (default :class:`SmallestCache`).
    fallback
        Policy used when loads diverge (default :class:`LeastLoaded`).
    """

    def __init__(
        self,
        min_match_ratio: float = 0.3,
        balance_abs: int = 64,
        balance_rel: float = 1.5,
        fallback: Policy | None = None,
        new_prefix: Policy | None = None,
    ) -> None:
        if not 0.0 <= min_match_ratio <= 1.0:
            raise ValueError(f"min_match_ratio must be within [0, 1], got {min_match_ratio}")
        self.min_match_ratio = min_match_ratio
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.fallback = fallback or LeastLoaded()
        self.new_prefix = new_prefix or SmallestCache()

    def choose(self, candidates: Candidates) -> Choice:
        matched = candidates.matched_chars
        best = max(candidates.servers, key=lambda s: (matched.get(s, 0), -candidates.loads.get(s, 0)))
        best_chars = matched.get(best, 0)
        ratio = best_chars / candidates.prompt_chars if candidates.prompt_chars else 0.0
        if best_chars == 0 or ratio < self.min_match_ratio:
            choice = self.new_prefix.choose(candidates)
            reason = f"no_prefix_match({ratio:.2f})->{choice.reason}"
        else:
            choice = Choice(best, "")
            reason = f"prefix_match({ratio:.2f})"
        loads = candidates.loads
        least = min(loads.get(s, 0) for s in candidates.servers)
        load = loads.get(choice.server, 0)
        if load - least > self.balance_abs and load > self.balance_rel * least:
            fallback = self.fallback.choose(candidates)
            return Choice(fallback.server, f"imbalanced({load}>{least})->{fallback.reason}")
        return Choice(choice.server, reason)
