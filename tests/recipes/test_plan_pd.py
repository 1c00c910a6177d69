"""``python -m recipes.plan_pd`` on the H200 reference costs with tiny settings: no servers launched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backends.planner import CostModel
from recipes import plan_pd

REPO = Path(__file__).resolve().parents[2]


def test_plan_pd_as_a_user_runs_it(tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    proc = subprocess.run([sys.executable, "-m", "recipes.plan_pd", "--costs", "h200-llama8b", "--workload", "few-shot",
                           "--requests", "300", "--rate", "30", "--ttft-p90", "0.5", "--tpot-p90", "0.05",
                           "--budget-servers", "3", "--json", str(out), "--plot", str(png)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for expected in ("ratio", "goodput/s", "TTFT p50/p90", "1:2", "2:1", "colocated x3", "recommendation:",
                     "python -m recipes.launch_pd --pd-ratio", "SGLangPDConfig(", "h200-llama8b-eager-costs.json"):
        assert expected in proc.stdout, (expected, proc.stdout)
    plan = json.loads(out.read_text())
    assert len(plan["candidates"]) == 3 and plan["plan_seconds"] > 0
    assert {"goodput_rps", "ttft_p90_s", "tpot_p90_s", "utilisation", "sim_seconds"} <= set(plan["candidates"][0])
    assert plan["recommendation"]["label"] == plan["candidates"][0]["label"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_pd_on_a_trace_and_a_cost_file(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"arrival_s": i * 0.05, "prompt_tokens": 2000, "output_tokens": 8,
                                           "group": i % 3, "prefix_tokens": 1500}) for i in range(200)))
    costs = tmp_path / "costs.json"
    CostModel.h200_llama8b("bound").to_json(costs)
    code = plan_pd.main(["--costs", str(costs), "--workload", str(trace), "--requests", "150", "--ttft-p90", "0.2",
                         "--tpot-p90", "0.02", "--budget-gpus", "4", "--tp", "1", "2", "--model", "meta-llama/Llama-3.1-8B"])
    text = capsys.readouterr().out
    assert code == 0
    assert "trace.jsonl, 150 requests" in text and "physical lower bound" in text
    assert "--model meta-llama/Llama-3.1-8B" in text and "tp_size=" in text


def test_validate_refuses_reference_costs_before_launching_anything(capsys):
    code = plan_pd.main(["--workload", "multi-turn", "--requests", "20", "--ttft-p90", "1", "--tpot-p90", "0.1",
                         "--budget-servers", "2", "--validate"])
    assert code == 2
    assert "calibrated here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ttft-p90", "1"], "--tpot-p90"),
    (["--ttft-p90", "1", "--tpot-p90", "0.1"], "--budget-servers"),
    (["--calibrate", "x.json", "--prefill", "http://a:1"], "both --prefill and --decode"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_pd.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_workload_file_is_a_clear_error(capsys):
    code = plan_pd.main(["--workload", "/nonexistent/trace.jsonl", "--ttft-p90", "1", "--tpot-p90", "0.1",
                         "--budget-servers", "2"])
    assert code == 2 and "trace.jsonl" in capsys.readouterr().err
