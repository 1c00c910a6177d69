"""Plan a PD deployment by simulation: how many prefill and decode servers a workload needs.

- :class:`CostModel`: what each phase costs on one server (prefill by uncached/cached tokens,
  decode step by batch and context, KV transfer per token), saved as JSON;
  :meth:`CostModel.h200_llama8b` is a GPU reference from measured H200 data.
- :func:`calibrate`: fit a :class:`CostModel` to the adapter's request records (and SGLang's
  ``/v1/loads`` counters) from a short profiling run on your own servers.
- :class:`Workload`: arrivals, lengths and prefix sharing, from a trace, a distribution or
  the benchmark's shapes.
- :class:`Simulator`: a discrete-event model of P prefill + D decode (or colocated) servers
  with queues, batching, radix caches and the adapter's real routing policies.
- :func:`simulate_routing`: the adapter's real routing (per-client routers on KV events, on
  approximate records, or one shared router) against many simulated prefill servers' radix
  caches (:class:`SimRadixCache`, emitting SGLang's KV events), for :func:`routing_workload`
  token-id workloads: cache hit ratio against the best achievable, and prefix duplication.
- :func:`plan`: simulate every P:D split of a budget and rank by goodput under TTFT/TPOT SLOs
  (DistServe, OSDI'24; Dynamo's SLA planner), with the launch command of the winner.

All times are in seconds, all sizes in tokens. ``python -m recipes.plan_pd`` is the command line.

What the model leaves out (read predictions with it): prefill batches are FIFO with no
chunked-prefill mixing into decode; KV transfers never contend for the network; decode never
retracts (admission reserves prompt + output tokens); cache entries in use are not pinned;
CUDA graphs, speculative decoding, DP attention and retries after failures are not modelled.
Open-loop arrivals: a multi-turn session's next turn may arrive before its previous reply.

Example
-------
>>> from backends.planner import CostModel, SLO, Workload, plan
>>> w = Workload.benchmark("shared-prefix", n=2000, rate=40.0)
>>> p = plan(CostModel.h200_llama8b(), w, SLO(ttft_p90_s=0.5, tpot_p90_s=0.05), budget_servers=4)  # doctest: +SKIP
>>> print(p.table()); print(p.launch_command())  # doctest: +SKIP
"""

from backends.planner._calibrate import Calibration, calibrate
from backends.planner._costs import H200_LLAMA8B_EAGER, CostModel
from backends.planner._plan import SLO, Candidate, Plan, candidate_shapes, plan, summarize
from backends.planner._radix_sim import SimRadixCache, apply_kv_events, best_cached, union_tokens
from backends.planner._routing_setups import ROUTING_SETUPS, RoutingSetup, RoutingSimResult
from backends.planner._routing_sim import simulate_routing
from backends.planner._routing_workload import RoutingWorkload, routing_workload, scaled_shape, token_text
from backends.planner._simulator import SimResult, Simulator, make_policy
from backends.planner._workload import BENCHMARK_SHAPES, Workload

__all__ = [
    "CostModel", "H200_LLAMA8B_EAGER", "Calibration", "calibrate", "Workload", "BENCHMARK_SHAPES",
    "Simulator", "SimResult", "make_policy", "SLO", "Candidate", "Plan", "candidate_shapes", "plan", "summarize",
    "simulate_routing", "ROUTING_SETUPS", "RoutingSetup", "RoutingSimResult", "RoutingWorkload", "routing_workload",
    "scaled_shape", "token_text", "SimRadixCache", "apply_kv_events", "best_cached", "union_tokens",
]
