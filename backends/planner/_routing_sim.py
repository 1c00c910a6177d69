"""Many client processes, many prefill servers: the adapter's real routing against simulated caches.

Why: whether routing on the servers' KV events keeps each prefix on one server, and how much
per-client approximate records or one router's approximate tree lose, only shows with more
servers and client processes than one machine runs. Here every client is the adapter's own
:class:`~backends.adapter._router.Router` (its ``_view``, claims, in-flight accounting) with the
real policies, :class:`~backends.adapter._token_index.TokenIndex` and
:class:`~backends.adapter._prefix_index.PrefixIndex`; only the servers are simulated:

- a prefill server: a FIFO queue; each forward takes waiting requests while their uncached tokens
  fit ``max_prefill_tokens``, matched against its :class:`SimRadixCache` when taken (SGLang
  matches when it schedules) and costs :meth:`CostModel.prefill_time` plus one base per extra
  chunk; when it ends the next batch is formed, then the prompts are cached and their events
  published (SGLang 0.5.23's overlapped PD prefill loop: ``checkpoint_disagg_prefill`` in
  ``process_batch_result_disagg_prefill``, before the KV transfer); the transfer takes
  :meth:`CostModel.transfer_time`, after which the first token counts (TTFT) and the client's
  ``prefilled()`` is called, as ``_engine.py`` does at the first result;
- KV events and ``LoadStat`` (running + waiting requests, waiting uncached tokens; published on
  every change, as SGLang's ``SchedulerLoadPublisher`` does within a few scheduler steps) reach
  every subscribed client ``event_lag_s`` later; a client's :class:`EventIndex` is the
  adapter's, its ZMQ subscriber replaced by that delivery;
- decode is not modelled beyond time: a request stays in flight (counted in the loads
  ``LoadGuard`` reads) for ``output_tokens - 1`` decode steps of a 64-request batch.

Requests are spread over clients at random (a load balancer in front of client processes).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from math import ceil
from typing import Callable

import numpy as np

from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._kv_routing import EventIndex
from backends.adapter._kv_wire import LoadStat
from backends.adapter._policies import LeastLoaded, PrefillCost
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._router import Router
from backends.adapter._servers import ServerInfo
from backends.adapter._token_index import TokenIndex
from backends.planner._costs import CostModel
from backends.planner._radix_sim import SimRadixCache, apply_kv_events, union_tokens
from backends.planner._routing_setups import ROUTING_SETUPS, RoutingSetup, RoutingSimResult
from backends.planner._routing_workload import RoutingWorkload, token_text

__all__ = ["simulate_routing"]


class _LoadFeed:
    """Stands for the ZMQ subscriber in :class:`EventIndex`: the latest delivered ``LoadStat`` per server."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.latest = clock, {}

    def load(self, holder: str):
        got = self.latest.get(holder)
        return None if got is None else (got[0], self.clock() - got[1])

    def stats(self) -> dict:
        return {}

    def resync(self, url: str) -> None:
        pass

    def close(self) -> None:
        pass


class _SimEventIndex(EventIndex):
    """The adapter's :class:`EventIndex` on simulated servers: the same matching, claims and load
    reading; its index runs on simulated time and is fed by :func:`apply_kv_events`."""

    def __init__(self, holders: list[str], feed: _LoadFeed, clock: Callable[[], float]) -> None:
        super().__init__([])  # no server described: no sockets, no tokenizer (ids are given)
        self.index = TokenIndex(chunk=self.index.chunk, clock=clock)
        self._holders = {h: [h] for h in holders}
        self._subscriber = feed


class _Server:
    def __init__(self, url: str, cache: SimRadixCache) -> None:
        self.url, self.cache, self.queue, self.forward = url, cache, [], []
        self.busy_time, self.waiting_uncached, self.head = 0.0, 0, 0


