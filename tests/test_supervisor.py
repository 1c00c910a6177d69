"""The supervisor restarts what dies, leaves alone what was killed on purpose, and ends with its cluster.

Fast, no SGLang: the :class:`Supervisor` is driven with a stand-in cluster
object (timings in tens of milliseconds), then a real :class:`PDCluster`
runs two tiny HTTP servers (a script written to ``tmp_path``) in place of
SGLang, so the real restart path (process groups, ports, appended logs,
``/health``) is exercised in a few seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import sys
import textwrap
import threading
import time
import types

import httpx
import pytest

from backends import ClusterStartError, ConfigurationError, PDCluster, SGLangPDConfig
from backends.launcher import RestartEvent
from backends.launcher._supervisor import TRANSFER_THREAD_DEAD, Gate, Supervisor

MARKER_LINE = f"[2026-01-01 00:00:00] {TRANSFER_THREAD_DEAD} KeyError(7)\n"


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# ----- the supervisor alone, on a stand-in cluster ---------------------------------------------
class FakeCluster:
    """The five public methods the supervisor calls, with restart() behaving like PDCluster's."""

    def __init__(self, log_dir, names=("prefill-0", "decode-0")) -> None:
        self.servers = [types.SimpleNamespace(name=n, role=n.split("-")[0], index=int(n.split("-")[1])) for n in names]
        self.log_dir = log_dir
        self.gate = Gate(list(names))
        self.pids = {n: 1000 + i for i, n in enumerate(names)}
        self.codes: dict[str, int] = {}
        self.restart_calls: list[tuple[str, float]] = []
        self.fail_restarts = 0  # the next N restarts raise
        self.crash_after_restart = False  # every restarted process exits at once
        self._next_pid = 2000
        for n in names:
            self.log(n, f"# sgl-pd: {n} python -m sglang.launch_server\n")

    def log_path(self, spec):
        return self.log_dir / f"{spec.name}.log"

    def log(self, name: str, text: str) -> None:
        with open(self.log_dir / f"{name}.log", "a", encoding="utf-8") as f:
            f.write(text)

    def pid(self, role: str, index: int):
        return self.pids.get(f"{role}-{index}")

    def exited(self) -> dict[str, int]:
        return dict(self.codes)

    def crash(self, name: str, code: int = -9) -> None:
        self.codes[name] = code

    def kill(self, name: str) -> None:
        with self.gate.lock(name):
            self.gate.held.add(name)
            self.codes[name] = -9

    def restart(self, role: str, index: int) -> None:
        name = f"{role}-{index}"
        with self.gate.lock(name):
            self.gate.held.discard(name)
            self.restart_calls.append((name, time.monotonic()))
            self.codes.pop(name, None)
            self.pids[name] = None
            self.log(name, f"# sgl-pd: {name} python -m sglang.launch_server\n")
            if self.fail_restarts:
                self.fail_restarts -= 1
                self.gate.held.add(name)  # as PDCluster.restart() does after a failure
                raise ClusterStartError(f"{role} server {index} exited with code 1 during start-up.\nLog: x")
            self._next_pid += 1
            self.pids[name] = self._next_pid
            if self.crash_after_restart:
                self.codes[name] = 1


@pytest.fixture
def fake(tmp_path):
    return FakeCluster(tmp_path)


@pytest.fixture
def supervise():
    started = []

    def run(cluster, **options) -> Supervisor:
        options = {"backoff": 0.05, "poll_interval": 0.02, **options}
        sup = Supervisor(cluster, cluster.gate, **options).start()
        started.append(sup)
        return sup

    yield run
    for sup in started:
        sup.stop(5.0)


def test_a_server_that_exits_is_restarted_and_the_others_are_left_alone(fake, supervise):
    sup = supervise(fake)
    fake.crash("prefill-0", -9)
    _wait(lambda: sup.events(), 5, "a restart event")
    [event] = sup.events()
    assert (event.server, event.reason, event.attempt, event.outcome) == (
        "prefill-0", "exited with code -9", 1, "restarted")
    assert event.seconds_to_healthy >= 0.05  # the first backoff
    assert abs(event.time - time.time()) < 5
    assert [name for name, _ in fake.restart_calls] == ["prefill-0"]
    assert fake.pids["decode-0"] == 1001


