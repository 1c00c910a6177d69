"""What a dead server costs a request: this adapter against SGLang's router, on the same servers.

Runs one workload through each route while the first prefill server is
SIGKILLed mid-run, then restarts it; then kills the decode server under a
long request. Reports per route: requests completed and failed, the latency
of the requests that were in flight on the dead server (against the
no-failure baseline), how long a request on a dead decode server takes to
fail, and how long a restarted server takes to serve again. Then the faults
that do not kill cleanly: the first prefill server SIGSTOPped (frozen) for
``--freeze-s`` seconds mid-run (this adapter with and without hedged
requests, and the router), a poison request (an empty prompt, which crashes
SGLang 0.5.23's CPU prefill) sent in the middle of a run, and a prefill
server crashing with the cluster's supervisor on (seconds until it serves
again).

Example::

    python -m recipes.bench_failover --requests 48 --concurrency 16 --out bench-out/failover.json

It launches its own 2 prefill + 1 decode servers (it kills them, so it never
uses servers it did not start).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx

from backends import HedgePolicy, PDBackend, PDCluster, SGLangPDConfig, Timeouts
from backends import RouterProcess, router_argv

Send = Callable[[dict], dict]


def _body(i: int, max_tokens: int) -> dict:
    return {"text": f"Failover probe {i}: list the entries of ledger {i % 13}.",
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}


def _timed(send: Send, body: dict) -> dict:
    started = time.monotonic()
    try:
        send(body)
        return {"start": started, "end": time.monotonic(), "ok": True}
    except Exception as exc:  # noqa: BLE001 - every outcome is data here
        return {"start": started, "end": time.monotonic(), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _run(send: Send, count: int, concurrency: int, max_tokens: int, kill: Callable[[], None] | None) -> dict:
    """Send ``count`` requests; if ``kill`` is given, call it once a quarter have finished."""
    done = threading.Event()
    finished = []
    killed_at: list[float] = []

    def one(i: int) -> dict:
        result = _timed(send, _body(i, max_tokens))
        finished.append(result)
        if kill is not None and len(finished) >= count // 4 and not done.is_set():
            done.set()
            killed_at.append(time.monotonic())
            kill()
        return result

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    latencies = sorted(r["end"] - r["start"] for r in results if r["ok"])
    summary = {"completed": sum(r["ok"] for r in results), "failed": sum(not r["ok"] for r in results),
               "p50_s": statistics.median(latencies) if latencies else None,
               "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
               "max_s": max(latencies) if latencies else None,
               "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}
    if killed_at:
        hit = [r["end"] - r["start"] for r in results if r["start"] <= killed_at[0] <= r["end"]]
        summary["in_flight_at_kill"] = len(hit)
        summary["in_flight_at_kill_max_s"] = max(hit) if hit else None
    return summary


def _decode_kill(send: Send, cluster: PDCluster, cap: float) -> dict:
    """Seconds from killing the decode server to the long request's error (capped)."""
    outcome: dict = {}
    body = {"text": "A very long story.", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    worker = threading.Thread(target=lambda: outcome.update(_timed(send, body)), daemon=True)
    worker.start()
    time.sleep(3.0)
    if not worker.is_alive():
        return {"seconds_to_error": None, "note": f"failed before the kill: {outcome.get('error')}"}
    killed = time.monotonic()
    cluster.kill("decode", 0)
    worker.join(timeout=cap)
    if worker.is_alive():
        return {"seconds_to_error": None, "note": f"no answer within {cap:.0f} s"}
    return {"seconds_to_error": round(outcome["end"] - killed, 2), "ok": outcome["ok"], "error": outcome.get("error")}


def _seconds_until_served(send: Send, cap: float) -> float | None:
    """After a restart: seconds until a request through the route succeeds again."""
    started = time.monotonic()
    while time.monotonic() - started < cap:
        if _timed(send, _body(0, 2))["ok"]:
            return round(time.monotonic() - started, 2)
        time.sleep(0.5)
    return None


def _frozen(send: Send, cluster: PDCluster, args: argparse.Namespace) -> dict:
    """The workload while prefill-0 is SIGSTOPped for ``--freeze-s`` seconds (from a quarter done)."""
    resume = threading.Timer(args.freeze_s, lambda: cluster.kill("prefill", 0, signal.SIGCONT))

    def freeze() -> None:
        cluster.kill("prefill", 0, signal.SIGSTOP)
        resume.start()

    try:
        return _run(send, args.requests, args.concurrency, args.max_tokens, freeze)
    finally:
        resume.cancel()
        cluster.kill("prefill", 0, signal.SIGCONT)
        _wait_all_healthy(cluster, args.cap)


def _poisoned(send: Send, cluster: PDCluster, args: argparse.Namespace) -> dict:
    """A run with one empty-prompt request in its middle: its outcome, and the servers it cost."""
    before = len(cluster.restarts())
    poison: dict = {}
    _seconds_until_served(send, args.cap)  # the route serves before the run starts

    def with_poison() -> None:
        poison.update(_timed(send, {"text": "", "sampling_params": {"max_new_tokens": 4}}))

    result = _run(send, args.requests, args.concurrency, args.max_tokens, with_poison)
    time.sleep(2.0)  # a crash takes a moment to show as an exit
    lost = sorted({e.server for e in cluster.restarts()[before:]} | set(cluster.exited()))
    result["poison"] = {"ok": poison.get("ok"), "seconds": round(poison["end"] - poison["start"], 2) if poison else None,
                        "error": poison.get("error", "")[:160], "servers_lost": lost}
    _wait_all_healthy(cluster, args.cap)
    return result


def _crash_restarted(backend: PDBackend, cluster: PDCluster, cap: float) -> dict:
    """SIGKILL prefill-0 behind the supervisor's back (a crash): seconds until the adapter uses it again."""
    victim, crashed = cluster.prefill_urls[0], time.monotonic()
    os.killpg(cluster.pid("prefill", 0), signal.SIGKILL)
    seen_down = False
    while time.monotonic() - crashed < cap:
        state = backend.client.health()[victim]
        seen_down = seen_down or not state["healthy"]
        if seen_down and state["healthy"]:
            return {"serving_again_s": round(time.monotonic() - crashed, 1)}
        _timed(backend.client.request, _body(0, 2))  # traffic: the adapter notices the death on a request
        time.sleep(0.2)
    return {"serving_again_s": None}


def _wait_all_healthy(cluster: PDCluster, cap: float) -> None:
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        try:
            if all(httpx.get(f"{u}/health", timeout=2, trust_env=False).status_code == 200
                   for u in cluster.prefill_urls + cluster.decode_urls):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _adapter_route(cluster: PDCluster, args: argparse.Namespace) -> dict:
    backend = PDBackend(**cluster.urls(), timeouts=Timeouts(connect=2.0, total=600.0), probe_interval=0.5)
    try:
        result = {"baseline": _run(backend.client.request, args.requests, args.concurrency, args.max_tokens, None)}
        result["prefill_killed"] = _run(backend.client.request, args.requests, args.concurrency, args.max_tokens,
                                        lambda: cluster.kill("prefill", 0))
        cluster.restart("prefill", 0)
        healthy_at, victim = time.monotonic(), cluster.prefill_urls[0]
        while not backend.client.health()[victim]["healthy"]:
            time.sleep(0.1)
        result["back_in_rotation_after_healthy_s"] = round(time.monotonic() - healthy_at, 2)
        result["decode_killed"] = _decode_kill(backend.client.request, cluster, args.cap)
        cluster.restart("decode", 0)
        result["prefill_frozen_no_hedge"] = _frozen(backend.client.request, cluster, args)
        result["poison_request"] = _poisoned(backend.client.request, cluster, args)
        result["prefill_crashed_supervised"] = _crash_restarted(backend, cluster, args.cap)
        _wait_all_healthy(cluster, args.cap)
    finally:
        backend.shutdown()
    hedged = PDBackend(**cluster.urls(), timeouts=Timeouts(connect=2.0, total=600.0), probe_interval=0.5,
                       hedge=HedgePolicy())
    try:
        learn = _run(hedged.client.request, args.requests, args.concurrency, args.max_tokens, None)
        result["prefill_frozen_hedged"] = _frozen(hedged.client.request, cluster, args)
        before = hedged.metrics.summary()
        result["prefill_frozen_hedged"].update(learned_on=learn["completed"], hedged=before.get("hedged", 0),
                                               hedges_won=before.get("hedges_won", 0))
        result["hedges_on_a_normal_run"] = _run(hedged.client.request, args.requests, args.concurrency,
                                                args.max_tokens, None)
        after = hedged.metrics.summary()
        result["hedges_on_a_normal_run"]["hedged"] = after.get("hedged", 0) - before.get("hedged", 0)
        return result
    finally:
        hedged.shutdown()


def _router_route(cluster: PDCluster, args: argparse.Namespace, log_dir: Path) -> dict:
    port = cluster.config.base_port + 90
    argv = router_argv(list(zip(cluster.prefill_urls, cluster.prefill_bootstrap_ports)), cluster.decode_urls,
                       host="127.0.0.1", port=port, policy="round_robin")
    with RouterProcess(argv, f"http://127.0.0.1:{port}", log_dir / "router.log") as router, \
            httpx.Client(timeout=args.cap, trust_env=False) as client:
        router.wait_ready(120)

        def send(body: dict) -> dict:
            answer = client.post(f"{router.url}/generate", json=body)
            answer.raise_for_status()
            return answer.json()

        result = {"baseline": _run(send, args.requests, args.concurrency, args.max_tokens, None)}
        result["prefill_killed"] = _run(send, args.requests, args.concurrency, args.max_tokens,
                                        lambda: cluster.kill("prefill", 0))
        cluster.restart("prefill", 0)
        result["served_again_after_healthy_s"] = _seconds_until_served(send, args.cap)
        result["decode_killed"] = _decode_kill(send, cluster, args.cap)
        cluster.restart("decode", 0)
        result["decode_served_again_after_healthy_s"] = _seconds_until_served(send, args.cap)
        result["prefill_frozen"] = _frozen(send, cluster, args)
        result["poison_request"] = _poisoned(send, cluster, args)
        return result


def run_failover(cluster: PDCluster, args: argparse.Namespace) -> dict:
    """Both routes on ``cluster`` (2 prefill + 1 decode servers this process owns)."""
    log_dir = Path(tempfile.mkdtemp(prefix="sgl-pd-failover-"))
    report = {"setup": {"prefill": cluster.prefill_urls, "decode": cluster.decode_urls, "requests": args.requests,
                        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "date": time.strftime("%Y-%m-%d")},
              "adapter": _adapter_route(cluster, args)}
    if not args.skip_router:
        report["sglang_router_round_robin"] = _router_route(cluster, args, log_dir)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.bench_failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per run (default 48)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds to wait for any one request (default 120)")
    parser.add_argument("--base-port", type=int, default=30700, help="first port of the servers (default 30700)")
    parser.add_argument("--skip-router", action="store_true", help="measure only this adapter")
    parser.add_argument("--freeze-s", type=float, default=30.0, help="seconds prefill-0 stays SIGSTOPped (default 30)")
    parser.add_argument("--out", default="bench-out/failover.json", help="JSON report path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with PDCluster(SGLangPDConfig(pd_ratio=(2, 1), base_port=args.base_port)) as cluster:
        if cluster.is_tiny_model:
            print("Model: the random tiny model (nonsense text; the serving path and timings are real).")
        report = run_failover(cluster, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"JSON written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