def simulate_routing(workload: RoutingWorkload, setup: RoutingSetup | str = "events", *, prefill: int = 16,
                     clients: int = 16, costs: CostModel | None = None, capacity_tokens: int | None = None,
                     event_lag_s: float = 0.005, seed: int = 0) -> RoutingSimResult:
    """Route ``workload`` from ``clients`` client processes to ``prefill`` simulated prefill servers.

    Parameters
    ----------
    workload
        Token-id requests (:func:`routing_workload`); its ``page_size`` is the servers'.
    setup
        A :class:`RoutingSetup` or a name in :data:`ROUTING_SETUPS`.
    costs
        Prefill, transfer and decode-step times (default :meth:`CostModel.h200_llama8b`).
    capacity_tokens
        Radix cache size per server (default ``costs.kv_capacity_tokens``).
    event_lag_s
        From a server's cache insert or load change to every client knowing it.
    seed
        Which client sends each request, and the policies' random round-robin starts.
    """
    setup = ROUTING_SETUPS[setup] if isinstance(setup, str) else setup
    return _Run(workload, setup, prefill, clients, costs or CostModel.h200_llama8b(), capacity_tokens,
                event_lag_s, seed).result()


class _Run:
    def __init__(self, w: RoutingWorkload, setup: RoutingSetup, prefill: int, clients: int, costs: CostModel,
                 capacity: int | None, lag: float, seed: int) -> None:
        self.w, self.setup, self.c, self.lag, self.now = w, setup, costs, lag, 0.0
        cap = capacity or costs.kv_capacity_tokens
        self.servers = [_Server(f"http://prefill-{i}:30000", SimRadixCache(cap, w.page_size)) for i in range(prefill)]
        self.by_url = {s.url: s for s in self.servers}
        pools = {"prefill": [ServerInfo(s.url, "prefill", "sim", s.url[7:-6], 8998) for s in self.servers],
                 "decode": [ServerInfo(f"http://decode-{i}:30000", "decode", "sim", f"decode-{i}") for i in range(prefill)],
                 "colocated": []}
        self.feed, self.indexes = _LoadFeed(self.clock), []
        state = random.getstate()  # policies draw their round-robin start from the global generator
        random.seed(seed)
        try:
            routers = [self._router(pools)] if setup.shared else [self._router(pools) for _ in range(clients)]
        finally:
            random.setstate(state)
        self.client = np.random.default_rng([seed, 7]).integers(0, clients, len(w)).tolist()
        self.routers = [routers[k % len(routers)] for k in range(clients)]
        mean_ctx = float(np.mean([len(p) for p in w.prompts]) + np.mean(w.output_tokens))
        self.tpot = costs.decode_step_time(64, 64 * mean_ctx)
        n = len(w)
        self.ttft, self.hit, self.served = np.full(n, np.nan), [0] * n, [None] * n
        self.live: dict[int, tuple] = {}
        self.rules: Counter[str] = Counter()
        self.heap, self.seq = [], 0
        for i, t in enumerate(w.arrival_s.tolist()):
            self.push(t, self.arrive, i)
        while self.heap:
            self.now, _, fn, arg = heapq.heappop(self.heap)
            fn(arg)

    def clock(self) -> float:
        return self.now

    def push(self, t: float, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))  # seq: same-time events in push order

    def _router(self, pools) -> Router:
        events = None
        if self.setup.events:
            events = _SimEventIndex([s.url for s in self.servers], self.feed, self.clock)
            self.indexes.append(events.index)
        urls = [s.url for role in ("prefill", "decode") for s in pools[role]]
        policies = {"prefill": self.setup.policy(), "decode": LeastLoaded(), "colocated": PrefillCost(),
                    "prefill_rank": PrefillCost()}
        return Router(pools, HealthTracker(urls, probe=lambda url: True), PrefixIndex(), InFlight(), policies,
                      events=events)

    # ----- the client: route, hold, enqueue ----------------------------------------------
    def arrive(self, i: int) -> None:
        router, ids = self.routers[self.client[i]], self.w.prompts[i]
        route = router.route("" if self.setup.events else token_text(ids), ids)
        hold = router.holding(route)
        prefilled = hold.__enter__()
        self.rules[route.rule] += 1
        self.live[i] = (router, route, hold, prefilled)
        self.served[i] = server = self.by_url[route.prefill.url]
        self.push(self.now + self.c.request_overhead_s, self.enqueue, (server, i))

    # ----- the server: queue, forwards, transfers -----------------------------------------
    def enqueue(self, arg) -> None:
        s, i = arg
        ids = self.w.prompts[i]
        uncached = len(ids) - s.cache.match(ids)
        s.queue.append((i, uncached))
        s.waiting_uncached += uncached
        self.publish(s)
        if not s.forward:
            self.start(s)

    def start(self, s: _Server) -> None:
        c, batch, tokens, chunks = self.c, [], 0, 0
        while s.head < len(s.queue):
            i, queued = s.queue[s.head]
            ids = self.w.prompts[i]
            hit, node = s.cache.acquire(ids, self.now)
            hit = min(hit, len(ids) - 1)  # the last token is always computed
            u = len(ids) - hit
            if batch and tokens + u > c.max_prefill_tokens:
                s.cache.release(node)
                break
            s.head, s.waiting_uncached = s.head + 1, s.waiting_uncached - queued
            batch.append((i, node))
            self.hit[i], tokens = hit, tokens + u
            chunks += max(ceil(u / c.max_prefill_tokens), 1) - 1
        if not batch:
            return
        uncached = [len(self.w.prompts[i]) - self.hit[i] for i, _ in batch]
        dt = c.prefill_time(uncached, [self.hit[i] for i, _ in batch]) + chunks * c.prefill_base_s
        s.forward, s.busy_time = batch, s.busy_time + dt
        self.publish(s)
        self.push(self.now + dt, self.forward_done, s)

    def forward_done(self, s: _Server) -> None:
        done, s.forward = s.forward, []
        if s.head > 1024:
            del s.queue[: s.head]
            s.head = 0
        self.start(s)  # SGLang's overlap loop forms the next batch before it processes this one's results
        events = []
        for i, node in done:  # checkpoint_disagg_prefill: cached (and announced) before the KV transfer
            ids = self.w.prompts[i]
            events += s.cache.insert(ids, self.now)
            s.cache.release(node)
            node = s.cache.acquire(ids, self.now)[1]  # held until the transfer ends
            self.push(self.now + self.c.transfer_time(len(ids)), self.transferred, (s, i, node))
        if events and self.indexes:
            self.push(self.now + self.lag, self.deliver, (s.url, events))
        self.publish(s)

    def transferred(self, arg) -> None:
        s, i, node = arg
        s.cache.release(node)  # release_kv_cache once the transfer succeeded
        self.ttft[i] = self.now - self.w.arrival_s[i]
        router, route, hold, prefilled = self.live[i]
        prefilled()
        self.push(self.now + max(int(self.w.output_tokens[i]) - 1, 0) * self.tpot, self.finish, i)

    def finish(self, i: int) -> None:
        router, route, hold, _ = self.live.pop(i)
        hold.__exit__(None, None, None)
        router.learned(route)

    # ----- what the servers publish -----------------------------------------------------
    def publish(self, s: _Server) -> None:
        if self.indexes:
            stat = LoadStat(num_running_reqs=len(s.forward), num_waiting_reqs=len(s.queue) - s.head,
                            num_tokens=s.cache.tokens, max_total_num_tokens=s.cache.capacity,
                            num_waiting_uncached_tokens=s.waiting_uncached)
            self.push(self.now + self.lag, self.loaded, (s.url, stat))

    def loaded(self, arg) -> None:
        self.feed.latest[arg[0]] = (arg[1], self.now)

    def deliver(self, arg) -> None:
        url, events = arg
        for index in self.indexes:
            apply_kv_events(index, url, events)

    # ----- outcome ----------------------------------------------------------------------
    def result(self) -> RoutingSimResult:
        w = self.w
        if np.isnan(self.ttft).any():
            raise RuntimeError(f"simulation stalled: {int(np.isnan(self.ttft).sum())} requests never prefilled")
        held: dict[int, set] = {}
        for g, s in zip(w.group.tolist(), self.served):
            if g >= 0:
                held.setdefault(g, set()).add(s.url)
        counts = Counter(g for g in w.group.tolist() if g >= 0)
        shared = [len(held[g]) for g, k in counts.items() if k >= 2]
        caches = [s.cache for s in self.servers]
        unique = union_tokens(caches)
        span = max(float(np.max(w.arrival_s + self.ttft) - w.arrival_s[0]), 1e-12)
        return RoutingSimResult(
            self.setup.name, w.name, len(self.servers), len(self.routers), sum(self.hit) / max(w.prompt_tokens, 1),
            w.best_hit_ratio, float(np.mean(shared)) if shared else float("nan"),
            sum(c.tokens for c in caches) / unique if unique else float("nan"), self.ttft,
            sum(s.busy_time for s in self.servers) / (len(self.servers) * span),
            len(self.servers) - len({s.url for s in self.served}), sum(c.evicted_tokens for c in caches),
            dict(self.rules))
