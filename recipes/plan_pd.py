"""Plan how many prefill and decode servers a workload needs, by simulation.

Examples::

    # a GPU deployment, before having one (H200 reference costs; see CostModel.h200_llama8b)
    python -m recipes.plan_pd --costs h200-llama8b --workload shared-prefix --requests 10000 --rate 40 \\
        --ttft-p90 0.5 --tpot-p90 0.05 --budget-servers 9 --json plan.json --plot plan.png

    # this machine: calibrate on a launched 1:1 pair, plan, and check the top candidates for real
    python -m recipes.plan_pd --calibrate costs.json --workload multi-turn --requests 40 --rate 2 \\
        --ttft-p90 2 --tpot-p90 0.3 --budget-servers 2 --validate --base-port 31400

Prints the candidates (P:D splits of the budget, and the same servers colocated) with
predicted goodput (requests/s within both SLOs), TTFT/TPOT percentiles and utilisation per
pool, then the recommendation with its ``launch_pd`` command and ``SGLangPDConfig``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from backends.planner import BENCHMARK_SHAPES, SLO, CostModel, Workload, plan

COSTS = {"h200-llama8b": lambda: CostModel.h200_llama8b("eager"),
         "h200-llama8b-bound": lambda: CostModel.h200_llama8b("bound")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.plan_pd", description=__doc__.split("\n\n")[0])
    p.add_argument("--costs", default="h200-llama8b", help="h200-llama8b (eager fit, an upper bound), h200-llama8b-bound "
                   "(physical lower bound) or a CostModel JSON file (from --calibrate)")
    p.add_argument("--workload", default="shared-prefix", help=f"{' | '.join(BENCHMARK_SHAPES)} | a JSON/JSONL trace file")
    p.add_argument("--requests", type=int, default=1000, help="requests (a trace is cut to this many)")
    p.add_argument("--rate", type=float, help="mean arrivals per second (Poisson; rescales a trace); default 10")
    p.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                   help="override a benchmark workload parameter, e.g. prefix_len=4096 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-p90", type=float, help="TTFT SLO at p90, s")
    p.add_argument("--tpot-p90", type=float, help="time-per-output-token SLO at p90, s")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-servers", type=int, help="servers to split into prefill + decode")
    budget.add_argument("--budget-gpus", type=int, help="GPUs; each --tp size gets GPUs // tp servers")
    p.add_argument("--tp", type=int, nargs="+", default=[1], help="TP size(s) per server (default 1)")
    p.add_argument("--tp-efficiency", type=float, default=0.85, help="assumed TP scaling efficiency (default 0.85)")
    p.add_argument("--no-colocated", action="store_true", help="leave out the colocated baseline")
    p.add_argument("--prefill-policy", default="prefill_cost",
                   choices=["prefill_cost", "cache_aware", "least_loaded", "round_robin"])
    p.add_argument("--model", help="model path for launch commands and launches (default: the tiny model)")
    p.add_argument("--json", help="write the plan (and calibration / validation) as JSON here")
    p.add_argument("--plot", help="write a PNG of goodput and p90/SLO per candidate here")
    live = p.add_argument_group("real servers (ports base..base+10*servers; every server launched is stopped)")
    live.add_argument("--calibrate", metavar="OUT.json", help="profile a 1:1 pair (launched, or --prefill/--decode) "
                      "and save the fitted CostModel; plans with it when SLOs are given")
    live.add_argument("--prefill", nargs="+", help="profile these running prefill servers instead of launching")
    live.add_argument("--decode", nargs="+", help="... with these decode servers")
    live.add_argument("--validate", action="store_true", help="launch the top candidates that fit here, run the "
                      "workload on each, print predicted vs measured")
    live.add_argument("--validate-top", type=int, default=3, help="candidates to validate (default 3)")
    live.add_argument("--max-servers", type=int, default=2, help="largest deployment to launch (default 2)")
    live.add_argument("--base-port", type=int, default=31400, help="first port of launched servers (default 31400)")
    args = p.parse_args(argv)
    if args.ttft_p90 is None and not args.calibrate:
        p.error("give --ttft-p90 and --tpot-p90 (or only --calibrate)")
    if args.ttft_p90 is not None and (args.tpot_p90 is None or (args.budget_servers is None and args.budget_gpus is None)):
        p.error("planning needs --ttft-p90, --tpot-p90 and --budget-servers or --budget-gpus")
    if bool(args.prefill) != bool(args.decode):
        p.error("give both --prefill and --decode URLs, or neither")
    return args


def load_workload(args) -> Workload:
    rate = args.rate if args.rate is not None else 10.0
    if args.workload in BENCHMARK_SHAPES:
        shape = {k: int(v) for k, v in (s.split("=", 1) for s in args.shape)}
        return Workload.benchmark(args.workload, args.requests, rate, args.seed, **shape)
    w = Workload.from_trace(args.workload)
    if len(w) > args.requests:
        w = Workload(w.name, *(getattr(w, f)[:args.requests] for f in ("arrival_s", "prompt_tokens", "output_tokens",
                                                                      "group", "prefix_tokens")), w.shape)
    return w.with_rate(args.rate) if args.rate is not None else w


def load_costs(spec: str) -> CostModel:
    return COSTS[spec]() if spec in COSTS else CostModel.from_json(spec)


def measured(run: dict, slo: SLO) -> dict:
    """The planner's columns from a real run's records."""
    recs = [r for r in run["records"] if r.get("ttft") is not None]
    tpot = lambda r: r["decode_time"] / (r["completion_tokens"] - 1) if r["completion_tokens"] > 1 else 0.0  # noqa: E731
    good = sum(r["ttft"] <= slo.ttft_p90_s and tpot(r) <= slo.tpot_p90_s for r in recs)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    span = max(run["makespan_s"], 1e-9)
    return {"goodput_rps": good / span, "throughput_rps": len(run["records"]) / span, "ttft_p50_s": pct(run["ttft"], 50),
            "ttft_p90_s": pct(run["ttft"], 90), "tpot_p50_s": pct(run["tpot"], 50), "tpot_p90_s": pct(run["tpot"], 90),
            "cache_hit_ratio": run["cache_hit_ratio"], "errors": len(run["errors"])}


def validate(args, result, workload: Workload, costs: CostModel) -> list[dict]:
    from recipes._plan_live import Texts, live_cluster, run_workload

    if costs.source.startswith("H200"):
        raise ValueError("--validate runs on this machine: give costs calibrated here "
                         "(--calibrate OUT.json, or --costs FILE)")
    fits = [c for c in result.candidates if c.tp == 1 and c.prefill + c.decode + c.colocated <= args.max_servers]
    rows = []
    for cand in fits[:args.validate_top]:
        print(f"\n=== validating {cand.label}: launching on ports {args.base_port}+ ...", flush=True)
        with live_cluster(cand.prefill, cand.decode, cand.colocated, base_port=args.base_port,
                          model=args.model) as (client, info):
            texts = Texts(info["model_path"], args.seed)
            run = run_workload(client, workload, texts, stream=cand.colocated > 0)
        got = measured(run, result.slo)
        rows.append({"label": cand.label, "rank": result.candidates.index(cand) + 1, "measured": got,
                     "predicted": {k: getattr(cand, k) for k in got if hasattr(cand, k)}})
        print(f"{'metric':<16} {'predicted':>10} {'measured':>10} {'error':>7}")
        for key, want in rows[-1]["predicted"].items():
            err = (want - got[key]) / got[key] if got[key] else float("nan")
            print(f"{key:<16} {want:>10.4f} {got[key]:>10.4f} {err:>+7.0%}")
        print(f"errors: {got['errors']}", flush=True)
    if rows:
        best = max(rows, key=lambda r: r["measured"]["goodput_rps"])
        print(f"\nplanner's first (of those run): {rows[0]['label']}; best measured goodput: {best['label']} "
              f"({best['measured']['goodput_rps']:.2f}/s)")
    return rows


def plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = result.candidates
    labels = [c.label for c in cands]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(cands) + 4), 4))
    a.bar(labels, [c.goodput_rps for c in cands], color=["tab:green" if c.meets_slo else "tab:gray" for c in cands])
    a.set_ylabel("predicted goodput (req/s within SLO)")
    a.set_title(f"{result.workload['name']}: green = p90s within SLO")
    x = np.arange(len(cands))
    b.bar(x - 0.2, [c.ttft_p90_s / result.slo.ttft_p90_s for c in cands], 0.4, label="TTFT p90 / SLO")
    b.bar(x + 0.2, [c.tpot_p90_s / result.slo.tpot_p90_s for c in cands], 0.4, label="TPOT p90 / SLO")
    b.axhline(1.0, color="red", lw=1)
    b.set_xticks(x, labels)
    b.set_yscale("log")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"costs: {result.costs.source[:90]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out: dict = {"args": vars(args)}
    try:
        if args.calibrate:
            from recipes._plan_live import Texts, live_cluster, profile

            urls = {"prefill": args.prefill, "decode": args.decode} if args.prefill else None
            where = f"{args.prefill} + {args.decode}" if urls else f"a launched 1:1 pair (ports {args.base_port}+)"
            print(f"calibrating on {where}", flush=True)
            with live_cluster(1, 1, 0, base_port=args.base_port, model=args.model, urls=urls) as (client, info):
                costs, report, records = profile(client, info, Texts(info["model_path"], args.seed),
                                                 source=f"calibrated {time.strftime('%Y-%m-%d %H:%M')} "
                                                        f"on {info['model_path']}")
            costs.to_json(args.calibrate)
            out["calibration"] = {"costs": json.loads(costs.to_json()), "report": report, "records": records}
            print(f"wrote {args.calibrate}: {costs.to_json()}\nfit: {json.dumps(report)}")
            if args.ttft_p90 is None:
                return 0
        else:
            costs = load_costs(args.costs)
        workload = load_workload(args)
        slo = SLO(args.ttft_p90, args.tpot_p90)
        result = plan(costs, workload, slo, budget_servers=args.budget_servers, budget_gpus=args.budget_gpus,
                      tp=args.tp, colocated=not args.no_colocated, tp_efficiency=args.tp_efficiency,
                      prefill_policy=args.prefill_policy)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"costs: {costs.source}\nworkload: {workload.name}, {len(workload)} requests over {workload.duration_s:.1f} s "
          f"({len(workload) / max(workload.duration_s, 1e-9):.2f} req/s); "
          f"SLO p90: TTFT {slo.ttft_p90_s} s, TPOT {slo.tpot_p90_s} s\n")
    print(result.table())
    best = result.best
    print(f"\nplanned {len(result.candidates)} candidates x {len(workload)} requests in {result.seconds:.1f} s")
    print(f"recommendation: {best.label} at TP {best.tp} ({best.goodput_rps:.2f} req/s within SLO, "
          f"{'meets' if best.meets_slo else 'MISSES'} the p90 SLOs)")
    print(f"  {result.launch_command(args.model)}\n  {result.config_snippet(args.model)}")
    out.update(result.to_dict())
    out["recommendation"] = {**out["recommendation"], "launch": result.launch_command(args.model),
                             "config": result.config_snippet(args.model)}
    if args.validate:
        try:
            out["validation"] = validate(args, result, workload, costs)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
