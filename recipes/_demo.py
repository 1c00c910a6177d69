"""The demo workload of ``pd_demo`` and ``pd_server --demo``, and how its timings are printed.

Why one module: both recipes launch a cluster, run the same three kinds of
traffic through ``PDBackend(**cluster.urls())`` (one request, a ``run_batch`` of 8, one
streamed generation) and print the same per-request lines and summary, read
from the backend's own ``metrics.records()``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backends import ClusterStartError, PDBackend, PDCluster, RequestRecord, SGLangPDConfig
from sgl_programs import chat_completion, run_batch_collected, stream_text

TINY_MODEL_NOTE = ("NOTE: the model is the random tiny test model: its text is nonsense, "
                   "but the serving path (tokenizer, scheduler, KV transfer) and the timings are real.")

_SINGLE = "Explain in one paragraph why prefill and decode run on separate servers."
_BATCH = [
    "What is a KV cache?", "Why is decoding memory-bound?", "What does a prefill server compute?",
    "How does the KV cache move to the decode server?", "What is time to first token?",
    "Why batch decode requests?", "What is prefix caching?", "When is colocated serving better?",
]
_STREAM = "Tell a short story about a lighthouse keeper who counts ships."


def launch_and_run(config: SGLangPDConfig, *, max_tokens: int, json_path: str | None,
                   log_dir: str | None = None) -> int:
    """Launch ``config``, run the demo workload, print the report, stop everything.

    Returns the process exit code (0 ok, 1 start-up or request failure, 130 Ctrl-C).
    """
    if config.is_tiny_model:
        print(TINY_MODEL_NOTE)
    cluster = PDCluster(config, log_dir=log_dir)
    print(f"Launching {config.num_prefill} prefill + {config.num_decode} decode server(s) "
          f"on {config.resolved_device()} (base port {config.base_port}); logs in {cluster.log_dir}", flush=True)
    started = time.monotonic()
    try:
        with cluster:
            startup = time.monotonic() - started
            print(f"All {len(cluster.servers)} servers healthy after {startup:.1f} s.", flush=True)
            with PDBackend(**cluster.urls()) as backend:
                report = run_workload(backend, max_tokens=max_tokens)
    except ClusterStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; all servers stopped.")
        return 130
    print("All servers stopped.")
    report = {"model": cluster.servers[0].model_path, "tiny_model": config.is_tiny_model,
              "pd_ratio": list(config.pd_ratio), "startup_seconds": round(startup, 2), **report}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"Wrote {json_path}")
    return 0 if report["errors"] == 0 else 1


def run_workload(backend: PDBackend, *, max_tokens: int) -> dict[str, Any]:
    """One request, a batch of 8 and one stream through ``backend``; print each request's timings."""
    metrics_before = len(backend.metrics.records())
    print("\n=== 1 request ===")
    state = chat_completion.run(messages=[{"role": "user", "content": _SINGLE}], max_tokens=max_tokens, backend=backend)
    if state.error() is None:
        print(f"reply: {state['reply']!r}")
    _print_records(backend.metrics.records()[metrics_before:], first_number=1)

    print(f"\n=== run_batch of {len(_BATCH)} ===", flush=True)
    mark = len(backend.metrics.records())
    items = [{"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens} for q in _BATCH]
    batch = run_batch_collected(chat_completion, items, backend=backend, num_threads=len(items))
    for index, error in batch.errors:
        print(f"item {index} failed: {error}")
    _print_records(backend.metrics.records()[mark:], first_number=mark - metrics_before + 1)

    print("\n=== streamed generation ===")
    mark = len(backend.metrics.records())
    stream = stream_text(chat_completion, "reply", messages=[{"role": "user", "content": _STREAM}],
                         max_tokens=max_tokens, backend=backend)
    try:
        for chunk in stream:
            print(chunk, end="", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, counted as an error below
        print(f"\nstream failed: {exc}")
    print()
    _print_records(backend.metrics.records()[mark:], first_number=mark - metrics_before + 1)

    records = backend.metrics.records()[metrics_before:]
    summary = summarize(records)
    summary["kv_transfer"] = backend.client.transfer_stats()["all"]
    print_summary(summary)
    return {"summary": summary, "errors": sum(r.error is not None for r in records),
            "records": [r.as_dict() for r in records]}


def _print_records(records: list[RequestRecord], first_number: int) -> None:
    for number, r in enumerate(records, start=first_number):
        if r.error is not None:
            print(f"Request {number} ({r.kind}) FAILED: {r.error}")
            continue
        if r.mode == "pd":
            print(f"Request {number} ({r.kind}): {r.prompt_tokens} prompt tokens, {r.cached_tokens} cached")
            print(f"  [Prefill] {r.prefill} ... Complete in {_seconds(r.prefill_latency)}")
            print(f"  [Decode] Generating {r.completion_tokens} tokens on {r.decode} ... "
                  f"Complete in {_seconds(r.decode_time)}")
        else:
            print(f"Request {number} ({r.kind}) on colocated {r.colocated}: "
                  f"{r.completion_tokens} tokens in {_seconds(r.total)}")
        print(f"  total {_seconds(r.total)}")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Average prefill, decode and total time of the successful PD requests, and their shares."""
    pd = [r for r in records if r.error is None and r.mode == "pd"
          and r.prefill_latency is not None and r.decode_time is not None]
    if not pd:
        return {"requests": 0}
    prefill = sum(r.prefill_latency for r in pd)
    decode = sum(r.decode_time for r in pd)
    total = sum(r.total for r in pd)
    return {
        "requests": len(pd),
        "completion_tokens": sum(r.completion_tokens for r in pd),
        "avg_prefill_s": statistics.fmean(r.prefill_latency for r in pd),
        "avg_decode_s": statistics.fmean(r.decode_time for r in pd),
        "avg_total_s": statistics.fmean(r.total for r in pd),
        "prefill_pct": 100.0 * prefill / total,
        "decode_pct": 100.0 * decode / total,
        "other_pct": 100.0 * max(total - prefill - decode, 0.0) / total,
    }


def print_summary(summary: dict[str, Any]) -> None:
    """The ``BENCHMARK SUMMARY`` block."""
    print("\n" + "=" * 50 + "\nBENCHMARK SUMMARY\n" + "=" * 50)
    if not summary["requests"]:
        print("No successful PD request to summarize.")
        return
    print(f"Requests:            {summary['requests']} ({summary['completion_tokens']} tokens generated)")
    print(f"Average prefill:     {summary['avg_prefill_s']:.3f}s")
    print(f"Average decode:      {summary['avg_decode_s']:.3f}s")
    print(f"Average total:       {summary['avg_total_s']:.3f}s")
    print("Time distribution:")
    print(f"  prefill {summary['prefill_pct']:5.1f}%   decode {summary['decode_pct']:5.1f}%   "
          f"client/other {summary['other_pct']:5.1f}%")
    transfer = summary.get("kv_transfer") or {}
    if transfer.get("transfers"):  # the servers' own measure (SGLang's --enable-metrics), since they started
        print(f"KV transfer:         {transfer['mean_latency_ms']:.1f} ms average over {transfer['transfers']} "
              f"transfers, {transfer['mean_speed_gb_s']:.3f} GB/s; failed: {transfer['transfer_failed']} "
              f"transfers, {transfer['bootstrap_failed']} bootstraps (inside the prefill time above)")
    else:
        print("KV transfer:         not measured (servers without --enable-metrics)")
