"""backends.adapter._health: which servers are in rotation (failure counting, circuit breaker, probes)."""

import pytest

from backends.adapter._health import HealthTracker
from tests._support import P1, P2, wait_until


def test_a_probe_that_raises_does_not_end_the_prober():
    outcomes = iter([RuntimeError("socket in a bad state"), False, True])

    def probe(url):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    tracker = HealthTracker([P1], probe, probe_interval=0.02)
    try:
        tracker.record_failure(P1, "refused", unreachable=True)
        assert tracker.available([P1]) == []
        assert wait_until(lambda: tracker.available([P1]) == [P1], 3.0), "the prober died on the first probe"
    finally:
        tracker.close()


def test_an_unreachable_server_leaves_at_once_and_server_errors_after_the_threshold():
    tracker = HealthTracker([P1, P2], probe=lambda url: False, failure_threshold=2, breaker_cooldown=60)
    try:
        tracker.record_failure(P1, "refused", unreachable=True)
        assert tracker.available([P1, P2]) == [P2]
        tracker.record_failure(P2, "HTTP 500")
        assert tracker.available([P2]) == [P2]  # one server error is not enough
        tracker.record_failure(P2, "HTTP 503")
        assert tracker.available([P1, P2]) == []
        state = tracker.snapshot()[P2]
        assert (state.healthy, state.consecutive_failures, state.last_error) == (False, 2, "HTTP 503")
    finally:
        tracker.close()


def test_a_success_resets_the_count_of_consecutive_errors():
    tracker = HealthTracker([P1], probe=lambda url: True, failure_threshold=2)
    try:
        tracker.record_failure(P1, "HTTP 500")
        tracker.record_success(P1)
        tracker.record_failure(P1, "HTTP 500")
        assert tracker.available([P1]) == [P1] and tracker.snapshot()[P1].consecutive_failures == 1
    finally:
        tracker.close()


def test_a_server_back_from_a_probe_is_reported_and_its_count_cleared():
    recovered = []
    tracker = HealthTracker([P1], probe=lambda url: True, probe_interval=0.02, on_recover=recovered.append)
    try:
        tracker.record_failure(P1, "refused", unreachable=True)
        assert wait_until(lambda: recovered == [P1], 3.0)
        state = tracker.snapshot()[P1]
        assert state.healthy and state.consecutive_failures == 0 and state.out_since is None
    finally:
        tracker.close()


def test_the_snapshot_is_a_copy():
    tracker = HealthTracker([P1], probe=lambda url: True)
    tracker.snapshot()[P1].healthy = False
    assert tracker.available([P1]) == [P1]
    tracker.close()


@pytest.mark.parametrize("options", [{"failure_threshold": 0}, {"probe_interval": 0}, {"breaker_cooldown": -1}])
def test_bad_settings_are_refused(options):
    with pytest.raises(ValueError, match="failure_threshold"):
        HealthTracker([P1], probe=lambda url: True, **options)


def test_a_forgiven_failure_no_longer_counts_and_returns_a_server_it_took_out():
    health = HealthTracker([P1], probe=lambda url: False, failure_threshold=2, breaker_cooldown=60)
    health.record_failure(P1, "HTTP 500: grammar")
    health.record_failure(P1, "HTTP 500: grammar")
    assert health.available([P1]) == []
    health.forgive(P1, "HTTP 500: grammar")  # the request's own error, seen again on the next attempt
    assert health.available([P1]) == [P1] and health.snapshot()[P1].consecutive_failures == 1
    health.record_failure(P1, "connection refused", unreachable=True)
    health.forgive(P1, "HTTP 500: grammar")  # not what took it out this time: it stays out
    assert health.available([P1]) == []
    health.close()
