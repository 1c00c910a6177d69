"""``python -m recipes.bench_pd`` end to end, as a user runs it, on a tiny workload.

The bench runs as a subprocess against the session cluster of ``tests/conftest.py``
(``SGLPD_TEST_REUSE=1`` reuses the shared dev servers) and must write a JSON
holding every route and every metric for every workload, a table and a plot,
and leave no router behind. Timings are never asserted: on a shared 2-core
machine they say nothing about correctness.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.bench.report import METRICS
from recipes.bench.suite import ALL_ROUTES

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("shared-prefix", "multi-turn", "few-shot")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench(cluster, tmp_path_factory):
    """One quick bench run over the cluster's full pools: its output folder and console output."""
    out = tmp_path_factory.mktemp("bench-out")
    argv = [sys.executable, "-m", "recipes.bench_pd", "--quick", "--out", str(out), "--overhead-requests", "200",
            "--prefill", *cluster.prefill_urls, "--decode", *cluster.decode_urls,
            "--colocated", *cluster.colocated_urls]
    proc = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=230)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench stops its routers (own sessions: a SIGKILL would orphan them)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench did not finish in 230 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return out, stdout, json.loads((out / "bench_pd.json").read_text())


def test_json_holds_every_route_and_metric(bench, cluster):
    _, _, document = bench
    topologies = {f"{len(cluster.prefill_urls)}P{len(cluster.decode_urls)}D", "1P1D"}
    expected = [(t, w, r) for t in sorted(topologies) for w in WORKLOADS for r in ALL_ROUTES if r != "colocated"]
    expected += [("colocated", w, "colocated") for w in WORKLOADS]
    found = {(r["topology"], r["workload"], r["route"]): r for r in document["summary"]}
    assert sorted(found) == sorted(expected)
    for (topology, workload, route), entry in found.items():
        metrics = entry["metrics"]
        missing = [m for m in METRICS if m not in metrics]
        assert not missing, f"{topology} {workload} {route} lacks {missing}"
        assert metrics["errors"] == 0, f"{topology} {workload} {route} had errors"
        assert metrics["requests"] == document["setup"]["workloads"][workload]["requests"]
    assert not [r for r in document["results"] if "error" in r]


def test_token_counts_agree_with_the_servers(bench):
    """The bound is computed with the tokenizer; it must count prompts as the servers do."""
    _, _, document = bench
    for entry in document["summary"]:
        m = entry["metrics"]
        assert m["tokenizer_prompt_tokens"] == m["prompt_tokens"], entry["route"]
        assert 0 <= m["cached_tokens"] <= m["prompt_tokens"]
        assert 0 < m["best_cached_tokens"] < m["tokenizer_prompt_tokens"]


def test_adapter_routes_report_their_routing_reasons(bench):
    _, _, document = bench
    adapter = [r for r in document["results"] if r["route"].startswith("adapter-")]
    assert adapter
    for entry in adapter:
        reasons = entry["diagnostics"]["route_reasons"]
        assert sum(reasons.values()) == entry["metrics"]["requests"]


def test_table_plot_and_overhead_are_written(bench):
    out, stdout, document = bench
    assert "| topology | workload | route |" in stdout
    assert (out / "bench_pd.md").read_text().startswith("Setup:")
    assert (out / "bench_pd.png").stat().st_size > 10_000
    for case in document["overhead"]["cases"]:
        assert case["adapter"]["cpu_us"] > 0 and case["direct"]["cpu_us"] > 0


def test_no_router_is_left_running(bench):
    """Every router the bench started (pid logged in its log's header) is gone."""
    out, _, _ = bench
    pids = []
    for log in (out / "bench_pd-logs").rglob("*.log"):
        pids += [int(p) for p in re.findall(r"^# pid (\d+)$", log.read_text(errors="replace"), re.M)]
    assert pids, "no router log found"
    alive = [p for p in pids if "sglang" in _cmdline(p)]  # the router renames itself sglang::router
    assert not alive, f"routers still running: {alive}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
