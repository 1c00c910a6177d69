"""No server outlives the process that started it: on an exception, on Ctrl-C, on SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]

LAUNCHER = """
import faulthandler, signal, sys, time
# A background job of a non-interactive shell (how CI may start pytest) inherits SIGINT ignored;
# a launcher then rightly keeps ignoring it. This test is about what Ctrl-C does: take it back.
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if this hangs
from backends import PDCluster, SGLangPDConfig
config = SGLangPDConfig(pd_ratio=(0, 0), colocated=1, base_port=int(sys.argv[1]))
with PDCluster(config):
    print("READY", flush=True)
    sys.stdin.readline()  # the test says when, once it has seen the servers
    if sys.argv[2] == "raise":
        raise RuntimeError("a failing test inside the cluster")
    time.sleep(600)
"""


def _servers_on(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "sglang" in cmdline and f"--port {port}" in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _wait_ready(child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if "READY" in line:
            return
        if not line and child.poll() is not None:
            raise AssertionError(f"launcher exited early with {child.returncode}")
    raise AssertionError("launcher never reported READY")


def test_no_server_outlives_its_launcher(tmp_path):
    ends = {"raise": 30200, "sigint": 30300, "sigkill": 30400}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    errors = {how: open(tmp_path / f"{how}.err", "w") for how in ends}  # noqa: SIM115 - closed below
    children = {
        how: subprocess.Popen([sys.executable, "-c", LAUNCHER, str(port), how], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors[how], text=True)
        for how, port in ends.items()
    }
    try:
        for child in children.values():
            _wait_ready(child, timeout=300)
        for port in ends.values():
            assert _servers_on(port), f"no server found on port {port} while its launcher runs"
        children["raise"].stdin.write("go\n")
        children["raise"].stdin.flush()
        children["sigint"].send_signal(signal.SIGINT)
        children["sigkill"].kill()
        for how, child in children.items():
            try:
                child.wait(timeout=90)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGUSR1)
                time.sleep(2)
                raise AssertionError(f"the {how} launcher did not exit: "
                                     f"{(tmp_path / f'{how}.err').read_text()[-3000:]}") from None
        assert children["raise"].returncode != 0
        deadline = time.monotonic() + 30  # the SIGKILL case relies on the reaper, which polls
        while any(_servers_on(p) for p in ends.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = {how: [p.pid for p in _servers_on(port)] for how, port in ends.items()}
        assert leftovers == {how: [] for how in ends}
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
        for handle in errors.values():
            handle.close()
        for port in ends.values():
            for proc in _servers_on(port):
                proc.kill()
