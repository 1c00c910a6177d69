"""Server choice: small composable policies over one view of the candidates.

A policy sees a :class:`Candidates` view (the servers it may pick from, their
loads, how many of the prompt's tokens each holds in its radix cache) and
returns a :class:`Choice`: the server and a short reason that ends up in
metrics and debug logs. Policies are plain objects that compose the way
tenacity's strategies do: :class:`PrefillCost` is the default for prefill and
colocated servers, ``LoadGuard(CacheAware(new_prefix=SmallestCache()))`` the
threshold-based alternative, and any policy can be wrapped by a guard or
given as another's fallback.
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
    "CacheAware", "LoadGuard", "PrefillCost",
]


@dataclass(frozen=True)
class Candidates:
    """What a policy may look at when choosing among ``servers``.

    Attributes
    ----------
    servers
        URLs in a stable order (the pool's order), or a server's DP ranks (``URL#dpR``).
    loads
        This client's requests in flight on each server (decoding included).
    pending
        Requests waiting for or in each server's prefill: what the server
        publishes (every client's running and waiting requests) when it does,
        never less than this client's own not yet prefilled.
    matched_tokens
        Leading tokens of the prompt each server holds in its radix cache.
    held_tokens
        Tokens each server's cache is known to hold, a proxy for how full it is.
    prompt_tokens
        Length of the prompt being routed.
    queued_tokens
        Uncached prompt tokens already waiting for each server's prefill.
    index
        Where the token counts come from: ``"events"`` (the servers' own KV
        events; exact to 16 tokens) or ``"approximate"`` (this client's record of
        what it sent, in characters / 4).
    """

    servers: tuple[str, ...]
    loads: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    matched_tokens: dict[str, int] = field(default_factory=dict)
    held_tokens: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    queued_tokens: dict[str, int] = field(default_factory=dict)
    index: str = "approximate"


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
    """Each server in turn; the baseline that ignores caches and loads.

    Parameters
    ----------
    start
        Turn to begin at; ``None`` picks one at random, so that client
        processes started together do not all send their first request to
        the same server.
    """

    def __init__(self, start: int | None = 0) -> None:
        self._counter = itertools.count(random.randrange(1 << 16) if start is None else start)
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
                                                                          candidates.held_tokens.get(s, 0)))
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
        server, (held, _) = _lowest(candidates, self._tiebreak, lambda s: (candidates.held_tokens.get(s, 0),
                                                                          candidates.loads.get(s, 0)))
        return Choice(server, f"smallest_cache(tokens={held})", "smallest_cache")


def _lowest(candidates: Candidates, tiebreak: RoundRobin, key) -> tuple[str, tuple]:
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
        matched = candidates.matched_tokens
        best = max(candidates.servers, key=lambda s: (matched.get(s, 0), -candidates.loads.get(s, 0)))
        best_tokens = matched.get(best, 0)
        ratio = best_tokens / candidates.prompt_tokens if candidates.prompt_tokens else 0.0
        if best_tokens == 0 or ratio < self.min_match_ratio:
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


class PrefillCost:
    """The server where this prompt's prefill would finish first: least estimated prefill work.

    Work on a server, in prompt tokens: the tokens of this prompt its radix
    cache lacks (those another server holds counted ``recompute_weight``
    times), plus the uncached tokens already waiting for it, plus
    ``request_tokens`` per request waiting for or in its prefill (``pending``;
    requests already decoding cost a prefill server nothing). So the cache owner keeps a
    prefix while waiting there is cheaper than recomputing it elsewhere, and
    an idle server (a restarted one, with an empty cache) takes work as soon
    as recomputing is the cheaper way; no fixed threshold decides. Dynamo's KV
    router scores overlap against load in the same spirit
    (``lib/llm/src/kv_router/scheduler.py``: prefill blocks to compute plus
    blocks active). Exact ties go to the longest match, then the smallest
    cache, then round robin from a random start (which spreads new prefixes
    over the servers, also when many client processes start at once).

    Parameters
    ----------
    request_tokens
        Fixed cost of one request in prompt-token equivalents (scheduling, the
        KV hand-off, its decode share on a colocated server). Default 16: a
        prefill server batches waiting requests, so their fixed costs overlap.
    recompute_weight
        Weight of the tokens recomputed because another server holds them.
        Default 2: leaving the owner costs the recompute now, and again later,
        as the prefix then sits in two caches and the requests that share it
        split between them (measured with the benchmark's multi-turn chat:
        with weight 1, 11 of 48 turns left their conversation's server).
    min_match_ratio
        When no server holds this share of the prompt, matches are ignored
        and the prompt is placed as a new prefix (by load, then the smallest
        cache): a chat header every prompt starts with must not keep new
        conversations off the servers that lack it (in a 16-server simulation
        it left 5 of 16 servers idle). Default 0.3, sglang-router's ``cache_threshold``.

    Raises
    ------
    ConfigurationError
        ``request_tokens`` negative or ``recompute_weight`` below 1.
    """

    def __init__(self, request_tokens: int = 16, recompute_weight: float = 2.0, min_match_ratio: float = 0.3) -> None:
        if request_tokens < 0 or recompute_weight < 1 or not 0.0 <= min_match_ratio <= 1.0:
            raise ConfigurationError(f"PrefillCost needs request_tokens >= 0, recompute_weight >= 1 and "
                                     f"min_match_ratio in [0, 1], got {request_tokens}, {recompute_weight} "
                                     f"and {min_match_ratio}")
        self.request_tokens = request_tokens
        self.recompute_weight = recompute_weight
        self.min_match_ratio = min_match_ratio
        self._tiebreak = RoundRobin(start=None)  # many clients: do not herd on the first server

    def work(self, candidates: Candidates, server: str) -> int:
        """Estimated prefill work (tokens) of sending the prompt to ``server``."""
        return self._work(candidates, self._counted(candidates), server)

    def _work(self, candidates: Candidates, matched: dict[str, int], server: str) -> int:
        held, longest = matched.get(server, 0), max(matched.values(), default=0)
        return round(candidates.prompt_tokens - held + (self.recompute_weight - 1) * (longest - held)
                     + candidates.queued_tokens.get(server, 0) + self.request_tokens * candidates.pending.get(server, 0))

    def _counted(self, candidates: Candidates) -> dict[str, int]:
        """The matches that count: none when no server holds ``min_match_ratio`` of the prompt."""
        matched = candidates.matched_tokens
        longest = max((matched.get(s, 0) for s in candidates.servers), default=0)
        if not longest or longest < self.min_match_ratio * candidates.prompt_tokens:
            return {}  # a new prefix (a short shared header at most): placed by load, then cache size
        return {s: matched.get(s, 0) for s in candidates.servers}

    def choose(self, candidates: Candidates) -> Choice:
        matched = self._counted(candidates)
        server, key = _lowest(candidates, self._tiebreak, lambda s: (
            self._work(candidates, matched, s), -matched.get(s, 0), candidates.held_tokens.get(s, 0)))
        hit, longest = matched.get(server, 0), max(matched.values(), default=0)
        rule = "prefix_match" if hit and hit == longest else "least_work" if longest else "new_prefix"
        shown = candidates.matched_tokens.get(server, 0)
        return Choice(server, f"{rule}(work={key[0]},hit={shown}/{candidates.prompt_tokens},{candidates.index})",
                      rule)
