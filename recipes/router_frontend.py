"""Scale out with SGLang's own router in front of PD servers, for clients that speak plain HTTP.

Examples::

    # front servers that already run (bootstrap ports are asked from each prefill server)
    python -m recipes.router_frontend --prefill http://127.0.0.1:30000 http://127.0.0.1:30010 \\
        --decode http://127.0.0.1:30020 --port 30080
    # or launch a 1:1 cluster of the tiny model first
    python -m recipes.router_frontend --launch 1:1 --base-port 30400

Starts ``sglang_router.launch_router --pd-disaggregation``, waits until it has
registered every worker, sends one ``/generate`` through it with plain HTTP
(the router adds the bootstrap fields itself), prints how clients connect,
then keeps it up until Ctrl-C (``--once``: stop right away). The router, and
any servers launched here, are stopped on exit, errors, Ctrl-C and SIGTERM.

The router (0.3.2) refuses batched ``text`` lists with HTTP 422, and
``sgl.select`` sends exactly those: SGLang programs that use ``select`` need
``PDBackend`` instead. This recipe shows that refusal too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from backends import ClusterStartError, PDClient, PDCluster, PDError, SGLangPDConfig, is_tiny_model
from backends import RouterProcess, router_argv

SELECT_NOTE = ("Note: sglang-router 0.3.2 refuses a batched `text` list (HTTP 422). sgl.select sends "
               "exactly that, so programs using select fail through the router; run them with "
               "PDBackend (backends) instead.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.router_frontend",
        description="Put sglang-router (PD mode) in front of running prefill/decode servers, or of a "
                    "cluster launched here; check it with one plain-HTTP request; keep it up until Ctrl-C.")
    p.add_argument("--prefill", nargs="+", default=[], metavar="URL", help="running prefill servers")
    p.add_argument("--decode", nargs="+", default=[], metavar="URL", help="running decode servers")
    p.add_argument("--launch", metavar="P:D", help="launch P prefill + D decode servers (tiny model by "
                                                   "default) instead of using running ones")
    p.add_argument("--model", help="with --launch: model path (default: the random tiny model)")
    p.add_argument("--base-port", type=int, default=30400, help="with --launch: first server port (default 30400)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30080, help="router port; Prometheus takes PORT+1 (default 30080)")
    p.add_argument("--policy", default="cache_aware",
                   choices=["cache_aware", "round_robin", "power_of_two", "random"], help="default cache_aware")
    p.add_argument("--once", action="store_true", help="stop after the check request instead of waiting for Ctrl-C")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for the router to register workers")
    args = p.parse_args(argv)
    if bool(args.launch) == bool(args.prefill or args.decode):
        p.error("give either --prefill URL... --decode URL... (running servers) or --launch P:D")
    if not args.launch and not (args.prefill and args.decode):
        p.error("PD needs both --prefill and --decode servers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            prefill, decode = args.prefill, args.decode
            if args.launch:
                cluster = PDCluster(SGLangPDConfig(pd_ratio=args.launch, model_path=args.model, base_port=args.base_port))
                print(f"Launching {args.launch} servers (base port {args.base_port}); logs in {cluster.log_dir}", flush=True)
                stack.enter_context(cluster)
                prefill, decode = cluster.prefill_urls, cluster.decode_urls
            return serve(args, prefill, decode, stack)
    except (ClusterStartError, PDError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopped.")
        return 130


def serve(args: argparse.Namespace, prefill: list[str], decode: list[str], stack: contextlib.ExitStack) -> int:
    """Discover, start the router, check it, print how to connect, wait."""
    with PDClient(prefill=prefill, decode=decode) as probe:  # checks roles; learns bootstrap ports
        targets = [(s.url, s.bootstrap_port) for s in probe.pools["prefill"]]
        decode = [s.url for s in probe.pools["decode"]]
        model = probe.model_path
    if is_tiny_model(model):
        print("NOTE: the model is the random tiny test model: its text is nonsense; the serving path is real.")
    url = f"http://{args.host}:{args.port}"
    argv = router_argv(targets, decode, host=args.host, port=args.port, policy=args.policy)
    router = stack.enter_context(RouterProcess(argv, url, Path(tempfile.mkdtemp(prefix="sgl-router-")) / "router.log"))
    print("Router command:\n  python " + " ".join(argv[1:]), flush=True)
    print(f"Router ready after {router.wait_ready(args.ready_timeout):.1f} s; log {router.log_path}")

    with httpx.Client(base_url=url, timeout=60.0, trust_env=False) as client:
        started = time.monotonic()
        answer = client.post("/generate", json={"text": "The router says hello:",
                                                "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
        answer.raise_for_status()
        body = answer.json()
        print(f"\nPOST {url}/generate -> {body['text']!r} "
              f"({body['meta_info']['completion_tokens']} tokens in {time.monotonic() - started:.3f}s)")
        batched = client.post("/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1}})
        print(f"POST {url}/generate with a batched text list -> HTTP {batched.status_code}")
    print(f"\n{SELECT_NOTE}")
    print(f"\nClients connect to the router like to one SGLang server:\n"
          f"  curl {url}/generate -H 'Content-Type: application/json' \\\n"
          f"       -d '{json.dumps({'text': 'Hello', 'sampling_params': {'max_new_tokens': 32}})}'\n"
          f"  OpenAI-compatible: {url}/v1/chat/completions\n"
          f"  SGLang programs that only gen: sgl.set_default_backend(sgl.RuntimeEndpoint('{url}'))")
    if args.once:
        print("\nStopping the router (--once).")
        return 0
    print("\nPress Ctrl-C to stop the router" + (" and the servers." if args.launch else "."), flush=True)
    while router.running():
        time.sleep(1.0)
    print(f"error: the router exited:\n{router.log_tail()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
