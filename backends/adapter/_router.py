"""From a prompt to a route: which prefill and decode server (or colocated server) serves it.

The router joins the pieces that decide placement: the pools discovered at
start, which servers are in rotation (:mod:`._health`), what each prefill
server caches and how loaded it is (from the servers' own KV events and
``LoadStat``, :mod:`._kv_routing`, where they publish them; else this
client's approximate record, :mod:`._prefix_index`, and its own requests in
flight, :mod:`._inflight`), and the policies (:mod:`._policies`), one per
decision: ``prefill``, ``decode``, ``colocated`` and ``prefill_rank`` (the DP
rank of a multi-rank prefill server). It sends nothing; it only decides.

Every count a policy sees is in prompt tokens. The approximate record works
in characters; it is converted at ``_CHARS_PER_TOKEN``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._kv_routing import EventIndex
from backends.adapter._policies import Candidates, Choice, Policy
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._route import Route
from backends.adapter._servers import ServerInfo, rank_key

__all__ = ["Router", "Probe"]

logger = logging.getLogger(__name__)

_STICKY = "sticky"
#: Rough characters per token, to compare the approximate record with token counts.
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Probe:
    """One prompt as the router matches it: its approximate keys, and its token keys when known."""

    text: str
    keys: list[int]
    token_keys: list[int] | None
    tokens: int


class Router:
    """Chooses routes over the client's pools.

    Parameters
    ----------
    pools
        Discovered servers per role (``prefill``, ``decode``, ``colocated``).
    health, index, inflight
        Rotation state, approximate prefix record and in-flight registry, shared with the client.
    policies
        One :class:`~backends.adapter.Policy` per decision: ``prefill``,
        ``decode``, ``colocated`` and ``prefill_rank``.
    colocated_below_tokens
        With both a PD pool and a colocated pool: prompts whose part not yet
        cached on the best colocated server is shorter than this run there,
        skipping the KV transfer. ``None`` sends everything through PD while
        any PD pair is in rotation.
    events
        The servers' own cache and load view; ``None`` routes on the approximate record only.
    """

    def __init__(self, pools: dict[str, list[ServerInfo]], health: HealthTracker, index: PrefixIndex,
                 inflight: InFlight, policies: dict[str, Policy], colocated_below_tokens: int | None = None,
                 events: EventIndex | None = None) -> None:
        self.pools = pools
        self.health = health
        self.index = index
        self.inflight = inflight
        self.policies = policies
        self.colocated_below_tokens = colocated_below_tokens
        self.events = events if events is not None and events.active else None
        cached = [s.url for role in ("prefill", "colocated") for s in pools.get(role, [])]
        # Every cache publishes events: the approximate record would never decide, so it is not kept.
        self._events_only = self.events is not None and self.events.covers(cached)

    def probe(self, text: str, ids: Sequence[int] | None = None) -> Probe:
        """Hash the prompt once for every decision of one route."""
        token_ids = self.events.token_ids(text if ids is None else None, ids) if self.events else None
        token_keys = None if token_ids is None else self.events.keys(token_ids)
        tokens = len(token_ids) if token_ids is not None else len(text) // _CHARS_PER_TOKEN
        keys = [] if token_keys is not None and self._events_only else self.index.keys(text)
        return Probe(text, keys, token_keys, tokens)

    def _candidates(self, role: str, probe: Probe, avoid: set[str]) -> Candidates:
        urls = [s.url for s in self.pools[role]]
        # With every server of the role out of rotation, try them anyway: a dead
        # server refuses a connection in milliseconds, while refusing to try
        # would fail requests for a whole probe interval after a false alarm.
        healthy = self.health.available(urls) or urls
        usable = tuple(u for u in healthy if u not in avoid) or tuple(healthy)
        return self._view(usable, probe, cached=role != "decode")

    def _view(self, names: tuple[str, ...], probe: Probe, cached: bool = True) -> Candidates:
        """What a policy sees of ``names`` (servers, or a server's DP ranks) for a prompt.

        The prefill queue is what each server publishes (every client's
        running and waiting requests) when it does, never less than this
        client's own requests not yet prefilled.
        """
        loads = self.inflight.loads(names)
        if not cached:
            return Candidates(servers=names, loads=loads, prompt_tokens=probe.tokens)
        pending, queued = self.inflight.prefill_queue(names)
        events = self.events
        if events is not None:
            for name in names:
                published = events.load(name)
                if published is not None:
                    pending[name] = max(pending[name], published.requests)
                    queued[name] = max(queued[name], published.waiting_uncached_tokens)
        if events is not None and probe.token_keys is not None and events.covers(names):
            return Candidates(servers=names, loads=loads, pending=pending, queued_tokens=queued,
                              prompt_tokens=probe.tokens, matched_tokens=events.matched(probe.token_keys, names),
                              held_tokens={n: events.held_tokens(n) for n in names}, index="events")
        block = self.index.block_chars
        return Candidates(
            servers=names, loads=loads, pending=pending, queued_tokens=queued, prompt_tokens=probe.tokens,
            matched_tokens={n: c // _CHARS_PER_TOKEN for n, c in self.index.match_chars(probe.keys, list(names)).items()},
            held_tokens={n: self.index.size(n) * block // _CHARS_PER_TOKEN for n in names},
        )

    def _info(self, role: str, url: str) -> ServerInfo:
        return next(s for s in self.pools[role] if s.url == url)

    def _has_pd(self) -> bool:
        return bool(self.pools["prefill"]) and bool(self.pools["decode"])

    def route(self, text: str, ids: Sequence[int] | None = None, *, avoid: set[str] = frozenset(),
              prefer_prefill: str | None = None) -> Route:
        """Choose servers for a prompt (``text``, or its token ``ids``); ``avoid`` holds servers that failed it.

        ``prefer_prefill`` keeps a request on a prefill server chosen before
        (the items of one ``select``), while it is in rotation and not avoided.
        The prompt is claimed for the chosen server at once (see :meth:`_claim`).
        """
        probe = self.probe(text, ids)
        colocated = self._colocated_choice(probe, avoid)
        if colocated is not None:
            return colocated
        prefill = self._candidates("prefill", probe, avoid)
        if prefer_prefill in prefill.servers:
            prefill_choice = Choice(prefer_prefill, _STICKY)
        else:
            prefill_choice = self.policies["prefill"].choose(prefill)
        decode = self.policies["decode"].choose(self._candidates("decode", probe, avoid))
        prefill_info = self._info("prefill", prefill_choice.server)
        choices = {"prefill": prefill_choice, "decode": decode}
        seen = prefill
        rank = self._rank_choice(prefill_info, probe)
        if rank is not None:
            choices["prefill_rank"], seen = rank[1], rank[2]
        holder = choices.get("prefill_rank", prefill_choice).server
        route = Route(mode="pd", choices=choices, prefill=prefill_info, decode=self._info("decode", decode.server),
                      keys=probe.keys, token_keys=probe.token_keys, index=seen.index,
                      uncached_tokens=_uncached(seen, holder), prefill_rank=None if rank is None else rank[0])
        logger.debug("route %s -> %s + %s (%s)", probe.tokens, route.prefill.url, route.decode.url, route.reason)
        self._claim(route)
        return route

    def _rank_choice(self, prefill: ServerInfo, probe: Probe) -> tuple[int, Choice, Candidates] | None:
        """For a prefill server with DP ranks: the rank for this prompt, by the ``prefill_rank`` policy.

        Each rank has its own radix cache; a random room would scatter one
        conversation's turns over them. Ranks are treated as servers of their
        own (prefix record, in-flight count), so a conversation stays on the
        rank that holds its history and new prefixes spread over the ranks.
        """
        if prefill.dp_ranks == 1:
            return None
        names = tuple(rank_key(prefill.url, r) for r in prefill.serving_ranks)
        view = self._view(names, probe)
        if len(names) == 1:
            return prefill.serving_ranks[0], Choice(names[0], "only_serving_rank"), view
        choice = self.policies["prefill_rank"].choose(view)
        return prefill.serving_ranks[names.index(choice.server)], choice, view

    def forget(self, url: str) -> None:
        """Drop what is known of a server's cache (it restarted, or its cache was flushed).

        The approximate record of it and its DP ranks is dropped; its event
        index is rebuilt from the server's replay buffer.
        """
        self.index.forget(url)
        for info in self.pools["prefill"]:
            if info.url == url:
                for r in info.serving_ranks:
                    self.index.forget(rank_key(url, r))
        if self.events is not None:
            self.events.resync(url)

    def _colocated_choice(self, probe: Probe, avoid: set[str]) -> Route | None:
        if not self.pools["colocated"]:
            return None
        if self._has_pd():
            if self.colocated_below_tokens is None and self._pd_in_rotation():
                return None
            if not self.health.available([s.url for s in self.pools["colocated"]]):
                return None
        candidates = self._candidates("colocated", probe, avoid)
        choice = self.policies["colocated"].choose(candidates)
        uncached = _uncached(candidates, choice.server)
        if self._has_pd() and self._pd_in_rotation():
            if uncached >= self.colocated_below_tokens:
                return None
            choice = Choice(choice.server, f"short_uncached({uncached}<{self.colocated_below_tokens})->{choice.reason}",
                            "short_uncached")
        elif self._has_pd():
            choice = Choice(choice.server, f"pd_unavailable->{choice.reason}", "pd_unavailable")
        route = Route(mode="colocated", choices={"colocated": choice}, colocated=self._info("colocated", choice.server),
                      keys=probe.keys, token_keys=probe.token_keys, index=candidates.index, uncached_tokens=uncached)
        self._claim(route)
        return route

    def _claim(self, route: Route) -> None:
        """Record the prompt as cached on the chosen server now, not after success.

        Requests sharing the prefix that are routed while this one is still in
        flight (a group's other requests, few-shot requests of one block) then
        follow it to the same server instead of seeing no match and being spread
        as cold prefills; sglang-router's tree is fed at decision time the same
        way. :meth:`learned` refreshes the record on success; a claim left by a
        failed attempt costs at most one later cache miss. Where the server
        publishes events, the claim lasts until they confirm the prompt
        (a PD prefill server announces it only after the KV transfer).
        """
        self._record_cached(route, [route.keys])
        if self.events is not None and route.token_keys:
            leader = self.events.leader(route.cache_holder, route.token_keys)
            claim = self.events.claim(route.cache_holder, route.token_keys)
            route.claims.extend(c for c in (claim,) if c is not None)
            route.leaders.extend(c for c in (leader,) if c is not None)

    @contextmanager
    def holding(self, route: Route) -> Iterator[Callable[[], None]]:
        """Count ``route`` as in flight while the block runs (:meth:`InFlight.holding`).

        Yields ``prefilled()``, to call when the prompt is prefilled: its
        queued tokens stop counting, and its claim turns from pending (its
        prefix being computed) to reusable, releasing the requests waiting to
        reuse it (:meth:`await_prefix`). A route that ends without it
        abandons its claim. Idempotent.
        """
        done = False

        def prefilled() -> None:
            nonlocal done
            release()
            if not done:
                done = True
                for claim in route.claims:
                    self.events.ready(claim)

        with self.inflight.holding(route) as release:
            try:
                yield prefilled
            finally:
                if not done:
                    done = True
                    for claim in route.claims:
                        self.events.abandon(claim)

    def await_prefix(self, route: Route, timeout: float | None = None) -> float:
        """Wait until the requests computing the prefix this route reuses are prefilled; seconds waited.

        A request routed to reuse a prefix that another request of this client
        is still prefilling would, sent now, be batched with it and compute the
        prefix again (SGLang matches the radix cache when it schedules; a PD
        prefill server schedules a request only after its bootstrap). Waiting
        until that prefill ends turns the recompute into a cache hit, as
        SGLang's own in-batch prefix caching does for one server
        (``schedule_policy.py``, ``IN_BATCH_PREFIX_CACHING_*``). The wait
        ends early if that request fails, and at ``timeout`` in any case
        (default: the claims' lifetime, ``EventIndex.claim_ttl_s``).
        """
        if not route.leaders:
            return 0.0
        timeout = self.events.claim_ttl_s if timeout is None else timeout
        started = time.monotonic()
        for leader in route.leaders:
            leader.done.wait(max(0.0, started + timeout - time.monotonic()))
        return time.monotonic() - started

    def _record_cached(self, route: Route, key_lists: list[list[int]]) -> None:
        server = (route.prefill or route.colocated).url
        for keys in key_lists:
            self.index.insert(server, keys)
            if route.cache_holder != server:
                self.index.insert(route.cache_holder, keys)

    def out_of_rotation(self, role: str) -> str | None:
        """A description of the role's servers when none is in rotation, else ``None``."""
        urls = [s.url for s in self.pools[role]]
        if not urls or self.health.available(urls):
            return None
        states = self.health.snapshot()
        return "; ".join(f"{u}: {states[u].last_error or 'out of rotation'}" for u in urls)

    def _pd_in_rotation(self) -> bool:
        return all(self.health.available([s.url for s in self.pools[r]]) for r in ("prefill", "decode"))

    def learned(self, route: Route, texts: list[str] | None = None) -> None:
        """After success: the serving server now caches the prompt(s)."""
        if texts is None or not route.keys:  # no approximate keys: routed on events alone
            self._record_cached(route, [route.keys])
        else:
            self._record_cached(route, [self.index.keys(t) for t in texts])


def _uncached(candidates: Candidates, server: str) -> int:
    return max(candidates.prompt_tokens - candidates.matched_tokens.get(server, 0), 0)
