"""Benchmark of the PD adapter against SGLang's own router (``python -m recipes.bench_pd``).

Modules, one concern each:

- :mod:`recipes.bench.workloads`: seeded shared-prefix, multi-turn and few-shot workloads.
- :mod:`recipes.bench.cache_bound`: the cache hit ratio a perfect single cache would reach.
- :mod:`recipes.bench.routes`: the ways a request reaches the servers (adapter, plain HTTP to a router or server).
- :mod:`recipes.bench.router_process`: sglang-router and its mini-lb as processes started per run.
- :mod:`recipes.bench.runner`: sending one workload through one route (arrivals, concurrency, turn order).
- :mod:`recipes.bench.suite`: every (topology, workload, route) run, each starting cold.
- :mod:`recipes.bench.contention`: CPU used by other people's processes during each run.
- :mod:`recipes.bench.report`: per-route metrics, the markdown table and the JSON file.
- :mod:`recipes.bench.plot`: the PNG of latency distributions and hit ratios.
- :mod:`recipes.bench.overhead`: the adapter's own CPU and latency cost, on in-memory stub servers.
- :mod:`recipes.bench.topology`: which servers the bench runs on (given, or launched).
"""
