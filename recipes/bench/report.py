"""Per-route metrics, the markdown table and the JSON file.

Why here: the numbers must mean the same thing for every route, so they are
computed in one place from the benchmark's own samples (client-side times,
token counts from the servers' ``meta_info``), never from a route's own
bookkeeping, except the adapter's TTFT when requests are not streamed (then
no client can see the first token; see :mod:`recipes.bench.routes`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from recipes.bench.cache_bound import CacheBound
from recipes.bench.runner import RunResult

#: Every metric each route reports, in table order (the JSON holds all of them).
METRICS = (
    "requests", "errors", "duration_s", "request_throughput", "output_throughput",
    "ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "tpot_p50", "tpot_p99",
    "cache_hit_ratio", "best_hit_ratio", "hit_ratio_of_best",
    "prompt_tokens", "cached_tokens", "completion_tokens", "best_cached_tokens", "tokenizer_prompt_tokens",
    "outside_cpu_cores", "ttft_method",
)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(result: RunResult, bound: CacheBound, ttft_method: str,
              ttft_override: list[float] | None = None) -> dict[str, Any]:
    """Every metric of :data:`METRICS` for one route's run.

    Parameters
    ----------
    bound
        The best achievable cache reuse, computed from this route's own prompts in send order.
    ttft_override
        TTFTs measured by the route itself (the adapter's prefill legs) when the client could not.
    """
    ok = [s for s in result.samples if s.error is None]
    ttfts = ttft_override if ttft_override is not None else [s.ttft for s in ok if s.ttft is not None]
    e2e = [s.e2e for s in ok]
    tpots = [s.tpot for s in ok if s.tpot is not None]
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached_tokens for s in ok)
    completion = sum(s.completion_tokens for s in ok)
    hit = cached / prompt if prompt else 0.0
    duration = result.duration
    return {
        "requests": len(result.samples),
        "errors": len(result.samples) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": completion / duration if duration else 0.0,
        "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
        "e2e_p50": _pct(e2e, 50), "e2e_p99": _pct(e2e, 99),
        "tpot_p50": _pct(tpots, 50), "tpot_p99": _pct(tpots, 99),
        "cache_hit_ratio": hit,
        "best_hit_ratio": bound.ratio,
        "hit_ratio_of_best": hit / bound.ratio if bound.ratio else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "best_cached_tokens": bound.best_cached_tokens,
        "ttft_method": ttft_method,
    }


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (topology, workload, route), over its repeats.

    Latency percentiles (TTFT, E2E, TPOT) are taken over the pooled requests of
    all repeats, which is steadier than a median of per-run percentiles on a
    noisy machine; ``errors`` is the total over repeats; every other metric is
    the median over repeats. Failed runs are left out.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if "metrics" in r:
            groups.setdefault((r["topology"], r["workload"], r["route"]), []).append(r)
    summary = []
    for (topology, workload, route), runs in groups.items():
        metrics: dict[str, Any] = {}
        for name in METRICS:
            values = [run["metrics"].get(name) for run in runs]
            numbers = [v for v in values if isinstance(v, (int, float))]
            if name == "errors":
                metrics[name] = sum(numbers)  # every failed request of every repeat shows
            elif numbers and all(isinstance(v, int) for v in numbers):
                metrics[name] = statistics.median_low(numbers)  # a count one run really had
            else:
                metrics[name] = statistics.median(numbers) if numbers else values[0]
        latencies = {k: [x for run in runs for x in run["latencies"][k]] for k in ("e2e", "ttft")}
        tpots = [(s["e2e"] - s["ttft"]) / (s["completion_tokens"] - 1) for run in runs for s in run["samples"]
                 if s["error"] is None and s["ttft"] is not None and s["completion_tokens"] > 1]
        for name, values in (("ttft", latencies["ttft"]), ("e2e", latencies["e2e"]), ("tpot", tpots)):
            metrics[f"{name}_p50"], metrics[f"{name}_p99"] = _pct(values, 50), _pct(values, 99)
        summary.append({"topology": topology, "workload": workload, "route": route, "repeats": len(runs),
                        "metrics": metrics, "latencies": latencies})
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (topology, workload, route); "outside CPU" is cores used by other people's processes."""
    header = ("| topology | workload | route | req/s | out tok/s | TTFT p50 / p99 (ms) | E2E p50 / p99 (s) "
              "| TPOT p50 (ms) | hit ratio | of best | errors | outside CPU |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['topology']} | {r['workload']} | {r['route']} | {m['request_throughput']:.2f} "
            f"| {m['output_throughput']:.0f} | {_ms(m['ttft_p50'])} / {_ms(m['ttft_p99'])} "
            f"| {_s(m['e2e_p50'])} / {_s(m['e2e_p99'])} | {_ms(m['tpot_p50'])} "
            f"| {_ratio(m['cache_hit_ratio'])} | {_ratio(m['hit_ratio_of_best'])} | {m['errors']} "
            f"| {'-' if m['outside_cpu_cores'] is None else format(m['outside_cpu_cores'], '.2f')} |"
        )
    return "\n".join(lines)


def overhead_table(overhead: dict[str, Any]) -> str:
    """The adapter's own cost per request, against direct calls of the same stub servers."""
    lines = ["| prompt chars | path | wall us/req | CPU us/req |", "|---|---|---|---|"]
    for case in overhead["cases"]:
        for path in ("adapter", "direct"):
            lines.append(f"| {case['prompt_chars']} | {path} | {case[path]['wall_us']:.1f} "
                         f"| {case[path]['cpu_us']:.1f} |")
        lines.append(f"| {case['prompt_chars']} | **added by the adapter** | {case['added_wall_us']:.1f} "
                     f"| {case['added_cpu_us']:.1f} |")
    routing = overhead.get("routing")
    if routing:
        lines += ["", f"Routing CPU per ~{routing['prompt_tokens']}-token prompt ({routing['method']}):", "",
                  "| index | prompts | routing CPU us/req | request CPU us/req |", "|---|---|---|---|"]
        lines += [f"| {c['index']} | {c['prompts']} | {c['routing_cpu_us']:.0f} | {c['request_cpu_us']:.0f} |"
                  for c in routing["cases"]]
    return "\n".join(lines)


def render(document: dict[str, Any]) -> str:
    """The markdown report: setup line, results table, how TTFT was measured, overhead, failures."""
    setup = document["setup"]
    repeats = max((r.get("repeats", 1) for r in document["summary"]), default=1)
    text = (f"Setup: {setup['date']}, {setup['machine']['cpus']} CPUs, sglang {setup['versions']['sglang']}, "
            f"sglang-router {setup['versions']['sglang-router']}, load {setup['load']}"
            + (f", {repeats} repeats (latency percentiles over all their requests, errors summed, other columns medians)"
               if repeats > 1 else ""))
    text += "\n\n" + markdown_table(document["summary"])
    methods = sorted({f"- {r['route']}: {r['metrics']['ttft_method']}" for r in document["summary"]})
    text += "\n\nTTFT measured as:\n" + "\n".join(methods)
    text += "\n\nNotes:\n" + "\n".join(f"- {note}" for note in setup.get("notes", []))
    if document.get("overhead"):
        text += "\n\nAdapter overhead (in-process stub servers):\n\n" + overhead_table(document["overhead"])
    for r in document["results"]:
        if "error" in r:
            text += f"\n\nFAILED {r['topology']} {r['workload']} {r['route']}: {r['error']}"
    return text


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
