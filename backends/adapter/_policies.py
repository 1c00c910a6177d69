"""Server choice: small composable policies over one view of the candidates.

A policy sees a :class:`Candidates` view (the servers it may pick from, their
in-flight loads, how much of the prompt each is believed to hold) and returns
a :class:`Choice`: the server and a short reason that ends up in metrics and
debug logs. Policies are plain objects that compose the way tenacity's
strategies do: ``LoadGuard(CacheAware(new_prefix=SmallestCache()))`` is the
default prefill policy, and any policy can be wrapped by a guard or given as
another's fallback.
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field
from typing import Protocol

from backends.errors import ConfigurationError

__all__ = [
    "Candidates", "Choice", "Policy", "RoundRobin", "RandomChoice", "LeastLoaded", "SmallestCache",
    "CacheAware", "LoadGuard",
]


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
    """A policy's decision.

    Attributes
    ----------
    server
        One of the candidates' ``servers``.
    reason
        For people: the rule and its numbers, e.g. ``prefix_match(0.94)``.
    rule
        For programs: the rule alone, without numbers (``prefix_match``,
        ``no_prefix_match->smallest_cache``, ``imbalanced->least_loaded``,
        ...); defaults to ``reason``.
    """

    server: str
    reason: str
    rule: str = ""

    def __post_init__(self) -> None:
        if not self.rule:
            object.__setattr__(self, "rule", self.reason)


class Policy(Protocol):
    """Anything with ``choose``; policies hold no state the caller must share."""

    def choose(self, candidates: Candidates) -> Choice:
        """Pick one of ``candidates.servers``.

        Parameters
        ----------
        candidates
            The servers allowed for this request (never empty) and what is known of them.

        Returns
        -------
        Choice
            The server and why. Must not raise for a non-empty candidate list.
        """
        ...


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
        return Choice(server, f"least_loaded(load={load})", "least_loaded")


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
        return Choice(server, f"smallest_cache(blocks={blocks})", "smallest_cache")


def _lowest(candidates: Candidates, tiebreak: RoundRobin, key) -> tuple[str, tuple[int, int]]:
    """The server with the lowest ``key`` and that key; exact ties go round robin."""
    best = min(key(s) for s in candidates.servers)
    tied = tuple(s for s in candidates.servers if key(s) == best)
    return (tied[0] if len(tied) == 1 else tiebreak.choose(Candidates(tied)).server), best


class CacheAware:
    """The server holding the longest prefix of the prompt; new prefixes go to ``new_prefix``.

    Parameters
    ----------
    min_match_ratio
        Below this share of the prompt held anywhere, the match is ignored and
        ``new_prefix`` decides: a shared chat header alone should not pile every
        conversation onto one server (sglang-router's ``cache_threshold``, 0.3).
    new_prefix
        Policy for prompts no server holds (default :class:`SmallestCache`).

    Raises
    ------
    ConfigurationError
        ``min_match_ratio`` outside [0, 1].
    """

    def __init__(self, min_match_ratio: float = 0.3, new_prefix: Policy | None = None) -> None:
        if not 0.0 <= min_match_ratio <= 1.0:
            raise ConfigurationError(f"min_match_ratio must be within [0, 1], got {min_match_ratio}")
        self.min_match_ratio = min_match_ratio
        self.new_prefix = new_prefix or SmallestCache()

    def choose(self, candidates: Candidates) -> Choice:
        matched = candidates.matched_chars
        best = max(candidates.servers, key=lambda s: (matched.get(s, 0), -candidates.loads.get(s, 0)))
        best_chars = matched.get(best, 0)
        ratio = best_chars / candidates.prompt_chars if candidates.prompt_chars else 0.0
        if best_chars == 0 or ratio < self.min_match_ratio:
            choice = self.new_prefix.choose(candidates)
            return Choice(choice.server, f"no_prefix_match({ratio:.2f})->{choice.reason}",
                          f"no_prefix_match->{choice.rule}")
        return Choice(best, f"prefix_match({ratio:.2f})", "prefix_match")


class LoadGuard:
    """Wraps a policy: when its pick is far more loaded than the least loaded server, ``fallback`` decides.

    Parameters
    ----------
    policy
        The policy guarded (e.g. :class:`CacheAware`).
    balance_abs, balance_rel
        Loads count as diverged when the pick has more than ``balance_abs``
        in-flight requests above the least loaded server *and* more than
        ``balance_rel`` times its load (sglang-router's defaults, 64 and 1.5).
    fallback
        Policy used when loads diverge (default :class:`LeastLoaded`).
    """

    def __init__(self, policy: Policy, balance_abs: int = 64, balance_rel: float = 1.5,
                 fallback: Policy | None = None) -> None:
        if balance_abs < 0 or balance_rel < 1.0:
            raise ConfigurationError(f"LoadGuard needs balance_abs >= 0 and balance_rel >= 1, "
                                     f"got {balance_abs} and {balance_rel}")
        self.policy = policy
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.fallback = fallback or LeastLoaded()

    def choose(self, candidates: Candidates) -> Choice:
        choice = self.policy.choose(candidates)
        loads = candidates.loads
        least = min(loads.get(s, 0) for s in candidates.servers)
        load = loads.get(choice.server, 0)
        if load - least > self.balance_abs and load > self.balance_rel * least:
            fallback = self.fallback.choose(candidates)
            return Choice(fallback.server, f"imbalanced({load}>{least})->{fallback.reason}",
                          f"imbalanced->{fallback.rule}")
        return choice
