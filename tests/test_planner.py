"""The PD planner: cost model, workloads, simulator (against closed forms), calibration, ranking.

No servers: everything here is arithmetic and simulation, in seconds.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from backends.planner import SLO, CostModel, H200_LLAMA8B_EAGER, Simulator, Workload, calibrate, candidate_shapes, plan
from backends.planner._workload import PrefixCache

FULL = CostModel(prefill_base_s=0.01, prefill_token_s=1e-4, prefill_attn_s=1e-8, decode_base_s=0.005, decode_seq_s=2e-4,
                 decode_ctx_s=1e-6, transfer_base_s=0.001, transfer_token_s=1e-5, request_overhead_s=0.002,
                 decode_overhead_s=0.003)


def _one(prompt: int, out: int, group: int = -1, prefix: int = 0, at: float = 0.0) -> Workload:
    a = lambda v: np.array([v])  # noqa: E731
    return Workload("one", a(at), a(prompt), a(out), a(group), a(prefix))


# ----- closed forms --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [(1, 1, 0), (2, 3, 0), (0, 0, 1)])
def test_zero_load_latency_is_the_service_time(mode):
    r = Simulator(FULL, *mode).run(_one(300, 20))
    ttft = FULL.request_overhead_s + FULL.prefill_time(300) + (FULL.transfer_time(300) if not mode[2] else 0.0)
    e2e = ttft + sum(FULL.decode_step_time(1, 301 + m) for m in range(19)) + FULL.decode_overhead_s
    assert r.ttft_s[0] == pytest.approx(ttft, rel=1e-12)
    assert r.e2e_s[0] == pytest.approx(e2e, rel=1e-12)
    assert r.tpot_s[0] == pytest.approx((e2e - ttft) / 19, rel=1e-12)


@pytest.mark.parametrize("rho, tolerance, mode", [(0.3, 0.03, (1, 1, 0)), (0.5, 0.03, (1, 1, 0)), (0.7, 0.05, (1, 1, 0)),
                                                  (0.5, 0.03, (0, 0, 1))])
def test_one_server_constant_service_poisson_arrivals_matches_md1(rho, tolerance, mode):
    """M/D/1: mean wait = rho / (2 mu (1 - rho)); one request per forward, 1 output token, no transfer cost."""
    costs = CostModel(prefill_base_s=0.01, prefill_token_s=1e-4, max_prefill_tokens=100)
    service = costs.prefill_time(100)
    w = Workload.from_distribution(40_000, rho / service, 100, 1, seed=3)
    wait = Simulator(costs, *mode).run(w).ttft_s.mean() - service
    expected = rho * service / (2 * (1 - rho))
    assert abs(wait / expected - 1) < tolerance, (wait, expected)


def test_decode_batch_of_simultaneous_requests_steps_together():
    costs = CostModel(decode_base_s=0.01, decode_seq_s=0.001, decode_ctx_s=1e-5)
    n, b = 10, 4
    w = Workload("b", np.zeros(b), np.full(b, 50), np.full(b, n), np.full(b, -1), np.zeros(b, int))
    r = Simulator(costs, 1, 1).run(w)
    steps = sum(costs.decode_step_time(b, b * (51 + m)) for m in range(n - 1))
    assert np.allclose(r.e2e_s - r.ttft_s, steps, rtol=1e-9)
    assert r.mean_decode_batch == pytest.approx(b)


def test_arrival_during_a_run_joins_at_the_next_step_boundary():
    costs = CostModel(decode_base_s=0.01)
    w = Workload("j", np.array([0.0, 0.025]), np.array([10, 10]), np.array([11, 2]), np.array([-1, -1]), np.zeros(2, int))
    r = Simulator(costs, 1, 1).run(w)
    assert r.e2e_s[0] == pytest.approx(0.1)              # 10 steps of 10 ms, never slowed (no per-seq cost)
    assert r.e2e_s[1] == pytest.approx(0.03 - 0.025 + 0.01)  # waits for the boundary at 30 ms, then one step


def test_prefix_cache_hits_and_lru_eviction():
    cache = PrefixCache(capacity=1000)
    cache.insert(0, 600, 10, request=0)
    assert cache.match(0, 800) == 600 and cache.match(1, 100) == 0
    cache.insert(1, 500, 0, request=1)  # over capacity: group 0's tail end goes first (LRU)
    assert cache.total <= 1000 and cache.match(1, 500) == 500 and cache.match(0, 600) < 600


def test_cache_aware_routing_keeps_groups_on_one_prefill_server():
    """Each cache holds two of the four prefixes: placement decides the hit ratio."""
    w = Workload.benchmark("shared-prefix", 400, rate=20.0, groups=4, prefix_len=2000)
    costs = CostModel(**{**FULL.__dict__, "kv_capacity_tokens": 5000})
    aware = Simulator(costs, 2, 1).run(w)
    blind = Simulator(costs, 2, 1, prefill_policy="round_robin").run(w)
    servers_per_group = [len(set(aware.prefill_server[w.group == g])) for g in range(4)]
    assert servers_per_group == [1, 1, 1, 1]
    assert aware.cached_tokens.sum() > 1.2 * blind.cached_tokens.sum()


def test_small_cache_loses_hits():
    w = Workload.benchmark("shared-prefix", 300, rate=20.0, groups=8, prefix_len=1000)
    big = Simulator(FULL, 1, 1).run(w).cached_tokens.sum()
    small = Simulator(CostModel(**{**FULL.__dict__, "kv_capacity_tokens": 3000}), 1, 1).run(w).cached_tokens.sum()
    assert small < 0.6 * big


# ----- calibration -----------------------------------------------------------------------------
def _records(true: CostModel, noise: float, seed: int = 0) -> list[dict]:
    """A profiling run, computed exactly: one at a time (varied length, cached share, output), then batches."""
    rng, recs, t = np.random.default_rng(seed), [], 0.0
    jitter = lambda: 1 + noise * rng.uniform(-1, 1)  # noqa: E731
    for length in (64, 128, 256, 512, 1024, 2048):
        for frac in (0.0, 0.5, 0.9):
            cached, out = int(length * frac), int(rng.integers(4, 40))
            leg = (true.prefill_time(length - cached, cached) + true.transfer_time(length)) * jitter()
            dec = (true.decode_overhead_s + sum(true.decode_step_time(1, length + 1 + m) for m in range(out - 1))) * jitter()
            recs.append(dict(prompt_tokens=length, cached_tokens=cached, completion_tokens=out, prefill_latency=leg,
                             ttft=leg, decode_time=dec, total=leg + dec, start=t))
            t += leg + dec + 0.5
    for b in (2, 4, 8, 16):
        for length, out in ((128, 32), (1024, 16)):
            dec = true.decode_overhead_s + sum(true.decode_step_time(b, b * (length + 1 + m)) for m in range(out - 1))
            recs += [dict(prompt_tokens=length, cached_tokens=0, completion_tokens=out, prefill_latency=0.3, ttft=0.3,
                          decode_time=dec * jitter(), total=0.3 + dec, start=t) for _ in range(b)]
            t += 0.3 + dec * 1.1 + 0.5
    return recs


def test_calibration_recovers_known_costs_exactly():
    true = CostModel(prefill_base_s=0.03, prefill_token_s=2e-4, prefill_attn_s=1e-8, transfer_token_s=3e-5,
                     decode_base_s=0.02, decode_seq_s=0.002, decode_ctx_s=2e-6, decode_overhead_s=0.004)
    fit = calibrate(_records(true, 0.0)).costs
    for name in ("prefill_base_s", "prefill_token_s", "prefill_attn_s", "transfer_token_s", "decode_base_s",
                 "decode_seq_s", "decode_ctx_s", "decode_overhead_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6), name


def test_calibration_with_noise_predicts_within_a_few_percent():
    true = CostModel(prefill_base_s=0.03, prefill_token_s=2e-4, prefill_attn_s=1e-8, transfer_token_s=3e-5,
                     decode_base_s=0.02, decode_seq_s=0.002, decode_ctx_s=2e-6, decode_overhead_s=0.004)
    fit = calibrate(_records(true, 0.03, seed=1)).costs  # +-3% uniform noise on every time
    for name in ("prefill_base_s", "prefill_token_s", "decode_base_s", "decode_ctx_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=0.05), name
    for u, c in ((100, 0), (2000, 0), (500, 1500)):
        assert fit.prefill_time(u, c) + fit.transfer_time(u + c) == pytest.approx(
            true.prefill_time(u, c) + true.transfer_time(u + c), rel=0.03)
    for b, ctx in ((1, 500), (8, 8000), (16, 20000)):
        assert fit.decode_step_time(b, ctx) == pytest.approx(true.decode_step_time(b, ctx), rel=0.03)


def test_calibration_from_simulated_run_round_trips():
    """Records produced by the simulator itself (sequential, then batches of 4 arriving together)."""
    true = CostModel(prefill_base_s=0.02, prefill_token_s=1e-4, decode_base_s=0.01, decode_seq_s=1e-3, decode_ctx_s=1e-6,
                     decode_overhead_s=0.005)
    arr, prompt, out = [], [], []
    for i, (length, n) in enumerate([(64, 8), (256, 16), (512, 24), (1024, 32), (2048, 12)] * 2):
        arr.append(5.0 * i), prompt.append(length), out.append(n)
    for j in range(4):
        arr, prompt, out = arr + [60.0 + 5 * j] * 4, prompt + [128 + 256 * j] * 4, out + [32] * 4
    w = Workload("cal", np.array(arr), np.array(prompt), np.array(out), np.full(len(arr), -1), np.zeros(len(arr), int))
    r = Simulator(true, 1, 1).run(w)
    recs = [dict(prompt_tokens=int(w.prompt_tokens[i]), cached_tokens=0, completion_tokens=int(w.output_tokens[i]),
                 prefill_latency=float(r.ttft_s[i]), decode_time=float(r.e2e_s[i] - r.ttft_s[i]), start=float(w.arrival_s[i]))
            for i in range(len(w))]
    fit = calibrate(recs).costs
    for b, ctx in ((1, 300), (4, 4 * 600)):
        assert fit.decode_step_time(b, ctx) == pytest.approx(true.decode_step_time(b, ctx), rel=0.05)
    decode = lambda m, n, ctx: m.decode_overhead_s + sum(m.decode_step_time(1, ctx + k) for k in range(n - 1))  # noqa: E731
    assert decode(fit, 20, 500) == pytest.approx(decode(true, 20, 500), rel=0.03)
    assert fit.prefill_time(1000) + fit.transfer_time(1000) == pytest.approx(true.prefill_time(1000), rel=0.02)


def test_calibration_uses_server_counters_to_split_the_intercept():
    true = CostModel(prefill_base_s=0.03, prefill_token_s=2e-4, prefill_attn_s=1e-8, transfer_token_s=3e-5,
                     decode_base_s=0.02, decode_seq_s=0.002, decode_ctx_s=2e-6, request_overhead_s=0.005)
    recs = _records(true, 0.0)
    for r in recs:
        r["prefill_latency"] += 0.005  # time outside the engine
    busy = sum(true.prefill_time(r["prompt_tokens"] - r["cached_tokens"], r["cached_tokens"]) for r in recs)
    loads = {"prefill": [{"loads": [{"dp_rank": 0, "total_prefill_busy_us": 0}]},
                         {"loads": [{"dp_rank": 0, "total_prefill_busy_us": busy * 1e6, "max_total_num_tokens": 65536}]}],
             "decode": [{"max_running_requests": 64}, {"max_running_requests": 64}]}
    cal = calibrate(recs, loads=loads)
    assert cal.costs.request_overhead_s == pytest.approx(0.005, rel=0.05)
    assert cal.costs.kv_capacity_tokens == 65536 and cal.costs.max_running_requests == 64


def test_calibration_refuses_too_few_records():
    with pytest.raises(ValueError, match="isolated prefill"):
        calibrate([dict(prompt_tokens=10, cached_tokens=0, completion_tokens=4, prefill_latency=0.1, decode_time=0.1)])


# ----- cost model and workloads ---------------------------------------------------------------------
def test_cost_model_json_round_trip_and_validation(tmp_path):
    path = tmp_path / "c.json"
    FULL.to_json(path)
    assert CostModel.from_json(path) == FULL
    assert CostModel.from_json(FULL.to_json()) == FULL
    with pytest.raises(ValueError, match="unknown"):
        CostModel.from_json(json.dumps({"prefill_base": 1}))
    with pytest.raises(ValueError, match=">= 0"):
        CostModel(decode_base_s=-1)


def test_h200_reference_is_between_its_bounds_and_near_its_data():
    eager, bound = CostModel.h200_llama8b("eager"), CostModel.h200_llama8b("bound")
    assert "h200-llama8b-eager-costs.json" in eager.source
    for length, cached, seconds in H200_LLAMA8B_EAGER["prefill"]:
        assert bound.prefill_time(length - cached, cached) < eager.prefill_time(length - cached, cached)
        if cached:
            assert eager.prefill_time(length - cached, cached) == pytest.approx(seconds, rel=0.4)
    for b, ctx, seconds in H200_LLAMA8B_EAGER["decode"]:
        assert bound.decode_step_time(b, b * ctx) < eager.decode_step_time(b, b * ctx) == pytest.approx(seconds, rel=0.25)
    assert eager.with_tp(2).decode_step_time(8, 8000) < eager.decode_step_time(8, 8000)


def test_workload_from_trace_json_and_jsonl(tmp_path):
    rows = [{"timestamp": 2.0, "input_length": 100, "output_length": 5, "group": "a", "prefix_tokens": 50},
            {"arrival_s": 1.0, "prompt_tokens": 80, "output_tokens": 3}]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("t.json", "t.jsonl"):
        w = Workload.from_trace(tmp_path / name)
        assert w.arrival_s.tolist() == [0.0, 1.0] and w.prompt_tokens.tolist() == [80, 100]
        assert w.group.tolist() == [-1, 0] and w.prefix_tokens.tolist() == [0, 50]
    w.to_trace(tmp_path / "back.jsonl")
    assert Workload.from_trace(tmp_path / "back.jsonl").prompt_tokens.tolist() == [80, 100]


def test_benchmark_workloads_have_their_shapes():
    mt = Workload.benchmark("multi-turn", 48, rate=5.0)
    assert (mt.prefix_tokens == mt.prompt_tokens).all()
    for g in set(mt.group.tolist()):  # a session's turns grow, each reading the one before
        assert np.all(np.diff(mt.prompt_tokens[mt.group == g]) > 0)
    fs = Workload.benchmark("few-shot", 10, rate=5.0)
    assert set(fs.group.tolist()) == {0} and fs.prefix_tokens[0] == 1536
    assert Workload.benchmark("shared-prefix", 1000, rate=50.0).duration_s == pytest.approx(20, rel=0.1)
    with pytest.raises(ValueError, match="unknown shape"):
        Workload.benchmark("few-shot", 10, rate=5.0, groups=3)


# ----- the planner ------------------------------------------------------------------------------------
def test_candidate_shapes_cover_the_budget():
    assert candidate_shapes(budget_servers=3) == [(1, 2, 0, 1), (2, 1, 0, 1), (0, 0, 3, 1)]
    assert (1, 1, 0, 2) in candidate_shapes(budget_gpus=4, tp=(1, 2), colocated=False)


def test_prefill_bound_workload_ranks_more_prefill_servers_first():
    w = Workload.from_distribution(1500, rate=12.0, prompt_tokens=4000, output_tokens=4, seed=0)
    result = plan(FULL, w, SLO(ttft_p90_s=1.0, tpot_p90_s=0.05), budget_servers=5, colocated=False)
    assert result.best.prefill > result.best.decode, result.table()


def test_decode_bound_workload_ranks_more_decode_servers_first():
    costs = CostModel(prefill_base_s=0.01, prefill_token_s=1e-5, decode_base_s=0.02, decode_seq_s=2e-3,
                      max_running_requests=64)
    w = Workload.from_distribution(1500, rate=12.0, prompt_tokens=64, output_tokens=400, seed=0)
    result = plan(costs, w, SLO(ttft_p90_s=1.0, tpot_p90_s=0.08), budget_servers=5, colocated=False)
    assert result.best.decode > result.best.prefill, result.table()


def test_ten_thousand_requests_and_eight_ratios_plan_in_under_a_minute():
    w = Workload.benchmark("shared-prefix", 10_000, rate=40.0)
    started = time.perf_counter()
    result = plan(CostModel.h200_llama8b(), w, SLO(0.5, 0.05), budget_servers=9, colocated=False)
    elapsed = time.perf_counter() - started
    assert len(result.candidates) == 8
    assert elapsed < 120, f"{elapsed:.0f} s (aim: < 60 s; generous bound for a loaded machine)"
    assert "--pd-ratio" in result.launch_command() and "SGLangPDConfig(pd_ratio=" in result.config_snippet()