def test_the_transfer_thread_line_restarts_a_running_server_once(fake, supervise):
    sup = supervise(fake)
    time.sleep(0.1)  # the first scan has read the start-up log
    fake.log("decode-0", MARKER_LINE)
    _wait(lambda: sup.events(), 5, "a restart event")
    time.sleep(0.3)  # the old process's line, read again after the restart, must not count twice
    assert [(e.server, e.reason, e.outcome) for e in sup.events()] == [
        ("decode-0", "transfer thread died", "restarted")]
    assert len(fake.restart_calls) == 1


def test_a_half_written_line_counts_once_complete(fake, supervise):
    sup = supervise(fake)
    cut = len(MARKER_LINE) // 2
    fake.log("prefill-0", MARKER_LINE[:cut])
    time.sleep(0.15)
    fake.log("prefill-0", MARKER_LINE[cut:])
    _wait(lambda: sup.events(), 5, "a restart event")
    assert sup.events()[0].reason == "transfer thread died"


def test_a_line_from_before_a_callers_restart_is_not_blamed_on_the_new_process(fake, supervise):
    sup = supervise(fake)
    time.sleep(0.1)
    with fake.gate.lock("prefill-0"):  # a caller's restart() in progress: the supervisor waits
        fake.log("prefill-0", MARKER_LINE)
        time.sleep(0.1)
        fake.restart("prefill", 0)
    time.sleep(0.4)
    assert sup.events() == []
    assert len(fake.restart_calls) == 1


def test_attempts_are_bounded_and_spaced_by_exponential_backoff(fake, supervise):
    sup = supervise(fake, max_restarts=3, backoff=0.1)
    fake.fail_restarts = 100
    crashed = time.monotonic()
    fake.crash("prefill-0", 1)
    _wait(lambda: any(e.outcome == "gave up" for e in sup.events()), 10, "giving up")
    assert [(e.attempt, e.outcome) for e in sup.events()] == [
        (1, "failed"), (2, "failed"), (3, "failed"), (3, "gave up")]
    assert "exited with code 1 during start-up" in sup.events()[0].detail
    assert "left down until restart()" in sup.events()[-1].detail
    times = [crashed] + [t for _, t in fake.restart_calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, (0.1, 0.2, 0.4)):
        assert expected * 0.9 <= gap < expected + 1.0
    assert "prefill-0" in fake.gate.held
    time.sleep(0.5)
    assert len(fake.restart_calls) == 3  # it stays down
    assert fake.pids["decode-0"] == 1001


def test_a_crash_loop_gives_up_after_max_restarts(fake, supervise):
    sup = supervise(fake, max_restarts=2)
    fake.crash_after_restart = True
    fake.crash("decode-0", 1)
    _wait(lambda: any(e.outcome == "gave up" for e in sup.events()), 10, "giving up")
    assert [(e.attempt, e.outcome) for e in sup.events()] == [(1, "restarted"), (2, "restarted"), (2, "gave up")]


def test_the_window_forgets_old_attempts(fake, supervise):
    sup = supervise(fake, max_restarts=1, window=0.3)
    fake.crash("prefill-0")
    _wait(lambda: len(sup.events()) == 1, 5, "the first restart")
    time.sleep(0.4)
    fake.crash("prefill-0")
    _wait(lambda: len(sup.events()) == 2, 5, "the second restart")
    assert [(e.attempt, e.outcome) for e in sup.events()] == [(1, "restarted"), (1, "restarted")]


def test_max_restarts_zero_only_reports(fake, supervise):
    sup = supervise(fake, max_restarts=0)
    fake.crash("prefill-0", 2)
    _wait(lambda: sup.events(), 5, "an event")
    assert [(e.attempt, e.outcome) for e in sup.events()] == [(0, "gave up")]
    assert fake.restart_calls == []


