"""A discrete-event simulation of a PD (or colocated) SGLang deployment serving a workload.

Modelled after DistServe's simulator (Zhong et al., OSDI'24, section 4.3) and SGLang 0.5.23's
schedulers; times in seconds, sizes in tokens:

- prefill servers: a FIFO queue each; a forward takes queued requests while their uncached tokens
  fit ``max_prefill_tokens`` (a longer prompt runs alone, one base cost per chunk); cached tokens
  are matched when scheduled, against a radix cache of ``kv_capacity_tokens`` with LRU eviction
  in tokens, filled once a prompt's KV transfer is done;
- the KV hand-off starts when the forward ends and the decode server has room (running cap, KV
  tokens reserved for prompt + output); the prefill leg answers when it ends (TTFT);
- decode servers: continuous batching, joins and exits at step boundaries; a run of steps with
  an unchanged batch is one event. Colocated servers: the same, waiting prefills first (SGLang's default);
- routing: the adapter's own policy objects choose at arrival from its in-flight counts and its
  record of what it sent where (in tokens, as the adapter's event index gives them).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from math import ceil, sqrt

import numpy as np

import backends
from backends import CacheAware, Candidates, LeastLoaded, PrefillCost, RoundRobin
from backends.planner._costs import CostModel
from backends.planner._workload import PrefixCache, Workload

__all__ = ["Simulator", "SimResult", "make_policy"]


def make_policy(spec):
    """A fresh policy from a name or the object itself.

    Names: ``prefill_cost`` (the adapter's default), ``cache_aware``
    (``LoadGuard(CacheAware())``, threshold-based), ``least_loaded``, ``round_robin``.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "cache_aware":
        return backends.LoadGuard(CacheAware())
    table = {"prefill_cost": PrefillCost, "least_loaded": LeastLoaded, "round_robin": RoundRobin}
    if spec not in table:
        raise ValueError(f"unknown policy {spec!r}; choose prefill_cost, cache_aware, least_loaded or round_robin")
    return table[spec]()


@dataclass(frozen=True)
class SimResult:
    """Per request (workload order) and per pool outcomes of one simulation, in s.

    ``ttft_s``: arrival to the prefill leg's answer (KV at decode), as the adapter records a
    non-streamed pair; ``tpot_s``: ``(e2e - ttft) / (output_tokens - 1)``, NaN for one token;
    ``utilisation``: busy time over servers x makespan, per pool.
    """

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    cached_tokens: np.ndarray
    prefill_server: np.ndarray
    decode_server: np.ndarray
    utilisation: dict
    makespan_s: float
    mean_decode_batch: float


class _Server:
    def __init__(self, name: str, costs: CostModel, index_capacity: int) -> None:
        self.name, self.queue, self.pending, self.joining = name, deque(), deque(), []
        self.cache, self.claimed = PrefixCache(costs.kv_capacity_tokens), PrefixCache(index_capacity)
        self.inflight = self.busy_time = self.reserved = self.reserved_tokens = self.step_count = self.batch_sum = 0
        self.busy = self.decoding = False
        self.running: list = []  # heap of (finish step, request)
        self.steps = self.ctx = self.t0 = self.k = self.version = 0  # decode steps done; KV tokens running; the run


class Simulator:
    """Replay a :class:`Workload` on ``prefill`` + ``decode`` servers, or ``colocated`` ones.

    Parameters
    ----------
    costs : CostModel
        Costs and limits of one server.
    prefill, decode, colocated : int
        Server counts: PD (``prefill``, ``decode`` >= 1) or colocated only.
    prefill_policy, decode_policy : str or policy
        Names for :func:`make_policy`, or policy objects (stateful: use a fresh one per run).
        Colocated servers use ``prefill_policy``.
    index_capacity_tokens : int
        The adapter's prefix record per server (its default 65,536 blocks of 32 characters,
        at ~4 characters a token).
    """

    def __init__(self, costs: CostModel, prefill: int = 1, decode: int = 1, colocated: int = 0, *,
                 prefill_policy="prefill_cost", decode_policy="least_loaded", index_capacity_tokens: int = 524_288):
        if colocated and (prefill or decode):
            raise ValueError("simulate either PD (prefill, decode >= 1) or colocated servers, not both")
        if not colocated and (prefill < 1 or decode < 1):
            raise ValueError(f"PD needs prefill >= 1 and decode >= 1, got {prefill}:{decode}")
        self.costs, self.counts = costs, (prefill, decode, colocated)
        self.policies, self.index_capacity = (prefill_policy, decode_policy), index_capacity_tokens

    def run(self, workload: Workload) -> SimResult:
        return _Run(self, workload).result()


class _Run:
    def __init__(self, sim: Simulator, w: Workload) -> None:
        self.c, (p, d, colo) = sim.costs, sim.counts
        self.colo = colo > 0
        mk = lambda role, n: [_Server(f"{role}-{i}", self.c, sim.index_capacity) for i in range(n)]  # noqa: E731
        self.pool = mk("colocated", colo) if self.colo else mk("prefill", p)
        self.dpool = self.pool if self.colo else mk("decode", d)
        self.ppolicy, self.dpolicy = make_policy(sim.policies[0]), make_policy(sim.policies[1])
        self.arrival, self.prompt, self.out = w.arrival_s.tolist(), w.prompt_tokens.tolist(), w.output_tokens.tolist()
        self.group, self.prefix = w.group.tolist(), w.prefix_tokens.tolist()
        n = len(w)
        self.ttft, self.e2e = np.full(n, np.nan), np.full(n, np.nan)
        self.cached, self.pidx, self.didx, self.where = [0] * n, [0] * n, [0] * n, [None] * n
        self.events, self.seq = [], 0
        for i in range(n):
            self.push(self.arrival[i], self.route, i)
        while self.events:
            t, _, fn, arg = heapq.heappop(self.events)
            fn(t, arg)
        if np.isnan(self.e2e).any():
            raise RuntimeError(f"simulation stalled: {int(np.isnan(self.e2e).sum())} requests never finished")
        self.end = float(np.max(self.e2e + w.arrival_s)) if n else 0.0

    def push(self, t, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, arg))  # seq: same-time events in push order

    # ----- routing (the adapter, at send time) -------------------------------------------
    def route(self, now, i) -> None:
        g, pre, n = self.group[i], self.prefix[i], self.prompt[i]
        names = tuple(s.name for s in self.pool)
        view = Candidates(names, loads={s.name: s.inflight for s in self.pool},
                          pending={s.name: len(s.queue) for s in self.pool},
                          matched_tokens={s.name: s.claimed.match(g, pre, False) for s in self.pool},
                          held_tokens={s.name: s.claimed.total for s in self.pool}, prompt_tokens=n)
        p = self.pool[names.index(self.ppolicy.choose(view).server)]
        p.claimed.insert(g, pre, n - pre, i)
        p.inflight, d = p.inflight + 1, p
        if not self.colo:
            dn = tuple(s.name for s in self.dpool)
            loads = {s.name: s.inflight for s in self.dpool}
            d = self.dpool[dn.index(self.dpolicy.choose(Candidates(dn, loads=loads)).server)]
            d.inflight += 1
        self.where[i], self.pidx[i], self.didx[i] = (p, d), self.pool.index(p), self.dpool.index(d)
        self.push(now + self.c.request_overhead_s, self.enqueue, i)

    def enqueue(self, now, i) -> None:
        p = self.where[i][0]
        p.queue.append(i)
        if not p.busy:
            (self.after_steps if self.colo else self.start_prefill)(now, p)
        elif p.decoding:
            self.interrupt(now, p)

    # ----- prefill -------------------------------------------------------------------------
    def start_prefill(self, now, p: _Server) -> None:
        c, batch, tokens, chunks = self.c, [], 0, 0
        while p.queue and (not self.colo or p.reserved + len(batch) < c.max_running_requests):
            i = p.queue[0]
            hit = min(p.cache.match(self.group[i], self.prefix[i]), self.prompt[i] - 1)  # >= 1 token computed
            u = self.prompt[i] - hit
            if batch and tokens + u > c.max_prefill_tokens:
                break
            p.queue.popleft()
            batch.append(i)
            self.cached[i] = hit
            tokens += u
            chunks += max(ceil(u / c.max_prefill_tokens), 1) - 1
        if not batch:
            return
        # CostModel.prefill_time, inlined (numpy is slow for a handful of numbers)
        dt = (1 + chunks) * c.prefill_base_s + sum(
            (self.prompt[i] - self.cached[i]) * (c.prefill_token_s + c.prefill_attn_s * (self.prompt[i] + self.cached[i]) / 2)
            for i in batch)
        p.busy, p.busy_time = True, p.busy_time + dt
        p.reserved += len(batch) if self.colo else 0
        self.push(now + dt, self.end_prefill, (p, batch))

    def end_prefill(self, now, arg) -> None:
        p, batch = arg
        p.busy = False
        for i in batch:
            if self.colo:
                self.delivered(now, i)
            else:
                self.where[i][1].pending.append(i)
                self.admit(now, self.where[i][1])
        (self.after_steps if self.colo else self.start_prefill)(now, p)

    # ----- the KV hand-off and decode admission ---------------------------------------------
    def admit(self, now, d: _Server) -> None:
        c = self.c
        while d.pending:
            i = d.pending[0]
            need = self.prompt[i] + self.out[i]
            if d.reserved and (d.reserved >= c.max_running_requests or d.reserved_tokens + need > c.kv_capacity_tokens):
                return
            d.pending.popleft()
            d.reserved, d.reserved_tokens = d.reserved + 1, d.reserved_tokens + need
            self.push(now + c.transfer_time(self.prompt[i]), self.delivered, i)

    def delivered(self, now, i) -> None:
        """The first token exists and (PD) the KV reached decode: TTFT; the request joins decode."""
        p, d = self.where[i]
        self.ttft[i] = now - self.arrival[i]
        p.cache.insert(self.group[i], self.prefix[i], self.prompt[i] - self.prefix[i], i)
        if not self.colo:
            p.inflight -= 1
        if self.out[i] == 1:
            return self.finish(now, d, i)
        d.joining.append(i)
        if not self.colo:
            (self.interrupt if d.decoding else self.after_steps)(now, d)

    def finish(self, now, d: _Server, i) -> None:
        self.e2e[i] = now - self.arrival[i] + self.c.decode_overhead_s
        d.inflight -= 1
        d.reserved, d.reserved_tokens = d.reserved - 1, d.reserved_tokens - (0 if self.colo else self.prompt[i] + self.out[i])

    # ----- decode: runs of steps with an unchanged batch --------------------------------------
    def run_time(self, d: _Server, k: int) -> float:
        b = len(d.running)
        return k * self.c.decode_step_time(b, d.ctx) + self.c.decode_ctx_s * b * k * (k - 1) / 2

    def after_steps(self, now, d: _Server) -> None:
        """At a step boundary: admit joiners (decode) or run waiting prefills first (colocated)."""
        if self.colo and d.queue and not d.busy and d.reserved < self.c.max_running_requests:
            return self.start_prefill(now, d)
        for i in d.joining:
            heapq.heappush(d.running, (d.steps + self.out[i] - 1, i))
            d.ctx += self.prompt[i] + 1
        d.joining = []
        if not self.colo:
            self.admit(now, d)
        if d.running and not d.busy:
            d.busy = d.decoding = True
            d.t0, d.version, d.k = now, d.version + 1, d.running[0][0] - d.steps
            self.push(now + self.run_time(d, d.k), self.end_steps, (d, d.version))

    def interrupt(self, now, d: _Server) -> None:
        """Cut the current run at the first step boundary at or after ``now`` (restart it if none ran yet)."""
        if now <= d.t0:
            d.version, d.busy, d.decoding = d.version + 1, False, False
            return self.after_steps(now, d)
        a, slope, dt = self.c.decode_step_time(len(d.running), d.ctx), self.c.decode_ctx_s * len(d.running), now - d.t0
        # the smallest j with run_time(j) = j*a + slope*j*(j-1)/2 >= dt, then fixed up for rounding
        j = ceil((sqrt((a - slope / 2) ** 2 + 2 * slope * dt) - (a - slope / 2)) / slope) if slope > 0 else \
            (ceil(dt / a) if a > 0 else d.k)
        j = min(max(j, 1), d.k)
        while j > 1 and self.run_time(d, j - 1) >= dt:
            j -= 1
        while j < d.k and self.run_time(d, j) < dt:
            j += 1
        if j < d.k:
            d.k, d.version = j, d.version + 1
            self.push(d.t0 + self.run_time(d, j), self.end_steps, (d, d.version))

    def end_steps(self, now, arg) -> None:
        d, version = arg
        if version != d.version:
            return
        b, d.busy_time, d.busy, d.decoding = len(d.running), d.busy_time + self.run_time(d, d.k), False, False
        d.step_count, d.batch_sum = d.step_count + d.k, d.batch_sum + d.k * b
        d.steps, d.ctx = d.steps + d.k, d.ctx + d.k * b
        while d.running and d.running[0][0] <= d.steps:
            _, i = heapq.heappop(d.running)
            d.ctx -= self.prompt[i] + self.out[i]
            self.finish(now, d, i)
        self.after_steps(now, d)

    def result(self) -> SimResult:
        span = max(self.end - (self.arrival[0] if self.arrival else 0.0), 1e-12)
        util = lambda pool: sum(s.busy_time for s in pool) / (len(pool) * span)  # noqa: E731
        pools = {"colocated": util(self.pool)} if self.colo else {"prefill": util(self.pool), "decode": util(self.dpool)}
        steps = sum(s.step_count for s in self.dpool)
        tpot = np.where(np.asarray(self.out) > 1, (self.e2e - self.ttft) / np.maximum(np.asarray(self.out) - 1, 1), np.nan)
        return SimResult(self.ttft, tpot, self.e2e, *map(np.asarray, (self.cached, self.pidx, self.didx)), pools, span,
                         sum(s.batch_sum for s in self.dpool) / steps if steps else 0.0)
