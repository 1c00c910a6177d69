"""Every recipe runs as a user runs it (``python -m recipes.NAME``) on the tiny model and says what it should.

Recipes that need running servers use the session cluster of ``tests/conftest.py``
(``SGLPD_TEST_REUSE=1`` reuses the shared dev servers). Recipes that launch
their own servers get a free block of ports in 29000-30000, run one at a time
and only with enough free memory, and must leave nothing listening behind.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["pd_demo", "pd_server", "runtime_demo", "simple_client", "router_frontend", "multinode_plan"]
#: A CPU server needs ~3.5 GB; two of them plus headroom.
_MEMORY_NEEDED_MB = 7000


def _start(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"recipes.{name}", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the recipe's own handlers stop its servers
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{proc.args} did not finish in {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def _run(name: str, *args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    return _finish(_start(name, *args), timeout)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_block() -> int:
    """A base port in 29000-30000 whose whole 100-port block (every server's 10, the router's) is free.

    Below Linux's ephemeral range (32768-60999): SGLang's schedulers listen on
    random ports there, and one took a port of this block in CI.
    """
    for base in range(29000, 30000, 100):
        if not any(_listening(p) for p in range(base, base + 100)):
            return base
    pytest.fail("no free port block in 29000-30000")


def _available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


@pytest.fixture
def launch_ports():
    """Base port for a recipe that launches up to 2 servers; waits (up to 5 min) for the memory they need."""
    deadline = time.monotonic() + 300
    while _available_mb() < _MEMORY_NEEDED_MB:
        if time.monotonic() > deadline:
            pytest.skip(f"needs {_MEMORY_NEEDED_MB} MB available to launch servers, have {_available_mb()} MB")
        time.sleep(10)
    base = _free_block()
    yield base
    assert not any(_listening(base + 10 * i) for i in range(2)), "a server of the recipe outlived it"


# ----- no servers ------------------------------------------------------------------------


def test_every_recipe_has_help():
    procs = {name: _start(name, "--help") for name in RECIPES}  # in parallel: each imports sglang
    for name, proc in procs.items():
        code, out, err = _finish(proc, 180)
        assert code == 0, err
        assert f"usage: python -m recipes.{name}" in out


def test_multinode_plan_prints_one_command_per_server():
    good = _start("multinode_plan", "--nodes", "2", "--gpus-per-node", "4", "--pd-ratio", "1:2", "--tp", "2",
                  "--model", "org/model-7b", "--hosts", "gpu-a,gpu-b")
    too_big = _start("multinode_plan", "--nodes", "1", "--gpus-per-node", "2", "--pd-ratio", "2:2")
    code, out, err = _finish(good, 120)
    assert code == 0, err
    commands = [line for line in out.splitlines() if "python -m sglang.launch_server" in line]
    assert len(commands) == 3
    assert commands[0].startswith("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL=2 CUDA_VISIBLE_DEVICES=0,1 ")
    assert "--disaggregation-mode prefill" in commands[0] and "--tp-size 2" in commands[0]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in commands[1] and "--disaggregation-mode decode" in commands[1]
    assert "CUDA_VISIBLE_DEVICES=0,1 " in commands[2]  # the second node starts again at GPU 0
    assert "## on gpu-a (2 server(s))" in out and "## on gpu-b (1 server(s))" in out
    assert ("python -m sglang_router.launch_router --pd-disaggregation --prefill http://gpu-a:30000 30002 "
            "--decode http://gpu-a:30010 --decode http://gpu-b:30020") in out
    assert "PDBackend(" in out and "'http://gpu-b:30020'" in out
    code, _, err = _finish(too_big, 120)
    assert code == 2 and "need 4 GPUs" in err


# ----- against the session cluster -------------------------------------------------------------


def test_simple_client_checks_the_servers_then_runs_programs(cluster):
    urls = cluster.prefill_urls + cluster.decode_urls + cluster.colocated_urls
    code, out, err = _run("simple_client", "--prefill", *cluster.prefill_urls, "--decode", *cluster.decode_urls,
                          "--colocated", *cluster.colocated_urls)
    assert code == 0, err
    header, *rows = out.split("\n\n")[0].splitlines()
    assert header.split() == ["URL", "LISTED", "AS", "ACTUAL", "ROLE", "MODEL", "HEALTHY"]
    assert [row.split()[0] for row in rows] == urls
    assert all(row.split()[1] == row.split()[2] and row.split()[-1] == "yes" for row in rows)
    assert "random tiny test model" in out
    for program in ("chat_completion ->", "classify        ->", "extract_regex   ->"):
        assert program in out and "ERROR" not in out


def test_simple_client_names_a_decode_server_listed_as_prefill(cluster):
    decode = cluster.decode_urls[0]
    code, out, err = _run("simple_client", "--prefill", cluster.prefill_urls[0], decode, "--decode", decode)
    assert code == 1
    assert f"{decode}: listed as prefill but it is a decode server" in err
    assert "move it to --decode" in err
    assert "chat_completion" not in out  # no work was sent


def test_router_frontend_fronts_the_running_servers(cluster):
    port = _free_block()
    code, out, err = _run("router_frontend", "--prefill", *cluster.prefill_urls, "--decode", *cluster.decode_urls,
                          "--port", str(port), "--once", timeout=180)
    assert code == 0, err
    assert f"--port {port} --prometheus-port {port + 1}" in out
    assert "Router ready after" in out
    assert re.search(rf"POST http://127.0.0.1:{port}/generate -> '.*' \(16 tokens", out)
    assert "batched text list -> HTTP 422" in out and "sgl.select" in out
    assert f"curl http://127.0.0.1:{port}/generate" in out
    assert not _listening(port), "the router outlived the recipe"


# ----- recipes that launch their own servers (one at a time) -----------------------------------


def test_pd_demo(launch_ports, tmp_path):
    report_path = tmp_path / "demo.json"
    started = time.monotonic()
    code, out, err = _run("pd_demo", "--base-port", str(launch_ports), "--max-tokens", "16",
                          "--json", str(report_path), timeout=300)
    elapsed = time.monotonic() - started
    assert code == 0, err[-3000:]
    assert "random tiny test model" in out
    for section in ("=== 1 request ===", "=== run_batch of 8 ===", "=== streamed generation ===",
                    "BENCHMARK SUMMARY", "Average prefill:", "Average decode:", "Time distribution:",
                    "All servers stopped."):
        assert section in out
    assert out.count("[Prefill] http://127.0.0.1:") == 10
    assert out.count("[Decode] Generating 16 tokens on http://127.0.0.1:") == 10
    report = json.loads(report_path.read_text())
    assert report["errors"] == 0 and report["summary"]["requests"] == 10 and len(report["records"]) == 10
    print(f"pd_demo took {elapsed:.0f} s")


def test_pd_server_demo(launch_ports):
    code, out, err = _run("pd_server", "--pd-ratio", "1:1", "--demo", "--max-tokens", "8",
                          "--base-port", str(launch_ports), timeout=300)
    assert code == 0, err[-3000:]
    assert "Launching 1 prefill + 1 decode server(s)" in out
    assert "BENCHMARK SUMMARY" in out and out.count("[Decode] Generating 8 tokens") == 10


def test_runtime_demo_simple(launch_ports):
    code, out, err = _run("runtime_demo", "--simple", "--base-port", str(launch_ports), "--max-tokens", "8",
                          timeout=240)
    assert code == 0, err[-3000:]
    assert f"Runtime up: http://127.0.0.1:{launch_ports}" in out
    assert re.search(r"Generated 8 tokens in \d+\.\d{3}s", out)
    assert "Runtimes stopped." in out


def test_runtime_demo_programs(launch_ports):
    code, out, err = _run("runtime_demo", "--base-port", str(launch_ports), "--max-tokens", "8", timeout=300)
    assert code == 0, err[-3000:]
    for section in ("[Conversation] turn 2:", "[stream_text]", "[extract_json] {'name':",
                    "[draft_and_judge] drafts", "[ask_document]"):
        assert section in out
    assert re.search(r"\[classify\] '(good news|bad news)'", out)
    assert re.search(r"\(cached [1-9]\d* prompt tokens\)", out)  # turn 2 reused turn 1's cache
    assert re.search(r"\d+ requests, 0 errors", out)
    assert "Runtimes stopped." in out
