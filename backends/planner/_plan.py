"""Choose the prefill:decode ratio for a workload, a budget and latency SLOs, by simulation.

The method is DistServe's (Zhong et al., OSDI'24, section 4: simulate each placement against
the workload, keep the one with the highest goodput under TTFT and TPOT SLOs) sized the way
Dynamo's SLA planner sizes its prefill and decode pools for TTFT/ITL targets. Every split
of a budget of servers (or GPUs / TP) into ``P`` prefill + ``D`` decode servers is
simulated (plus the same servers colocated, as the baseline), and ranked by goodput:
requests per second that met both the TTFT and the TPOT SLO.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from backends.planner._costs import CostModel
from backends.planner._simulator import SimResult, Simulator
from backends.planner._workload import Workload

__all__ = ["SLO", "Candidate", "Plan", "candidate_shapes", "plan", "summarize"]


@dataclass(frozen=True)
class SLO:
    """Latency targets at the 90th percentile: time to first token and time per output token, s."""

    ttft_p90_s: float
    tpot_p90_s: float


@dataclass(frozen=True)
class Candidate:
    """One simulated deployment: ``prefill`` + ``decode`` PD servers, or ``colocated`` ones, at ``tp`` GPUs each.

    ``goodput_rps`` counts requests meeting both SLOs per second of makespan; ``meets_slo``
    says whether the p90s are within the SLO; times in s; ``utilisation`` is busy share per pool
    (a decode server stepping any batch is busy: read ``mean_decode_batch`` beside it).
    """

    prefill: int
    decode: int
    colocated: int
    tp: int
    goodput_rps: float
    throughput_rps: float
    attainment: float
    meets_slo: bool
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    cache_hit_ratio: float
    mean_decode_batch: float = 0.0
    utilisation: dict = field(default_factory=dict)
    sim_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"colocated x{self.colocated}" if self.colocated else f"{self.prefill}:{self.decode}"

    @property
    def gpus(self) -> int:
        return (self.prefill + self.decode + self.colocated) * self.tp


@dataclass(frozen=True)
class Plan:
    """Candidates ranked best first, and what produced them."""

    candidates: tuple[Candidate, ...]
    slo: SLO
    costs: CostModel
    workload: dict
    seconds: float

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def launch_command(self, model: str | None = None) -> str:
        """``recipes.launch_pd`` command line for the winner."""
        b = self.best
        ratio = f"0:0 --colocated {b.colocated}" if b.colocated else f"{b.prefill}:{b.decode}"
        return f"python -m recipes.launch_pd --pd-ratio {ratio} --tp {b.tp}" + (f" --model {model}" if model else "")

    def config_snippet(self, model: str | None = None) -> str:
        """The ``SGLangPDConfig`` for the winner."""
        b = self.best
        ratio = f"pd_ratio=(0, 0), colocated={b.colocated}" if b.colocated else f"pd_ratio=({b.prefill}, {b.decode})"
        return f"SGLangPDConfig({ratio}, tp_size={b.tp}" + (f", model_path={model!r})" if model else ")")

    def table(self) -> str:
        """A text table, best first."""
        head = f"{'rank':>4} {'ratio':<14} {'GPUs':>4} {'goodput/s':>9} {'SLO':>4} {'TTFT p50/p90 s':>16} " \
               f"{'TPOT p50/p90 ms':>16} {'hit':>5} {'util P/D':>10} {'batch':>6}"
        lines = [head, "-" * len(head)]
        for rank, c in enumerate(self.candidates, 1):
            util = "/".join(f"{v:.0%}" for v in c.utilisation.values())
            lines.append(f"{rank:>4} {c.label:<14} {c.gpus:>4} {c.goodput_rps:>9.2f} {'yes' if c.meets_slo else 'no':>4} "
                         f"{c.ttft_p50_s:>7.3f}/{c.ttft_p90_s:<8.3f} {c.tpot_p50_s * 1e3:>7.1f}/{c.tpot_p90_s * 1e3:<8.1f} "
                         f"{c.cache_hit_ratio:>5.0%} {util:>10} {c.mean_decode_batch:>6.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"slo": asdict(self.slo), "costs": asdict(self.costs), "workload": self.workload,
                "plan_seconds": self.seconds, "candidates": [{**asdict(c), "label": c.label, "gpus": c.gpus}
                                                              for c in self.candidates],
                "recommendation": {"label": self.best.label, "launch": self.launch_command(),
                                   "config": self.config_snippet()}}


def candidate_shapes(budget_servers: int | None = None, budget_gpus: int | None = None, tp=(1,),
                     colocated: bool = True) -> list[tuple[int, int, int, int]]:
    """Every ``(P, D, colocated, tp)`` using the whole budget: ``P + D`` servers, ``P, D >= 1``.

    With ``budget_gpus`` each TP size gets ``budget_gpus // tp`` servers; else ``budget_servers``.
    """
    shapes = []
    for t in tp:
        servers = budget_gpus // t if budget_gpus is not None else budget_servers
        if servers is None:
            raise ValueError("give budget_servers or budget_gpus")
        shapes += [(p, servers - p, 0, t) for p in range(1, servers)]
        if colocated and servers >= 1:
            shapes.append((0, 0, servers, t))
    if not shapes:
        raise ValueError("the budget allows no PD deployment: it needs at least 2 servers")
    return shapes


def summarize(result: SimResult, workload: Workload, slo: SLO, shape: tuple[int, int, int, int],
              seconds: float = 0.0) -> Candidate:
    """Percentiles, goodput and SLO verdict of one simulation."""
    tpot = np.nan_to_num(result.tpot_s, nan=0.0)  # one-token requests have no TPOT: they meet it
    good = (result.ttft_s <= slo.ttft_p90_s) & (tpot <= slo.tpot_p90_s)
    pct = lambda a, q: float(np.nanpercentile(a, q)) if np.isfinite(a).any() else 0.0  # noqa: E731
    prompt = workload.prompt_tokens.sum()
    return Candidate(*shape, goodput_rps=float(good.sum() / result.makespan_s),
                     throughput_rps=len(workload) / result.makespan_s, attainment=float(good.mean()),
                     meets_slo=pct(result.ttft_s, 90) <= slo.ttft_p90_s and pct(tpot, 90) <= slo.tpot_p90_s,
                     ttft_p50_s=pct(result.ttft_s, 50), ttft_p90_s=pct(result.ttft_s, 90),
                     tpot_p50_s=pct(result.tpot_s, 50), tpot_p90_s=pct(result.tpot_s, 90),
                     e2e_p50_s=pct(result.e2e_s, 50), e2e_p90_s=pct(result.e2e_s, 90),
                     cache_hit_ratio=float(result.cached_tokens.sum() / prompt) if prompt else 0.0,
                     mean_decode_batch=result.mean_decode_batch, utilisation=result.utilisation, sim_seconds=seconds)


def plan(costs: CostModel, workload: Workload, slo: SLO, *, budget_servers: int | None = None,
         budget_gpus: int | None = None, tp=(1,), colocated: bool = True, tp_efficiency: float = 0.85,
         prefill_policy: str = "prefill_cost", decode_policy: str = "least_loaded", tie: float = 0.01) -> Plan:
    """Simulate every candidate shape and rank them.

    Parameters
    ----------
    costs : CostModel
        One server at TP=1; other TP sizes use :meth:`CostModel.with_tp` (an assumption).
    workload : Workload
        Replayed unchanged on every candidate.
    slo : SLO
        TTFT and TPOT targets at p90, s.
    budget_servers, budget_gpus : int
        Split ``budget_servers`` servers, or ``budget_gpus // tp`` per TP size (see :func:`candidate_shapes`).
    tp : sequence of int
        TP sizes per server to consider.
    colocated : bool
        Also simulate the same servers colocated (the baseline PD has to beat).
    prefill_policy, decode_policy : str
        The adapter's policies, by name (:func:`~backends.planner.make_policy`).
    tie : float
        Candidates within this share of the best goodput are ordered by their worst p90 / SLO
        ratio instead: among deployments that serve everything in time, the most headroom wins.

    Returns
    -------
    Plan
        Candidates best first, with the planning time in ``seconds``.
    """
    started, results = time.perf_counter(), []
    for shape in candidate_shapes(budget_servers, budget_gpus, tuple(tp), colocated):
        p, d, colo, t = shape
        t0 = time.perf_counter()
        sim = Simulator(costs.with_tp(t, tp_efficiency), p, d, colo, prefill_policy=prefill_policy,
                        decode_policy=decode_policy)
        result = sim.run(workload)
        results.append(summarize(result, workload, slo, shape, time.perf_counter() - t0))
    headroom = lambda c: max(c.ttft_p90_s / slo.ttft_p90_s, c.tpot_p90_s / slo.tpot_p90_s)  # noqa: E731
    top = max(c.goodput_rps for c in results)
    ranked = sorted(results, key=lambda c: (c.goodput_rps < (1 - tie) * top, headroom(c) if
                                            c.goodput_rps >= (1 - tie) * top else -c.goodput_rps))
    return Plan(tuple(ranked), slo, costs, {"name": workload.name, "requests": len(workload), **workload.shape},
                time.perf_counter() - started)
