"""What the routing simulation compares, and what it reports per setup and workload.

The setups are the three ways a fleet of client processes can place prefills (the adapter's
options, and a single sglang-router process), plus the cache-blind baseline; the result holds
the two questions asked of them: how close to the best achievable cache hit ratio, and how many
copies of each prefix the servers end up holding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backends.adapter._policies import CacheAware, LoadGuard, Policy, PrefillCost, RoundRobin

__all__ = ["RoutingSetup", "ROUTING_SETUPS", "RoutingSimResult"]


@dataclass(frozen=True)
class RoutingSetup:
    """How clients route: on what they know (``events``), whether they share one router, which policy.

    Attributes
    ----------
    events
        Each client routes on the servers' KV events and published loads (plus its own claims);
        else on its own approximate record and in-flight counts.
    shared
        One router for every client: a single router process (its record and in-flight counts
        see all traffic), as sglang-router.
    policy
        Makes the prefill policy (one per router).
    """

    name: str
    events: bool
    shared: bool
    policy: Callable[[], Policy]
    description: str = ""


#: The setups compared. ``router`` stands for one sglang-router 0.3.2 ``cache_aware`` process
#: (``cache_threshold`` 0.3: below that match ratio the smallest tree; ``balance_abs`` 64 /
#: ``balance_rel`` 1.5 on in-flight counts), approximated by the adapter's own objects: its tree
#: is a ``PrefixIndex`` (32-character blocks, not characters), and ``LoadGuard`` compares the
#: pick's load with the least loaded server where sglang-router compares the most and the least.
ROUTING_SETUPS: dict[str, RoutingSetup] = {s.name: s for s in (
    RoutingSetup("events", True, False, PrefillCost,
                 "per client: token index from KV events + own claims, published loads, PrefillCost"),
    RoutingSetup("approximate", False, False, PrefillCost,
                 "per client: own PrefixIndex of what it sent + own in-flight counts, PrefillCost"),
    RoutingSetup("approximate-guard", False, False, lambda: LoadGuard(CacheAware()),
                 "per client: own PrefixIndex + in-flight counts, LoadGuard(CacheAware())"),
    RoutingSetup("router", False, True, lambda: LoadGuard(CacheAware(min_match_ratio=0.3)),
                 "one shared router (sglang-router cache_aware): PrefixIndex + in-flight counts of all traffic"),
    RoutingSetup("round-robin", False, False, RoundRobin, "per client round robin: the cache-blind baseline"),
)}


@dataclass(frozen=True)
class RoutingSimResult:
    """What one setup achieved on one workload.

    Attributes
    ----------
    hit_ratio, best_hit_ratio
        Prompt tokens found cached over all prompt tokens; the same with each distinct prefix
        computed once (:attr:`RoutingWorkload.best_cached`).
    servers_per_prefix
        Mean over prefix groups with two or more requests (shared-prefix groups, chat sessions,
        the few-shot block) of the prefill servers that prefilled one of them, so held its prefix.
    duplication
        Tokens cached on all servers at the end over distinct tokens among them (1: no copies).
    ttft_s
        Per request: arrival to the KV at decode (request overhead, queue, forward, transfer).
    utilisation
        Prefill busy time over servers x makespan.
    unused_servers
        Prefill servers that were sent nothing (a placement rule that never picks them).
    rules
        Prefill placements per policy rule (``prefix_match``, ``new_prefix``, ...).
    """

    setup: str
    workload: str
    prefill: int
    clients: int
    hit_ratio: float
    best_hit_ratio: float
    servers_per_prefix: float
    duplication: float
    ttft_s: np.ndarray = field(repr=False)
    utilisation: float = 0.0
    unused_servers: int = 0
    evicted_tokens: int = 0
    rules: dict[str, int] = field(default_factory=dict)

    @property
    def of_best(self) -> float:
        return self.hit_ratio / self.best_hit_ratio if self.best_hit_ratio else float("nan")

    def summary(self) -> dict:
        """The numbers as plain JSON types."""
        return {"setup": self.setup, "workload": self.workload, "prefill": self.prefill, "clients": self.clients,
                "hit_ratio": self.hit_ratio, "best_hit_ratio": self.best_hit_ratio, "of_best": self.of_best,
                "servers_per_prefix": self.servers_per_prefix, "duplication": self.duplication,
                "ttft_p50_s": float(np.percentile(self.ttft_s, 50)), "ttft_p99_s": float(np.percentile(self.ttft_s, 99)),
                "prefill_utilisation": self.utilisation, "unused_servers": self.unused_servers,
                "evicted_tokens": self.evicted_tokens, "rules": dict(self.rules)}
