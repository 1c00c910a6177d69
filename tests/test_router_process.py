"""The real sglang-router process wrapper, without servers: start, readiness, port clash, cleanup."""

from __future__ import annotations

import socket

import psutil
import pytest

from backends import RouterPortTaken, RouterProcess, router_argv


def _argv(port: int) -> list[str]:
    # Workers nobody listens on: the router starts but never becomes ready.
    return router_argv([("http://127.0.0.1:9", 10)], ["http://127.0.0.1:11"], host="127.0.0.1", port=port,
                       policy="round_robin")


def test_a_taken_port_is_reported_as_such(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with RouterProcess(_argv(port), f"http://127.0.0.1:{port}", tmp_path / "router.log") as router:
            with pytest.raises(RouterPortTaken, match=str(port)):
                router.wait_ready(60)
    header = (tmp_path / "router.log").read_text()
    assert header.startswith("# ") and "# pid " in header  # the command and pid head the log


def test_a_router_that_never_gets_ready_times_out_and_is_stopped(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    router = RouterProcess(_argv(port), f"http://127.0.0.1:{port}", tmp_path / "router.log")
    with router:
        pid = router.pid
        assert f"# pid {pid}\n" in (tmp_path / "router.log").read_text()
        with pytest.raises(RuntimeError, match="not ready after 4 s"):
            router.wait_ready(4)
        assert router.running()
    assert not router.running() and router.pid is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