def test_an_intentional_kill_is_left_down_until_restart(fake, supervise):
    sup = supervise(fake)
    fake.kill("prefill-0")
    time.sleep(0.4)
    assert sup.events() == [] and fake.restart_calls == []
    fake.restart("prefill", 0)  # the caller brings it back: it is watched again
    fake.crash("prefill-0")
    _wait(lambda: sup.events(), 5, "a restart event")
    assert sup.events()[0].outcome == "restarted"


def test_a_callers_restart_during_the_backoff_is_not_repeated(fake, supervise):
    sup = supervise(fake, backoff=0.3)
    fake.crash("prefill-0")
    time.sleep(0.1)  # the supervisor has seen it and waits out its backoff
    fake.restart("prefill", 0)
    time.sleep(0.6)
    assert sup.events() == []
    assert len(fake.restart_calls) == 1


def test_stop_ends_the_thread_at_once_even_during_a_backoff(fake, supervise):
    sup = supervise(fake, backoff=30.0)
    fake.crash("prefill-0")
    time.sleep(0.1)
    began = time.monotonic()
    sup.stop(5.0)
    assert time.monotonic() - began < 1.0
    assert not sup.alive
    assert fake.restart_calls == [] and sup.events() == []


def test_each_restart_is_logged_as_a_warning(fake, supervise, caplog):
    caplog.set_level(logging.WARNING, logger="backends.launcher._supervisor")
    sup = supervise(fake)
    fake.crash("prefill-0", -9)
    _wait(lambda: sup.events(), 5, "a restart event")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("prefill-0 exited with code -9; restarting it in" in m for m in messages)
    assert any(m.startswith("supervisor: prefill-0 exited with code -9: attempt 1 restarted") for m in messages)


def test_an_event_reads_as_one_line():
    event = RestartEvent("prefill-0", "exited with code -9", 0.0, 1, "restarted", 95.25)
    assert str(event) == "prefill-0 exited with code -9: attempt 1 restarted, healthy again after 95.2 s"
    gave_up = RestartEvent("decode-0", "transfer thread died", 0.0, 3, "gave up", None, "3 attempts")
    assert str(gave_up) == "decode-0 transfer thread died: attempt 3 gave up (3 attempts)"


