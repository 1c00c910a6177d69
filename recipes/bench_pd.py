"""Benchmark the PD adapter against SGLang's own router, side by side, in one run.

Examples::

    # launch 2 prefill + 1 decode + 1 colocated server (tiny model, CPU) and benchmark
    python -m recipes.bench_pd --quick
    # the same on the prefill-bound random model, where cache hits show as latency
    python -m recipes.bench_pd --quick --model prefill-bound
    # servers already running
    python -m recipes.bench_pd --prefill http://127.0.0.1:30000 http://127.0.0.1:30010 \\
        --decode http://127.0.0.1:30020 --colocated http://127.0.0.1:30030

Routes (same prompts, same order, caches flushed before each): the adapter
(``PDBackend``) with its cache-aware prefill policy and with round robin;
sglang-router in PD mode with cache_aware and with round_robin; its Python
``--mini-lb`` (random); the colocated server alone. Topologies: the full pools
and 1 prefill + 1 decode. Workloads: shared-prefix, multi-turn, few-shot.

Writes ``bench_pd.json`` (every route x metric, per-request samples, the
adapter's routing reasons), ``bench_pd.md``, ``bench_pd.png`` and router logs into ``--out`` and
prints the table. See :mod:`recipes.bench` for the modules.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import sys
import threading
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path

import httpx

from backends import PREFILL_BOUND_MODEL, TINY_MODEL
from recipes.bench import overhead, report, suite, topology, workloads
from recipes.bench.plot import plot
from recipes.bench.router_process import PortPicker

#: Workload sizes: ``--quick`` finishes in about 2 minutes on 4 CPU servers; the default in about 15.
SIZES = {
    "full": dict(groups=8, per_group=8, prefix_len=1024, suffix_len=32, sessions=12, turns=4, turn_len=96,
                 system_len=16, fewshot_requests=48, fewshot_block=1536, question_len=32, output_len=32,
                 concurrency=8, overhead_requests=2000),
    "quick": dict(groups=3, per_group=4, prefix_len=256, suffix_len=16, sessions=4, turns=3, turn_len=48,
                  system_len=16, fewshot_requests=8, fewshot_block=384, question_len=16, output_len=8,
                  concurrency=4, overhead_requests=300),
}
WORKLOADS = ("shared-prefix", "multi-turn", "few-shot")
#: ``--model`` choices: the ``model_path`` each gives the launched servers.
LAUNCH_MODELS = {"tiny": TINY_MODEL, "prefill-bound": PREFILL_BOUND_MODEL}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.bench_pd", description=__doc__.split("\n\n")[0])
    servers = p.add_argument_group("servers (none given: launch 2P + 1D + 1 colocated on the --model)")
    servers.add_argument("--prefill", nargs="+", default=[], metavar="URL")
    servers.add_argument("--decode", nargs="+", default=[], metavar="URL")
    servers.add_argument("--colocated", nargs="+", default=[], metavar="URL")
    servers.add_argument("--base-port", type=int, default=35000, help="ports of launched servers (default 35000)")
    servers.add_argument("--pd-ratio", default="2:1", help="prefill:decode servers to launch (default 2:1)")
    servers.add_argument("--launch-colocated", type=int, default=1, help="colocated servers to launch (default 1)")
    servers.add_argument("--model", choices=sorted(LAUNCH_MODELS), default="tiny",
                         help="random model of launched servers: tiny (prefill nearly free) or prefill-bound "
                              "(~0.7 s per 1,000 prompt tokens on a core, so cache hits show as latency)")
    what = p.add_argument_group("what to run")
    what.add_argument("--topologies", nargs="+",
                      help="e.g. 2P1D 1P1D (default: the full pools, then 1P1D)")
    what.add_argument("--routes", nargs="+", choices=suite.ALL_ROUTES, default=list(suite.ALL_ROUTES))
    what.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    what.add_argument("--quick", action="store_true", help="tiny workloads (about 1-2 minutes on 4 CPU servers)")
    size = p.add_argument_group("workload sizes (defaults from --quick or the full preset)")
    for name in SIZES["full"]:
        size.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals/s (default inf)")
    load.add_argument("--no-stream", dest="stream", action="store_false",
                      help="non-streamed requests (routers then report no TTFT)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--clients", type=int, default=1,
                      help="client processes behind each adapter route, each with its own PDClient (default 1)")
    load.add_argument("--repeats", type=int, default=1,
                      help="make every run N times, PD routes in a rotated order; the table shows medians")
    p.add_argument("--router-port", type=int, default=36000, help="first port tried for routers")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--skip-overhead", action="store_true", help="skip the in-memory overhead measurement")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="only recompute the table and plot from a saved bench_pd.json")
    args = p.parse_args(argv)
    preset = SIZES["quick" if args.quick else "full"]
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.concurrency <= 0:
        args.concurrency = None  # no cap: open loop at --request-rate
    return args


def build_workloads(args: argparse.Namespace, tokenizer) -> list[workloads.Workload]:
    words = workloads.single_token_words(tokenizer)
    makers = {
        "shared-prefix": lambda: workloads.shared_prefix(
            words, groups=args.groups, per_group=args.per_group, prefix_len=args.prefix_len,
            suffix_len=args.suffix_len, output_len=args.output_len, seed=args.seed),
        "multi-turn": lambda: workloads.multi_turn(
            words, sessions=args.sessions, turns=args.turns, turn_len=args.turn_len, system_len=args.system_len,
            output_len=args.output_len, seed=args.seed),
        "few-shot": lambda: workloads.few_shot(
            words, requests=args.fewshot_requests, block_len=args.fewshot_block, question_len=args.question_len,
            output_len=args.output_len, seed=args.seed),
    }
    return [makers[name]() for name in args.workloads]


def load_tokenizer(servers: topology.Servers):
    """The served model's tokenizer when its folder is on this machine, else the tiny model's."""
    from transformers import AutoTokenizer

    from backends import ensure_tiny_model

    served = httpx.get(f"{servers.prefill[0]}/model_info", timeout=30.0, trust_env=False).json().get("model_path")
    path = served if served and Path(served).is_dir() else ensure_tiny_model()
    return AutoTokenizer.from_pretrained(path)


def setup_record(args: argparse.Namespace, servers: topology.Servers, topos, loads) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {pkg: version(pkg) for pkg in ("sglang", "sglang-router")},
        "servers": {"prefill": servers.prefill, "bootstrap_ports": servers.bootstrap_ports,
                    "decode": servers.decode, "colocated": servers.colocated,
                    "launched_model": None if args.prefill or args.decode else args.model},
        "topologies": [t.name for t in topos],
        "workloads": {w.name: {**w.shape, "requests": len(w.turns)} for w in loads},
        "load": {"concurrency": args.concurrency, "request_rate": args.request_rate, "stream": args.stream,
                 "client_processes": args.clients,
                 "seed": args.seed},
        "routes": args.routes,
        "notes": [
            "hit ratio: sum of meta_info.cached_tokens over sum of prompt_tokens (successful requests); "
            "'of best' divides it by best_hit_ratio",
            "best_hit_ratio: tokens a perfect single prompt cache would reuse for the same prompts in send order "
            "(capped at prompt-1 per request, prompts only: a colocated server also caches replies and can exceed it)",
            "router-cache-aware uses --decode-policy power_of_two (round_robin with one decode server, which the "
            "router requires); router-round-robin round_robin for both; "
            "mini-lb is random; adapter decode policy is LeastLoaded",
            "outside CPU: average cores used during the run by processes other than this bench, its routers and "
            "the benchmarked servers (other people's work on a shared machine); compare latencies only between "
            "runs with similar values",
            "every route gets the same prompts in the same order; all servers' caches are flushed before each run; "
            "chat turns carry the replies each route's servers returned",
        ],
    }


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks stop routers (they run in their own sessions)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    if threading.current_thread() is threading.main_thread():
        _exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    options = suite.SuiteOptions(stream=args.stream, concurrency=args.concurrency, request_rate=args.request_rate,
                                 seed=args.seed, ports=PortPicker(args.router_port),
                                 log_dir=args.out / "bench_pd-logs",
                                 routes=tuple(args.routes), repeats=max(args.repeats, 1),
                                 clients=max(args.clients, 1))
    with ExitStack() as stack:
        try:
            if args.prefill or args.decode:
                servers = topology.from_urls(args.prefill, args.decode, args.colocated)
            else:
                ratio = tuple(int(x) for x in args.pd_ratio.split(":"))
                print(f"[bench] launching {ratio[0]}P + {ratio[1]}D + {args.launch_colocated} colocated servers "
                      f"({args.model} model) from port {args.base_port} (1-2 minutes)", file=sys.stderr, flush=True)
                servers = stack.enter_context(topology.launched(ratio, args.launch_colocated, args.base_port,
                                                                LAUNCH_MODELS[args.model]))
            topos = topology.topologies(servers, args.topologies)
        except (ValueError, httpx.HTTPError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        tokenizer = load_tokenizer(servers)
        loads = build_workloads(args, tokenizer)
        render = lambda messages: tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, add_generation_prompt=True)
        runs = suite.plan(servers, topos, loads, options)
        results = suite.run_all(servers, runs, tokenizer, render, options)
    measured = None if args.skip_overhead else {**overhead.measure(args.overhead_requests),
                                                "routing": overhead.measure_routing(min(args.overhead_requests, 300))}
    document = {"setup": setup_record(args, servers, topos, loads), "summary": report.aggregate(results),
                "results": results, "overhead": measured}
    return _write(document, args.out)


def _write(document: dict, out: Path) -> int:
    """Write the JSON, markdown and plot of ``document``; print the table. Exit code 1 if a run failed."""
    report.write_json(out / "bench_pd.json", document)
    if document["summary"]:
        plot(document["summary"], out / "bench_pd.png")
    text = report.render(document)
    (out / "bench_pd.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    written = ", ".join(str(out / name) for name in ("bench_pd.json", "bench_pd.md", "bench_pd.png"))
    print(f"\n[bench] wrote {written}", file=sys.stderr)
    return 1 if any("error" in r for r in document["results"]) else 0


def rerender(path: Path, out: Path) -> int:
    """Recompute the summary, table and plot from a saved ``bench_pd.json`` (no servers needed)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    document["summary"] = report.aggregate(document["results"])
    out.mkdir(parents=True, exist_ok=True)
    return _write(document, out)


if __name__ == "__main__":
    sys.exit(main())
