"""Every (topology, workload, route) run of one invocation, each starting cold.

Why one loop owns this: fairness rules live here. Each run gets the same
prompts in the same order, every server's radix cache is flushed before it,
its route is built (a router process launched, an adapter created) just for
it and torn down after it, so no route inherits another's cache or state.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from recipes.bench.cache_bound import best_achievable, token_ids
from recipes.bench.client_pool import ClientPoolRoute
from recipes.bench.contention import OutsideLoad
from recipes.bench.report import summarize
from recipes.bench.router_process import PortPicker, RouterRoute
from recipes.bench.routes import AdapterRoute, HttpRoute
from recipes.bench.runner import flush_caches, run_workload
from recipes.bench.topology import Servers, Topology
from recipes.bench.workloads import Render, Workload

PD_ROUTES = ("adapter-cache-aware", "adapter-approximate", "adapter-round-robin", "router-cache-aware",
             "router-round-robin", "mini-lb")
ALL_ROUTES = (*PD_ROUTES, "colocated")


@dataclass
class SuiteOptions:
    """How every route is driven (the same for all of them).

    Attributes
    ----------
    stream
        Send ``stream: true`` everywhere (TTFT measured at the client).
    concurrency, request_rate
        Cap on requests in flight (``None``: none) and Poisson arrival rate (``inf``: closed loop).
    ports
        Where routers get their ports.
    routes, repeats
        Route names to run, and how many times the whole plan is made.
    clients
        Client processes behind each adapter route (each with its own
        ``PDClient``, requests spread over them in turn); routers are one
        process whatever the number of callers.
    """

    stream: bool = True
    concurrency: int | None = 8
    request_rate: float = math.inf
    seed: int = 0
    ports: PortPicker = field(default_factory=lambda: PortPicker(36000))
    log_dir: Path = Path("bench-out/bench_pd-logs")
    routes: tuple[str, ...] = ALL_ROUTES
    repeats: int = 1
    clients: int = 1


@dataclass(frozen=True)
class Run:
    """One run to make: a route (built by ``factory``) on a topology for a workload, in repeat ``repeat``."""

    topology: str
    workload: Workload
    factory: Callable[[], Any]
    repeat: int = 0


def make_route(name: str, topology: Topology, options: SuiteOptions, label: str):
    """A route (not yet opened) named ``name`` on the servers of ``topology``."""
    prefill, decode = list(topology.prefill), list(topology.decode)
    if name.startswith("adapter-"):
        policy = "round_robin" if name.endswith("round-robin") else "cache_aware"
        kv_events = name != "adapter-approximate"  # the adapter's record of what it sent, as before KV events
        if options.clients > 1:
            return ClientPoolRoute(name, prefill, decode, policy, options.clients, kv_events=kv_events)
        return AdapterRoute(name, prefill, decode, policy, kv_events=kv_events)
    args = ["--pd-disaggregation"]
    for url, port in zip(prefill, topology.bootstrap_ports):
        args += ["--prefill", url, str(port)]
    for url in decode:
        args += ["--decode", url]
    # power_of_two is the closest to the adapter's least-loaded decode choice; the router refuses it with one decode.
    load_aware = "power_of_two" if len(decode) >= 2 else "round_robin"
    args += {
        "router-cache-aware": ["--prefill-policy", "cache_aware", "--decode-policy", load_aware, "--log-level", "warn"],
        "router-round-robin": ["--prefill-policy", "round_robin", "--decode-policy", "round_robin", "--log-level", "warn"],
        "mini-lb": ["--mini-lb"],
    }[name]
    return RouterRoute(name, args, options.ports, options.log_dir / label)


def plan(servers: Servers, topologies: list[Topology], workloads: list[Workload], options: SuiteOptions) -> list[Run]:
    """PD routes on each topology for each workload, then the colocated server alone per workload.

    With ``repeats`` > 1 the whole plan is made again, the PD routes' order
    rotated each time, so no route always runs first (or last) under
    whatever else the machine is doing.
    """
    runs = []
    pd_names = [n for n in PD_ROUTES if n in options.routes]
    for repeat in range(options.repeats):
        order = pd_names[repeat % len(pd_names):] + pd_names[: repeat % len(pd_names)] if pd_names else []
        for topology in topologies:
            for workload in workloads:
                for name in order:
                    label = f"{topology.name}-{workload.name}" + (f"-r{repeat}" if options.repeats > 1 else "")

                    def factory(topology=topology, name=name, label=label):
                        return make_route(name, topology, options, label)
                    runs.append(Run(topology.name, workload, factory, repeat))
        if "colocated" in options.routes and servers.colocated:
            for workload in workloads:
                runs.append(Run("colocated", workload, lambda: HttpRoute("colocated", servers.colocated[0]), repeat))
    return runs


def run_all(servers: Servers, runs: list[Run], tokenizer: Any, render: Render, options: SuiteOptions) -> list[dict]:
    """Make every run; one result entry each (with ``error`` set when the route could not run).

    The routers of one (repeat, topology, workload) group are launched together
    before its first run (their start-up is mostly Python imports, so this
    halves the waiting) and each is stopped right after its own run; every
    route still starts cold, since an idle router holds no state.
    """
    results = []
    outside = OutsideLoad(servers.all_urls)
    groups = [list(g) for _, g in itertools.groupby(runs, key=lambda r: (r.repeat, r.topology, r.workload.name))]
    with tqdm(total=sum(len(r.workload.turns) for r in runs), unit="req", dynamic_ncols=True) as bar:
        for group in groups:
            routes = [item.factory() for item in group]
            try:
                for route in routes:
                    if hasattr(route, "launch"):
                        route.launch()
                for item, route in zip(group, routes):
                    results.append(_run_one(item, route, servers, tokenizer, render, options, outside, bar))
            finally:
                for route in routes:
                    route.close()
    flush_caches(servers)
    return results


def _run_one(item: Run, route, servers: Servers, tokenizer: Any, render: Render, options: SuiteOptions,
             outside: OutsideLoad, bar: tqdm) -> dict:
    label = f"{item.topology} {item.workload.name} {route.name}"
    bar.set_description(label)
    entry: dict[str, Any] = {"topology": item.topology, "workload": item.workload.name,
                             "route": route.name, "repeat": item.repeat}
    try:
        flush_caches(servers)
        route.open()
        try:
            outside.start(getattr(route, "sessions", set()))
            run = run_workload(item.workload, route, render=render, stream=options.stream,
                               concurrency=options.concurrency, request_rate=options.request_rate,
                               seed=options.seed, on_done=lambda: bar.update(1))
            outside_cores = outside.stop()
            diagnostics = route.diagnostics()
        finally:
            route.close()
    except Exception as exc:  # noqa: BLE001 - one broken route must not hide the others' numbers
        entry["error"] = f"{type(exc).__name__}: {exc}"
        tqdm.write(f"[bench] {label} failed: {entry['error']}")
        return entry
    errors = [s.error for s in run.samples if s.error]
    if errors:
        tqdm.write(f"[bench] {label}: {len(errors)} errors, first: {errors[0][:300]}")
    return _entry(entry, run, diagnostics, route, tokenizer, options, outside_cores)


def _entry(entry: dict, run, diagnostics: dict, route, tokenizer: Any, options: SuiteOptions,
           outside_cores: float | None) -> dict:
    ok = [s for s in run.samples if s.error is None]
    bound = best_achievable(token_ids(tokenizer, [s.prompt for s in ok]))
    override = diagnostics.get("metrics_ttft") if not options.stream else None
    entry["metrics"] = summarize(run, bound, route.ttft_method(options.stream), ttft_override=override)
    entry["metrics"]["tokenizer_prompt_tokens"] = bound.prompt_tokens
    entry["metrics"]["outside_cpu_cores"] = outside_cores
    entry["latencies"] = {"e2e": [s.e2e for s in ok],
                          "ttft": override if override is not None else [s.ttft for s in ok if s.ttft]}
    entry["samples"] = [{k: v for k, v in vars(s).items() if k != "prompt"} for s in run.samples]
    entry["diagnostics"] = diagnostics
    return entry
