"""From a prompt to a route: which prefill and decode server (or colocated server) serves it.

The router joins the pieces that decide placement: the pools discovered at
start, which servers are in rotation (:mod:`._health`), what each prefill
server is believed to cache (:mod:`._prefix_index`), the requests in flight
(:mod:`._inflight`), and the policies (:mod:`._policies`), one per decision:
``prefill``, ``decode``, ``colocated`` and ``prefill_rank`` (the DP rank of a
multi-rank prefill server). It sends nothing; it only decides.
"""

from __future__ import annotations

import logging

from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._policies import Candidates, Choice, Policy
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._route import Route, rank_key
from backends.adapter._servers import ServerInfo

__all__ = ["Router"]

logger = logging.getLogger(__name__)

_STICKY = "sticky"


class Router:
    """Chooses routes over the client's pools.

    Parameters
    ----------
    pools
        Discovered servers per role (``prefill``, ``decode``, ``colocated``).
    health, index, inflight
        Rotation state, prefix record and in-flight registry, shared with the client.
    policies
        One :class:`~backends.adapter.Policy` per decision: ``prefill``,
        ``decode``, ``colocated`` and ``prefill_rank``.
    colocated_below_chars
        With both a PD pool and a colocated pool: prompts whose part not yet
        cached on the best colocated server is shorter than this run there,
        skipping the KV transfer. ``None`` sends everything through PD while
        any PD pair is in rotation.
    """

    def __init__(self, pools: dict[str, list[ServerInfo]], health: HealthTracker, index: PrefixIndex,
                 inflight: InFlight, policies: dict[str, Policy], colocated_below_chars: int | None = None) -> None:
        self.pools = pools
        self.health = health
        self.index = index
        self.inflight = inflight
        self.policies = policies
        self.colocated_below_chars = colocated_below_chars

    def _candidates(self, role: str, keys: list[int], prompt_chars: int, avoid: set[str]) -> Candidates:
        urls = [s.url for s in self.pools[role]]
        # With every server of the role out of rotation, try them anyway: a dead
        # server refuses a connection in milliseconds, while refusing to try
        # would fail requests for a whole probe interval after a false alarm.
        healthy = self.health.available(urls) or urls
        usable = tuple(u for u in healthy if u not in avoid) or tuple(healthy)
        return self._view(usable, keys, prompt_chars)

    def _view(self, names: tuple[str, ...], keys: list[int], prompt_chars: int) -> Candidates:
        """What a policy sees of ``names`` (servers, or a server's DP ranks) for a prompt."""
        return Candidates(
            servers=names,
            loads=self.inflight.loads(names),
            matched_chars=self.index.match_chars(keys, list(names)),
            held_blocks={n: self.index.size(n) for n in names},
            prompt_chars=prompt_chars,
        )

    def _info(self, role: str, url: str) -> ServerInfo:
        return next(s for s in self.pools[role] if s.url == url)

    def _has_pd(self) -> bool:
        return bool(self.pools["prefill"]) and bool(self.pools["decode"])

    def route(self, text: str, *, avoid: set[str] = frozenset(), prefer_prefill: str | None = None) -> Route:
        """Choose servers for ``text``; ``avoid`` holds servers that already failed this request.

        ``prefer_prefill`` keeps a request on a prefill server chosen before
        (the items of one ``select``), while it is in rotation and not avoided.
        The prompt is claimed for the chosen server at once (see :meth:`_claim`).
        """
        keys = self.index.keys(text)
        colocated = self._colocated_choice(text, keys, avoid)
        if colocated is not None:
            return colocated
        prefill = self._candidates("prefill", keys, len(text), avoid)
        if prefer_prefill in prefill.servers:
            prefill_choice = Choice(prefer_prefill, _STICKY)
        else:
            prefill_choice = self.policies["prefill"].choose(prefill)
        decode = self.policies["decode"].choose(self._candidates("decode", [], len(text), avoid))
        prefill_info = self._info("prefill", prefill_choice.server)
        choices = {"prefill": prefill_choice, "decode": decode}
        rank = self._rank_choice(prefill_info, keys, len(text))
        if rank is not None:
            choices["prefill_rank"] = rank[1]
        route = Route(mode="pd", choices=choices, prefill=prefill_info, decode=self._info("decode", decode.server),
                      keys=keys, prefill_rank=None if rank is None else rank[0])
        logger.debug("route %s -> %s + %s (%s)", len(text), route.prefill.url, route.decode.url, route.reason)
        self._claim(route)
        return route

    def _rank_choice(self, prefill: ServerInfo, keys: list[int], prompt_chars: int) -> tuple[int, Choice] | None:
        """For a prefill server with DP ranks: the rank for this prompt, by the ``prefill_rank`` policy.

        Each rank has its own radix cache; a random room would scatter one
        conversation's turns over them. Ranks are treated as servers of their
        own (prefix record, in-flight count), so a conversation stays on the
        rank that holds its history and new prefixes spread over the ranks.
        """
        if prefill.dp_ranks == 1:
            return None
        if len(prefill.serving_ranks) == 1:
            return prefill.serving_ranks[0], Choice(rank_key(prefill.url, prefill.serving_ranks[0]), "only_serving_rank")
        names = tuple(rank_key(prefill.url, r) for r in prefill.serving_ranks)
        choice = self.policies["prefill_rank"].choose(self._view(names, keys, prompt_chars))
        return prefill.serving_ranks[names.index(choice.server)], choice

    def forget(self, url: str) -> None:
        """Drop a server's prefix record and its DP ranks' (it restarted with empty caches)."""
        self.index.forget(url)
        for info in self.pools["prefill"]:
            if info.url == url:
                for r in info.serving_ranks:
                    self.index.forget(rank_key(url, r))

    def _colocated_choice(self, text: str, keys: list[int], avoid: set[str]) -> Route | None:
        if not self.pools["colocated"]:
            return None
        if self._has_pd():
            if self.colocated_below_chars is None and self._pd_in_rotation():
                return None
            if not self.health.available([s.url for s in self.pools["colocated"]]):
                return None
        candidates = self._candidates("colocated", keys, len(text), avoid)
        choice = self.policies["colocated"].choose(candidates)
        uncached = len(text) - candidates.matched_chars.get(choice.server, 0)
        if self._has_pd() and self._pd_in_rotation():
            if uncached >= self.colocated_below_chars:
                return None
            choice = Choice(choice.server, f"short_uncached({uncached}<{self.colocated_below_chars})->{choice.reason}",
                            "short_uncached")
        elif self._has_pd():
            choice = Choice(choice.server, f"pd_unavailable->{choice.reason}", "pd_unavailable")
        route = Route(mode="colocated", choices={"colocated": choice},
                      colocated=self._info("colocated", choice.server), keys=keys)
        self._claim(route)
        return route

    def _claim(self, route: Route) -> None:
        """Record the prompt as cached on the chosen server now, not after success.

        Requests sharing the prefix that are routed while this one is still in
        flight (a group's other requests, few-shot requests of one block) then
        follow it to the same server instead of seeing no match and being spread
        as cold prefills; sglang-router's tree is fed at decision time the same
        way. :meth:`learned` refreshes the record on success; a claim left by a
        failed attempt costs at most one later cache miss.
        """
        self._record_cached(route, [route.keys])

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
        self._record_cached(route, [route.keys] if texts is None else [self.index.keys(t) for t in texts])
