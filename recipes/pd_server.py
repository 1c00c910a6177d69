"""Launch N prefill + M decode servers; with ``--demo`` also run the demo workload and report.

Examples::

    python -m recipes.pd_server --pd-ratio 2:3 --demo --json report.json
    python -m recipes.pd_server --preset small --demo          # phi-2, 1:2, on GPUs
    python -m recipes.pd_server --model /models/llama --pd-ratio 1:1   # serve until Ctrl-C

With ``--demo``: the workload and printing of :mod:`recipes.pd_demo` (one
request, a batch of 8, a stream; per-request ``[Prefill]``/``[Decode]`` lines
and ``BENCHMARK SUMMARY``), then every server stops. Without it: the servers
stay up until Ctrl-C, exactly as :mod:`recipes.launch_pd`: a server that exits
is restarted (each restart printed) unless ``--no-supervise`` is given, which
stops every server when one exits.
"""

from __future__ import annotations

import argparse
import sys

from recipes import _demo, launch_pd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.pd_server",
        description="Launch prefill/decode-separated SGLang servers. With --demo, run the demo "
                    "workload and print per-request timings and a benchmark summary, then stop; "
                    "without it, keep the servers up until Ctrl-C.")
    p.add_argument("--model", help="model path or Hugging Face id (default: the random tiny model; "
                                    "'prefill-bound' for the random model whose prefill costs real time)")
    p.add_argument("--pd-ratio", help="prefill:decode server counts, e.g. 2:3 (default 1:1)")
    p.add_argument("--preset", choices=["small", "medium", "large"],
                   help="start from a preset (model, ratio, TP, memory); options given override it")
    p.add_argument("--mem-fraction", type=float, help="--mem-fraction-static per server")
    p.add_argument("--tp", type=int, help="tensor-parallel size per server")
    p.add_argument("--base-port", type=int, default=30200,
                   help="first port; server i uses BASE+10*i (default 30200)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--log-dir", help="folder for server logs (default: a new temp folder)")
    p.add_argument("--demo", action="store_true", help="run the demo workload, report, and stop")
    p.add_argument("--max-tokens", type=int, default=32, help="with --demo: tokens per generation (default 32)")
    p.add_argument("--json", metavar="FILE", help="with --demo: also write the report as JSON")
    p.add_argument("--no-supervise", action="store_true",
                   help="without --demo: do not restart a server that exits; stop every server instead")
    args = p.parse_args(argv)
    if not args.demo and args.json:
        p.error("--json needs --demo (there is no report without the demo)")
    if args.demo and args.no_supervise:
        p.error("--no-supervise applies to serving (without --demo); the demo stops its servers itself")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.demo:
        return launch_pd.main(_launch_pd_argv(args))
    try:
        config = launch_pd.build_config(launch_pd.parse_args(_launch_pd_argv(args)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _demo.launch_and_run(config, max_tokens=args.max_tokens, json_path=args.json, log_dir=args.log_dir)


def _launch_pd_argv(args: argparse.Namespace) -> list[str]:
    """The same options, spelt for :mod:`recipes.launch_pd`."""
    options = {"--model": args.model, "--pd-ratio": args.pd_ratio, "--preset": args.preset,
               "--mem-fraction": args.mem_fraction, "--tp": args.tp, "--base-port": args.base_port,
               "--device": args.device, "--log-dir": args.log_dir}
    argv = [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
    return argv + (["--no-supervise"] if args.no_supervise else [])


if __name__ == "__main__":
    sys.exit(main())