# ----- a real PDCluster running stand-in servers -----------------------------------------------
STAND_IN = textwrap.dedent(f'''
    """Answers GET /health; /exit exits with code 3; /transfer-death logs SGLang's transfer-thread death.

    A file ``mode-PORT`` beside this script makes the next start fail: "exit" exits with code 1,
    "hang" never serves.
    """
    import http.server, os, pathlib, sys, time

    mode = pathlib.Path(__file__).with_name(f"mode-{{sys.argv[1]}}")
    if mode.exists() and mode.read_text() == "exit":
        print("stand-in refuses to start", flush=True)
        sys.exit(1)
    while mode.exists() and mode.read_text() == "hang":
        time.sleep(0.1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            self.wfile.flush()
            if self.path == "/exit":
                os._exit(3)
            if self.path == "/transfer-death":
                print("Scheduler hit an exception: {TRANSFER_THREAD_DEAD} KeyError(7)", flush=True)

        def log_message(self, *args):
            pass

    print("stand-in serving", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


def _free_base_port() -> int:
    """A base whose 20 ports are free (random, so parallel sessions rarely collide)."""
    for _ in range(200):
        base = random.randrange(21000, 29000, 20)
        try:
            for port in range(base, base + 20):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _stand_in_cluster(tmp_path, **options) -> PDCluster:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    config = SGLangPDConfig(pd_ratio=(1, 1), model_path=str(tmp_path), base_port=_free_base_port())
    cluster = PDCluster(config, log_dir=tmp_path / "logs", startup_timeout=20.0, stop_timeout=3.0, **options)
    # Same names, ports and restart path; only the command is the stand-in instead of SGLang.
    cluster._specs = [dataclasses.replace(s, argv=[sys.executable, str(script), str(s.port)], env={})
                      for s in cluster._specs]
    return cluster


@pytest.fixture
def stand_ins(tmp_path):
    with _stand_in_cluster(tmp_path) as cluster:
        yield cluster


def _get(url: str, path: str) -> int | None:
    try:
        return httpx.get(url + path, timeout=2.0, trust_env=False).status_code
    except httpx.HTTPError:
        return None


def _supervisor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sgl-pd-supervisor"]


def test_a_cluster_restarts_a_server_that_exits_and_keeps_its_log(stand_ins):
    spec = stand_ins.spec("prefill", 0)
    decode_pid, old_pid = stand_ins.pid("decode", 0), stand_ins.pid("prefill", 0)
    _get(spec.url, "/exit")
    _wait(lambda: stand_ins.restarts(), 15, "the restart")
    [event] = stand_ins.restarts()
    assert (event.server, event.reason, event.outcome) == ("prefill-0", "exited with code 3", "restarted")
    assert _get(spec.url, "/health") == 200
    assert stand_ins.pid("prefill", 0) not in (None, old_pid)
    assert stand_ins.pid("decode", 0) == decode_pid
    log = stand_ins.log_path(spec).read_text()
    assert log.count("# sgl-pd: prefill-0") == 2 and log.count("stand-in serving") == 2


def test_a_cluster_restarts_a_server_whose_transfer_thread_died(stand_ins):
    spec = stand_ins.spec("decode", 0)
    old_pid = stand_ins.pid("decode", 0)
    _get(spec.url, "/transfer-death")
    _wait(lambda: stand_ins.restarts(), 15, "the restart")
    assert [(e.server, e.reason, e.outcome) for e in stand_ins.restarts()] == [
        ("decode-0", "transfer thread died", "restarted")]
    assert stand_ins.pid("decode", 0) != old_pid
    assert _get(spec.url, "/health") == 200


def test_kill_stays_down_until_restart_and_a_crash_after_that_is_restarted(stand_ins):
    spec = stand_ins.spec("prefill", 0)
    stand_ins.kill("prefill", 0)
    time.sleep(2.5)  # longer than a poll plus the first backoff
    assert stand_ins.restarts() == [] and _get(spec.url, "/health") is None
    assert stand_ins.down() == ["prefill-0"] and stand_ins.exited() == {}  # kill() reaped it: no exit code
    stand_ins.restart("prefill", 0)
    assert stand_ins.down() == []
    os.killpg(stand_ins.pid("prefill", 0), signal.SIGKILL)  # a crash, not through kill()
    _wait(lambda: stand_ins.restarts(), 15, "the restart")
    assert stand_ins.restarts()[0].reason == "exited with code -9"
    assert _get(spec.url, "/health") == 200


def test_a_server_that_cannot_start_again_gets_bounded_attempts_then_stays_down(stand_ins, tmp_path):
    spec = stand_ins.spec("prefill", 0)
    decode_pid = stand_ins.pid("decode", 0)
    (tmp_path / f"mode-{spec.port}").write_text("exit")
    crashed = time.monotonic()
    os.killpg(stand_ins.pid("prefill", 0), signal.SIGKILL)
    _wait(lambda: any(e.outcome == "gave up" for e in stand_ins.restarts()), 30, "giving up")
    assert time.monotonic() - crashed >= 1 + 2 + 4  # the backoff
    events = stand_ins.restarts()
    assert [(e.attempt, e.outcome) for e in events] == [(1, "failed"), (2, "failed"), (3, "failed"), (3, "gave up")]
    assert all("exited with code 1 during start-up" in e.detail for e in events[:3])
    assert stand_ins.pid("prefill", 0) is None
    assert stand_ins.pid("decode", 0) == decode_pid and _get(stand_ins.spec("decode", 0).url, "/health") == 200
    assert stand_ins.log_path(spec).read_text().count("stand-in refuses to start") == 3
    time.sleep(1.5)
    assert len(stand_ins.restarts()) == 4  # left down
    (tmp_path / f"mode-{spec.port}").unlink()
    stand_ins.restart("prefill", 0)  # the way back
    assert _get(spec.url, "/health") == 200


def test_stop_cuts_a_supervised_restart_short(tmp_path):
    before = len(_supervisor_threads())  # a session cluster of the e2e tests may have its own
    cluster = _stand_in_cluster(tmp_path).start()
    spec = cluster.spec("decode", 0)
    (tmp_path / f"mode-{spec.port}").write_text("hang")
    os.killpg(cluster.pid("decode", 0), signal.SIGKILL)
    _wait(lambda: cluster.log_path(spec).read_text().count("# pid") == 2, 10, "the restart to launch")
    time.sleep(0.5)
    began = time.monotonic()
    cluster.stop()
    assert time.monotonic() - began < 10  # not the 20 s start-up timeout
    assert len(_supervisor_threads()) == before
    assert not any(_get(s.url, "/health") for s in cluster.servers)
    assert cluster.restarts() == []  # a restart cut short by stop() is no failure


def test_stop_ends_the_supervisor_thread(tmp_path):
    before = len(_supervisor_threads())
    cluster = _stand_in_cluster(tmp_path).start()
    assert len(_supervisor_threads()) == before + 1
    pids = [cluster.pid(s.role, s.index) for s in cluster.servers]
    cluster.stop()
    assert len(_supervisor_threads()) == before
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_without_supervision_an_exit_is_only_reported(tmp_path):
    with _stand_in_cluster(tmp_path, supervise=False) as cluster:
        spec = cluster.spec("prefill", 0)
        _get(spec.url, "/exit")
        _wait(lambda: cluster.exited(), 10, "the exit")
        time.sleep(2.0)
        assert cluster.exited() == {"prefill-0": 3}
        assert cluster.restarts() == []


def test_max_restarts_must_be_a_non_negative_int():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError, match="max_restarts"):
            PDCluster(SGLangPDConfig(model_path="/x"), max_restarts=bad)


# ----- the recipes stay up through the supervisor ----------------------------------------------
def test_launch_pd_prints_each_restart_and_ends_when_every_server_is_down(capsys):
    from recipes import launch_pd

    events = [RestartEvent("prefill-0", "exited with code -9", 0.0, 1, "restarted", 3.5)]
    later = [RestartEvent("prefill-0", "exited with code 1", 0.0, 0, "gave up", None, "0 attempts"),
             RestartEvent("decode-0", "exited with code 1", 0.0, 0, "gave up", None, "0 attempts")]
    polls = iter([[], events, events, events + later])
    cluster = types.SimpleNamespace(
        servers=[types.SimpleNamespace(name="prefill-0"), types.SimpleNamespace(name="decode-0")],
        restarts=lambda: next(polls), log_path=lambda name: f"/logs/{name}.log")
    assert launch_pd.serve_supervised(cluster, poll=0.0) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[supervisor] prefill-0 exited with code -9: attempt 1 restarted, healthy again after 3.5 s; "
        "log=/logs/prefill-0.log",
        "[supervisor] prefill-0 exited with code 1: attempt 0 gave up (0 attempts); log=/logs/prefill-0.log",
        "[supervisor] decode-0 exited with code 1: attempt 0 gave up (0 attempts); log=/logs/decode-0.log",
    ]
    assert "every server is down" in err


def test_the_recipes_take_no_supervise():
    from recipes import launch_pd, pd_server

    assert launch_pd.parse_args([]).no_supervise is False
    assert launch_pd.parse_args(["--no-supervise"]).no_supervise is True
    args = pd_server.parse_args(["--pd-ratio", "2:1", "--no-supervise"])
    assert pd_server._launch_pd_argv(args) == ["--pd-ratio", "2:1", "--base-port", "30200", "--no-supervise"]
    assert "--no-supervise" not in pd_server._launch_pd_argv(pd_server.parse_args([]))
    with pytest.raises(SystemExit):
        pd_server.parse_args(["--demo", "--no-supervise"])
