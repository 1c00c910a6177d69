"""Start a PD cluster from the command line and keep it up until Ctrl-C.

Example::

    python -m recipes.launch_pd --pd-ratio 1:1 --colocated 1 --base-port 31000
    python -m recipes.launch_pd --pd-ratio 1:1 --model prefill-bound   # random, but prefill costs real time

Prints each server's role, URL, bootstrap port and log file, then waits.
A server that exits (or whose SGLang transfer thread dies) is restarted on
the same ports while the others keep serving, and each restart is printed;
``--no-supervise`` instead stops everything when one server exits. Ctrl-C
(or SIGTERM) stops every server, including SGLang's child processes.
"""

from __future__ import annotations

import argparse
import sys
import time

from backends import PREFILL_BOUND_MODEL, TINY_MODEL, ClusterStartError, PDCluster, SGLangPDConfig

#: ``--model`` names of the built-in random models (any other value is a path or id).
RANDOM_MODELS = {"tiny": TINY_MODEL, "prefill-bound": PREFILL_BOUND_MODEL}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.launch_pd",
        description="Launch prefill/decode-separated SGLang servers (plus optional "
                    "colocated ones) and keep them running until Ctrl-C. Without a GPU "
                    "the servers run SGLang's CPU engine; without --model the "
                    "deterministic tiny random model is built and used.")
    p.add_argument("--preset", choices=["small", "medium", "large"],
                   help="start from a preset (model, ratio, TP, memory); other options "
                        "given override it")
    p.add_argument("--pd-ratio", help="prefill:decode server counts, e.g. 1:1 or 2:3 "
                                      "(0:0 with --colocated N for ordinary servers only)")
    p.add_argument("--model", help="model path or Hugging Face id, or a built-in random model: 'tiny' (the "
                                    "default) or 'prefill-bound' (same tokenizer, ~0.7 s per 1,000 prompt "
                                    "tokens on a core)")
    p.add_argument("--colocated", type=int, help="number of ordinary (non-PD) servers")
    p.add_argument("--base-port", type=int,
                   help="first port; server i uses base+10*i (HTTP), +1 (nccl), "
                        "+2 (prefill bootstrap). Default 30000")
    p.add_argument("--tp", type=int, help="tensor-parallel size per server")
    p.add_argument("--mem-fraction", type=float, help="--mem-fraction-static per server")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--log-dir", help="folder for server logs (default: a new temp folder)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds for all servers to become healthy (default 300)")
    p.add_argument("--no-supervise", action="store_true",
                   help="do not restart a server that exits; stop every server instead")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> SGLangPDConfig:
    """The config the options describe (preset first, explicit options on top)."""
    given = {
        "pd_ratio": args.pd_ratio, "model_path": RANDOM_MODELS.get(args.model, args.model),
        "colocated": args.colocated, "base_port": args.base_port, "tp_size": args.tp,
        "mem_fraction_static": args.mem_fraction, "device": args.device,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.preset:
        return SGLangPDConfig.preset(args.preset, **overrides)
    return SGLangPDConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cluster = PDCluster(build_config(args), log_dir=args.log_dir,
                            startup_timeout=args.startup_timeout, supervise=not args.no_supervise)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Starting {len(cluster.servers)} servers; logs in {cluster.log_dir}", flush=True)
    started = time.monotonic()
    try:
        with cluster:
            print(f"All healthy after {time.monotonic() - started:.0f} s:")
            for s in cluster.servers:
                boot = s.bootstrap_port if s.bootstrap_port is not None else "-"
                print(f"  {s.name:<12} {s.url:<24} bootstrap={boot:<6} log={cluster.log_path(s)}")
            print("Press Ctrl-C to stop.", flush=True)
            if not args.no_supervise:
                return serve_supervised(cluster)
            while not cluster.exited():
                time.sleep(2.0)
            print(f"error: server(s) exited: {cluster.exited()}; see the logs above.",
                  file=sys.stderr)
            return 1
    except ClusterStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopped all servers.")
        return 130


def serve_supervised(cluster: PDCluster, poll: float = 1.0) -> int:
    """Print each restart as the cluster reports it; return 1 once every server is down for good."""
    seen = 0
    while True:
        events = cluster.restarts()
        for event in events[seen:]:
            print(f"[supervisor] {event}; log={cluster.log_path(event.server)}", flush=True)
        seen = len(events)
        # Nothing here calls restart(), so a server given up on stays down.
        down = {e.server for e in events if e.outcome == "gave up"}
        if len(down) == len(cluster.servers):
            print("error: every server is down after its restarts; see the logs above.", file=sys.stderr)
            return 1
        time.sleep(poll)


if __name__ == "__main__":
    sys.exit(main())
