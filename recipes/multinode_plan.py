"""Print the commands that deploy a PD cluster over several GPU nodes (prints only, launches nothing).

Example::

    python -m recipes.multinode_plan --nodes 2 --gpus-per-node 8 --pd-ratio 2:4 --tp 2 \\
        --model meta-llama/Llama-3.1-8B-Instruct --hosts gpu-a,gpu-b

Servers are laid out like :class:`backends.PDCluster` lays them out on one
machine (prefill first, then decode; ``tp`` consecutive GPUs each; the same
flags and environment, from :mod:`backends.launcher._launch_plan`), then cut into nodes
of ``--gpus-per-node`` GPUs. Prints one ``python -m sglang.launch_server``
line per server with its node and ``CUDA_VISIBLE_DEVICES``, the router
command, and the ``PDBackend`` snippet that uses the same servers.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from backends import SGLangPDConfig, ServerSpec, plan_servers, router_argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.multinode_plan",
        description="Print per-node SGLang launch commands for a prefill/decode deployment over "
                    "several GPU nodes, plus the router command and a PDBackend snippet. Launches nothing.")
    p.add_argument("--nodes", type=int, required=True, help="number of GPU nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    p.add_argument("--pd-ratio", required=True, help="prefill:decode server counts, e.g. 2:4")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size per server (default 1)")
    p.add_argument("--model", help="model path or Hugging Face id (default: the random tiny model)")
    p.add_argument("--hosts", help="comma-separated node addresses (default node0,node1,...)")
    p.add_argument("--base-port", type=int, default=30000, help="first server port (default 30000)")
    p.add_argument("--mem-fraction", type=float, help="--mem-fraction-static per server")
    p.add_argument("--router-port", type=int, default=8000, help="router port (default 8000)")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.tp < 1:
        p.error("--nodes, --gpus-per-node and --tp must be >= 1")
    if args.gpus_per_node % args.tp:
        p.error(f"--tp {args.tp} must divide --gpus-per-node {args.gpus_per_node}: a TP group cannot span nodes")
    args.host_names = args.hosts.split(",") if args.hosts else [f"node{i}" for i in range(args.nodes)]
    if len(args.host_names) != args.nodes:
        p.error(f"--hosts names {len(args.host_names)} nodes but --nodes is {args.nodes}")
    return args


def plan(args: argparse.Namespace) -> tuple[SGLangPDConfig, list[tuple[ServerSpec, str, list[int]]]]:
    """The config and, per server, its spec, node address and node-local GPU ids."""
    config = SGLangPDConfig(pd_ratio=args.pd_ratio, tp_size=args.tp, model_path=args.model, host="0.0.0.0",
                            base_port=args.base_port, mem_fraction_static=args.mem_fraction, device="cuda")
    total_gpus = args.nodes * args.gpus_per_node
    if config.num_servers * args.tp > total_gpus:
        raise ValueError(f"{config.num_servers} servers x TP {args.tp} need {config.num_servers * args.tp} GPUs; "
                         f"{args.nodes} nodes x {args.gpus_per_node} GPUs have {total_gpus}")
    placed = []
    for slot, spec in enumerate(plan_servers(config, device="cuda", gpu_count=total_gpus)):
        first = slot * args.tp  # the same consecutive layout as launch_plan, cut into nodes
        node, local = divmod(first, args.gpus_per_node)
        placed.append((spec, args.host_names[node], list(range(local, local + args.tp))))
    return config, placed


def _url(spec: ServerSpec, host: str) -> str:
    return f"http://{host}:{spec.port}"


def print_plan(args: argparse.Namespace, config: SGLangPDConfig, placed: list[tuple[ServerSpec, str, list[int]]]) -> None:
    used = config.num_servers * args.tp
    print(f"# {args.nodes} node(s) x {args.gpus_per_node} GPUs; {config.num_prefill} prefill + "
          f"{config.num_decode} decode servers, TP {args.tp}: {used} of {args.nodes * args.gpus_per_node} GPUs")
    print(f"# model: {placed[0][0].model_path}")
    if config.is_tiny_model:
        print("# NOTE: that is the random tiny test model (nonsense text); copy it to every node or pass --model.")
    for host in args.host_names:
        on_node = [(spec, gpus) for spec, node, gpus in placed if node == host]
        print(f"\n## on {host} ({len(on_node)} server(s))")
        for spec, gpus in on_node:
            boot = f", bootstrap port {spec.bootstrap_port}" if spec.bootstrap_port else ""
            print(f"# {spec.name}: {_url(spec, host)}{boot}")
            env = {**{k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES"},
                   "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
            command = ["python", *spec.argv[1:]]
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command))
    prefill = [(_url(spec, node), spec.bootstrap_port) for spec, node, _ in placed if spec.role == "prefill"]
    decode = [_url(spec, node) for spec, node, _ in placed if spec.role == "decode"]
    router = router_argv(prefill, decode, host="0.0.0.0", port=args.router_port, python="python")
    print(f"\n## router (on any host that reaches every node, e.g. {args.host_names[0]})")
    print(shlex.join(router))
    print(f"# clients: POST http://{args.host_names[0]}:{args.router_port}/generate (no sgl.select through the router)")
    print("\n## or from Python, without the router (select, fork and streaming included)")
    print("import sglang as sgl\nfrom backends import PDBackend\n")
    print(f"backend = PDBackend(\n    prefill={[url for url, _ in prefill]!r},\n    decode={decode!r},\n)")
    print("sgl.set_default_backend(backend)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, placed = plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(args, config, placed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
