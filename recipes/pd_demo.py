"""The PD demo: launch 1 prefill + 1 decode server, send traffic, show where the time went.

Example::

    python -m recipes.pd_demo                      # tiny model on CPU, ~1.5 min on 2 cores
    python -m recipes.pd_demo --model Qwen/Qwen2.5-0.5B-Instruct --max-tokens 64 --json demo.json

Runs through ``PDBackend(**cluster.urls())``: one request, a
``run_batch`` of 8 and one streamed generation printed as it arrives. For each
request it prints the prefill leg (``[Prefill] ... Complete in Xs``) and the
decode leg (``[Decode] Generating N tokens ... Complete in Ys``), then a
``BENCHMARK SUMMARY``; every server is stopped on exit, errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from backends import SGLangPDConfig
from recipes import _demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.pd_demo",
        description="Launch a 1:1 prefill/decode SGLang cluster, run one request, a batch of 8 "
                    "and one streamed generation through PDBackend, print per-request prefill "
                    "and decode times and a benchmark summary, then stop the servers.")
    p.add_argument("--base-port", type=int, default=30100,
                   help="first port: prefill on BASE (+1 nccl, +2 bootstrap), decode on BASE+10 "
                        "(default 30100; keep below 32768 and outside 15000-17000)")
    p.add_argument("--model", help="model path or Hugging Face id (default: the random tiny model)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per generation (default 32)")
    p.add_argument("--json", metavar="FILE", help="also write the records and summary as JSON")
    p.add_argument("--log-dir", help="folder for server logs (default: a new temp folder)")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = SGLangPDConfig(pd_ratio=(1, 1), base_port=args.base_port, model_path=args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _demo.launch_and_run(config, max_tokens=args.max_tokens, json_path=args.json, log_dir=args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
