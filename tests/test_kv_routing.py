"""backends.adapter._kv_routing and the router on it: placement in tokens from published events and load.

The servers' event and load streams are real local ZMQ sockets publishing SGLang's wire format
(``FakeServer`` of tests/test_kv_events.py); the HTTP side is the in-memory transport.
"""

from __future__ import annotations

import pytest

from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._kv_routing import EventIndex
from backends.adapter._policies import LeastLoaded, PrefillCost
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._router import Router
from backends.adapter._servers import ServerInfo
from backends.testing import FakeServer as FakeHTTPServer
from tests._support import C1, D1, make_client
from tests._support import P1 as HTTP_P1
from tests.test_kv_events import FakeServer, stored, wait_for

P1, P2 = "http://127.0.0.1:1", "http://127.0.0.1:2"  # events are dialled at the URL's host


@pytest.fixture
def publishers():
    made = [FakeServer(), FakeServer()]
    yield made
    for server in made:
        server.close()


def _router(publishers) -> tuple[Router, EventIndex]:
    pools = {"prefill": [ServerInfo(url, "prefill", "m", "127.0.0.1", 1, server_args=pub.server_info())
                         for url, pub in zip((P1, P2), publishers)],
             "decode": [ServerInfo(D1, "decode", "m", "d1")], "colocated": []}
    events = EventIndex(pools["prefill"], chunk=4)
    health = HealthTracker([P1, P2, D1], lambda url: True)
    policies = {"prefill": PrefillCost(), "decode": LeastLoaded(), "colocated": PrefillCost(),
                "prefill_rank": PrefillCost()}
    return Router(pools, health, PrefixIndex(), InFlight(), policies, events=events), events


def test_ids_route_to_the_server_whose_events_hold_their_prefix(publishers):
    router, events = _router(publishers)
    try:
        for pub in publishers:
            pub.wait_subscribed()
        prompt = list(range(100, 164))
        publishers[1].publish([stored([1], None, prompt[:48])])
        wait_for(lambda: events.held_tokens(P2) == 48)
        route = router.route("", prompt)
        assert route.prefill.url == P2 and route.index == "events" and route.rule == "prefix_match"
        assert route.uncached_tokens == 16 and "hit=48/64" in route.reason
        # A new prompt no event covers: the emptier server, and claimed there until events confirm it.
        fresh = router.route("", list(range(500, 540)))
        assert fresh.prefill.url == P1 and fresh.rule == "new_prefix"
        assert events.matched(events.keys(list(range(500, 540))), [P1, P2]) == {P1: 40, P2: 0}
        # Every cache publishes events: the approximate record is neither consulted nor kept.
        assert route.keys == [] and router.index.size(P1) == router.index.size(P2) == 0
    finally:
        events.close()


def test_published_load_moves_a_prompt_off_a_busy_cache_owner(publishers):
    router, events = _router(publishers)
    try:
        for pub in publishers:
            pub.wait_subscribed()
        prompt = list(range(1000, 1064))
        publishers[0].publish([stored([1], None, prompt[:60])])
        wait_for(lambda: events.held_tokens(P1) == 60)
        assert router.route("", prompt).prefill.url == P1
        publishers[0].publish_load(running=30)  # other clients' requests: 30 x 64 tokens of work > recomputing 64
        wait_for(lambda: (load := events.load(P1)) is not None and load.requests == 30)
        route = router.route("", prompt)
        assert route.prefill.url == P2 and route.rule == "least_work", route.reason
    finally:
        events.close()


def test_servers_without_events_route_on_the_approximate_record_and_say_so():
    client, _ = make_client({HTTP_P1: FakeHTTPServer("prefill"), D1: FakeHTTPServer("decode"),
                             C1: FakeHTTPServer("colocated")})
    try:
        delivered = client.send("native", {"text": "an approximate prompt " * 20, "sampling_params": {}})
        assert delivered.route.index == "approximate" and "approximate" in delivered.route.reason
        assert {s["index"] for s in client.cache_status().values()} == {"approximate"}
    finally:
        client.close()


def test_a_request_waits_for_the_prefill_of_the_prefix_it_reuses(publishers):
    """Followers sent while their prefix is still prefilling would compute it again in the same batch."""
    import threading

    router, events = _router(publishers)
    try:
        shared = list(range(2000, 2048))
        leader = router.route("", shared + [1] * 8)
        follower = router.route("", shared + [2] * 8)
        assert follower.prefill.url == leader.prefill.url and follower.leaders == leader.claims
        waited = []
        with router.holding(leader) as prefilled:
            waiter = threading.Thread(target=lambda: waited.append(router.await_prefix(follower, timeout=30)))
            waiter.start()
            waiter.join(0.3)
            assert waiter.is_alive()  # still waiting: the leader is not prefilled
            prefilled()
            waiter.join(5)
        assert not waiter.is_alive() and 0.3 <= waited[0] < 5
        # The prefix is reusable now: the next request goes at once.
        assert router.route("", shared + [3] * 8).leaders == []
        # A leader whose attempt fails releases its followers at once and leaves no claim behind.
        lone = router.route("", list(range(3000, 3048)))
        follower = router.route("", list(range(3000, 3040)) + [5] * 8)
        assert follower.leaders == lone.claims
        with router.holding(lone):
            pass
        assert router.await_prefix(follower, timeout=30) < 1
    finally:
        events.close()
