"""Scale past this machine by simulation: the adapter's real routing against many simulated prefill servers.

Example (16 prefill servers, 16 client processes, the benchmark's three workloads)::

    python -m recipes.sim_routing --prefill 16 --clients 16 --requests 4000 --json sim_routing.json

Every client process is the adapter's own ``Router`` with its real policies and indexes; the
prefill servers are simulated (a radix cache over token ids that publishes SGLang's KV events,
a FIFO prefill queue timed by the H200 Llama-8B cost model, ``CostModel.h200_llama8b``, from
the project's ``h200-llama8b-eager-costs.json``). Setups (``--setups``):

- ``events``: each client routes on a token index fed by the servers' KV events (plus its own
  claims) and the servers' published loads, with ``PrefillCost`` (the adapter's default);
- ``approximate``: each client on its own record of what it sent where (``PrefixIndex``, text
  of 4 characters per token) and its own in-flight counts, ``PrefillCost``;
- ``approximate-guard``: the same with ``LoadGuard(CacheAware())``;
- ``router``: one shared sglang-router-like router (``LoadGuard(CacheAware(0.3))``, one
  ``PrefixIndex`` and in-flight count for all traffic);
- ``round-robin``: cache-blind baseline.

Prints per workload and setup: cache hit ratio against the best achievable (each distinct prefix
computed once), prefill servers holding each shared prefix, cached tokens over distinct tokens,
simulated TTFT p50/p99, prefill utilisation and servers never sent anything; ``--json`` writes
the same and the placements per policy rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from backends.planner import BENCHMARK_SHAPES, ROUTING_SETUPS, CostModel, routing_workload, simulate_routing

COSTS = {"h200-llama8b": lambda: CostModel.h200_llama8b("eager"),
         "h200-llama8b-bound": lambda: CostModel.h200_llama8b("bound")}
DEFAULT_SETUPS = ["events", "approximate", "approximate-guard", "router", "round-robin"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.sim_routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", type=int, default=16, help="simulated prefill servers (default 16)")
    p.add_argument("--clients", type=int, default=16, help="client processes, each with its own router (default 16)")
    p.add_argument("--workloads", nargs="+", default=list(BENCHMARK_SHAPES), choices=list(BENCHMARK_SHAPES))
    p.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, choices=list(ROUTING_SETUPS))
    p.add_argument("--requests", type=int, default=4000, help="requests per workload (default 4000)")
    p.add_argument("--utilisation", type=float, default=0.7,
                   help="arrival rate chosen to keep the servers this busy with perfect routing (default 0.7)")
    p.add_argument("--page-size", type=int, default=16, help="servers' page size, tokens (default 16)")
    p.add_argument("--capacity", type=int, help="radix cache tokens per server (default: the cost model's KV pool)")
    p.add_argument("--event-lag", type=float, default=0.005, help="KV event / load delivery delay, s (default 0.005)")
    p.add_argument("--costs", default="h200-llama8b", help="h200-llama8b (eager fit), h200-llama8b-bound, or a "
                   "CostModel JSON file")
    p.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                   help="override a workload parameter where the workload has it, e.g. groups=32 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.prefill, args.clients, args.requests, args.page_size) < 1 or not 0 < args.utilisation < 1.5:
        p.error("--prefill, --clients, --requests and --page-size must be >= 1, --utilisation within (0, 1.5)")
    try:
        args.shape = {k: int(v) for k, v in (s.split("=", 1) for s in args.shape)}
    except ValueError:
        p.error(f"--shape takes KEY=INTEGER, got {args.shape}")
    return args


def _costs(spec: str) -> CostModel:
    return COSTS[spec]() if spec in COSTS else CostModel.from_json(spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    costs = _costs(args.costs)
    rows, workloads = [], {}
    started = time.process_time()
    print(f"{args.prefill} prefill servers, {args.clients} clients, {args.requests} requests per workload, "
          f"page {args.page_size}, costs: {costs.source}")
    header = (f"{'workload':14s} {'setup':18s} {'hit':>6s} {'best':>6s} {'of best':>7s} {'srv/prefix':>10s} "
              f"{'dup':>5s} {'TTFT p50':>9s} {'p99':>8s} {'util':>5s} {'unused':>6s}")
    print(header)
    print("-" * len(header))
    for name in args.workloads:
        shape = {k: v for k, v in args.shape.items() if k in BENCHMARK_SHAPES[name]}
        w = routing_workload(name, args.requests, prefill=args.prefill, utilisation=args.utilisation, costs=costs,
                             page_size=args.page_size, seed=args.seed, **shape)
        workloads[name] = {"shape": w.shape, "rate": w.rate, "best_hit_ratio": w.best_hit_ratio,
                           "prompt_tokens": w.prompt_tokens}
        for setup in args.setups:
            r = simulate_routing(w, setup, prefill=args.prefill, clients=args.clients, costs=costs,
                                 capacity_tokens=args.capacity, event_lag_s=args.event_lag, seed=args.seed)
            s = r.summary()
            rows.append(s)
            print(f"{name:14s} {setup:18s} {s['hit_ratio']:6.3f} {s['best_hit_ratio']:6.3f} {s['of_best']:7.3f} "
                  f"{s['servers_per_prefix']:10.2f} {s['duplication']:5.2f} {s['ttft_p50_s'] * 1e3:7.1f}ms "
                  f"{s['ttft_p99_s'] * 1e3:6.1f}ms {s['prefill_utilisation']:5.2f} {s['unused_servers']:6d}", flush=True)
    print(f"({time.process_time() - started:.0f} s CPU; hit = cached / prompt tokens; srv/prefix = prefill servers "
          f"that held each shared prefix; dup = cached tokens / distinct cached tokens; util = prefill busy share; "
          f"unused = prefill servers sent nothing)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "prefill": args.prefill,
                       "clients": args.clients, "page_size": args.page_size, "event_lag_s": args.event_lag,
                       "capacity_tokens": args.capacity or costs.kv_capacity_tokens, "costs": costs.source,
                       "workloads": workloads, "results": rows}, out, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
