"""backends.adapter._aborts: aborts sent again until the aborted leg answers (an abort can overtake its leg)."""

import threading
import time

import pytest

from backends.adapter._aborts import AbortFollowUp
from backends.adapter._retry import RetryPolicy
from backends.errors import DecodeFailedError, NoHealthyServerError
from backends.testing import FakeServer
from tests._support import D1, P1, make, params, state, wait_until


def test_an_abort_that_overtakes_its_leg_is_sent_again():
    # Decode is dead, so the prefill leg is aborted at once; that leg reaches the
    # server only 0.3 s later, when SGLang would ignore the abort and hold the leg
    # for its partner until the 300 s bootstrap timeout (here 10 s).
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    p1.arrival_delay, p1.hold = 0.3, 10.0
    backend, _ = make({P1: p1, D1: d1}, retry=RetryPolicy(max_attempts=1))
    d1.dead = True
    started = time.monotonic()
    with pytest.raises((DecodeFailedError, NoHealthyServerError)):
        backend.generate(state(), params())
    assert time.monotonic() - started < 0.3  # the caller does not wait for the follow-up
    rid = p1.generated[0]["rid"]
    assert wait_until(lambda: p1.released_by_abort == [rid], 3.0), "the held prefill leg was never aborted"
    assert p1.aborted.count(rid) >= 2  # the first abort came too early; a later one freed it
    assert wait_until(lambda: backend.client._dispatcher._follow_up.pending() == 0, 3.0)
    backend.shutdown()


def test_abort_follow_up_stops_when_the_leg_answers_or_its_deadline_passes():
    sent = []
    follow_up = AbortFollowUp(lambda server, rids: sent.append((server, *rids)), first_pause=0.02, max_pause=0.05)
    try:
        answered = threading.Event()
        follow_up.watch("http://p", ["r1"], answered, deadline=time.monotonic() + 10)
        assert wait_until(lambda: len(sent) >= 3, 2.0)
        answered.set()
        time.sleep(0.15)
        count = len(sent)
        time.sleep(0.15)
        assert len(sent) == count and set(sent) == {("http://p", "r1")}  # nothing after the answer

        follow_up.watch("http://p", ["r2"], threading.Event(), deadline=time.monotonic() + 0.2)
        time.sleep(0.5)
        count = len(sent)
        time.sleep(0.2)
        assert len(sent) == count and ("http://p", "r2") in sent and follow_up.pending() == 0

        already = threading.Event()
        already.set()
        follow_up.watch("http://p", ["r3"], already, deadline=time.monotonic() + 10)
        assert follow_up.pending() == 0
    finally:
        follow_up.close()
    assert not follow_up._thread.is_alive()
