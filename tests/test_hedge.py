"""Hedged requests (backends.adapter._hedge and the engine's race), on fake servers.

A frozen prefill server is played by a handler that blocks until released (a
SIGSTOPped process answers nothing, not even ``/health``); the decode leg of
a pair with it waits for KV that never comes, until aborted, as SGLang's does.
"""

from __future__ import annotations

import threading
import time

import pytest

from backends import ConfigurationError, HedgePolicy, Timeouts
from backends.adapter._hedge import Hedger
from backends.testing import FakeServer
from tests._support import D1, P1, P2, make_client


def test_the_delay_is_the_quantile_of_recent_prefill_latencies_within_bounds():
    hedger = Hedger(HedgePolicy(quantile=0.9, min_delay=0.1, max_delay=2.0, min_samples=10, window=100))
    assert hedger.delay() == 2.0  # too few samples: the longest wait
    for i in range(100):
        hedger.observe(i / 100)
    assert 0.85 <= hedger.delay() <= 0.95
    for _ in range(100):
        hedger.observe(0.001)
    assert hedger.delay() == 0.1


def test_the_budget_caps_hedges_at_a_share_of_requests_plus_a_burst():
    hedger = Hedger(HedgePolicy(budget=0.1, burst=2))
    assert [hedger.take() for _ in range(3)] == [True, True, False]
    for _ in range(10):
        hedger.observe(0.01)  # ten requests earn one hedge
    assert hedger.take() and not hedger.take() and hedger.stats()["sent"] == 3


@pytest.mark.parametrize("bad", [dict(quantile=1.0), dict(min_delay=0), dict(min_delay=3, max_delay=2),
                                 dict(budget=-1), dict(burst=0), dict(min_samples=1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigurationError):
        HedgePolicy(**bad)


def _frozen(release: threading.Event):
    def handler(method, path, body):
        release.wait(30)  # a stopped process: nothing answers until it is resumed
        raise ConnectionError("frozen")

    return handler


def _decode_waiting_for(frozen_port: int, decode: FakeServer):
    """SGLang's decode leg waits for the KV of its prefill; from a frozen one until aborted."""
    aborted: dict[str, threading.Event] = {}

    def handler(method, path, body):
        if path == "/abort_request":
            aborted.setdefault(body["rid"], threading.Event()).set()
        elif path == "/generate" and body.get("bootstrap_port") == frozen_port:
            aborted.setdefault(body["rid"], threading.Event()).wait(30)
            return 500, {"error": {"message": "Aborted by AbortReq."}}
        return decode(method, path, body)

    return handler


def test_a_frozen_prefill_costs_a_hedge_not_a_timeout():
    release = threading.Event()
    p1, p2, d1 = FakeServer("prefill", bootstrap_port=9001), FakeServer("prefill", bootstrap_port=9002), \
        FakeServer("decode")
    client, transport = make_client({P1: p1, P2: p2, D1: d1}, timeouts=Timeouts(total=20),
                                    hedge=HedgePolicy(min_delay=0.2, max_delay=0.2, min_samples=2, window=10))
    try:
        transport.servers[P1] = _frozen(release)
        transport.servers[D1] = _decode_waiting_for(9001, d1)
        started = time.monotonic()
        answers = [client.request({"text": f"question {i}", "sampling_params": {"max_new_tokens": 2}})
                   for i in range(8)]
        assert all(a["text"] == " reply" for a in answers) and time.monotonic() - started < 8
        records = client.metrics.records()
        hedged = [r for r in records if r.hedged]
        assert hedged and all(r.hedge_won and r.prefill == P2 for r in hedged)
        # The stuck request counts as the frozen server's queue, so routing leaves it; each late answer
        # also counts as its failure (three in a row take it out of rotation).
        assert len(hedged) <= 3 and records[-1].prefill == P2 and not records[-1].hedged
        assert client.health()[P1]["consecutive_failures"] == len(hedged)
        # Each loser's decode leg was aborted, not left waiting for KV.
        assert len([c for c in transport.calls if c[1] == f"{D1}/abort_request"]) >= len(hedged)
    finally:
        release.set()
        client.close()
