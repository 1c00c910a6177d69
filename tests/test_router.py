"""backends.adapter._router: routes over the pools (prefix claims, DP ranks, in-flight counts)."""

from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._policies import CacheAware, LeastLoaded
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._router import Router
from backends.adapter._servers import ServerInfo

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def _router(pools):
    urls = [s.url for servers in pools.values() for s in servers]
    return Router(pools, HealthTracker(urls, probe=lambda url: True), PrefixIndex(), InFlight(),
                  {"prefill": CacheAware(), "decode": LeastLoaded(), "colocated": CacheAware(),
                   "prefill_rank": CacheAware()})


def _dp_router(ranks: int, serving: tuple[int, ...] | None = None):
    serving = tuple(range(ranks)) if serving is None else serving
    pools = {"prefill": [ServerInfo(A, "prefill", "m", "a", 9000, dp_ranks=ranks, serving_ranks=serving)],
             "decode": [ServerInfo(B, "decode", "m", "b")], "colocated": []}
    return _router(pools)


def test_router_claims_the_prefix_when_it_decides():
    """A request routed while another of its group is still in flight follows it (no success needed)."""
    pools = {
        "prefill": [ServerInfo(A, "prefill", "m", "a", 1), ServerInfo(B, "prefill", "m", "b", 1)],
        "decode": [ServerInfo(C, "decode", "m", "c")],
        "colocated": [],
    }
    router = _router(pools)
    shared = "a long shared instruction block " * 20
    first = router.route(shared + "question one")
    with router.inflight.holding(first):
        second = router.route(shared + "question two")
        other = router.route("an unrelated prompt about something else entirely " * 10)
    assert second.prefill.url == first.prefill.url and second.reason.startswith("prefill:prefix_match")
    assert other.prefill.url != first.prefill.url


def test_a_conversation_stays_on_its_dp_rank_and_new_ones_spread():
    router = _dp_router(ranks=4)
    history, ranks_of_turns = "System: be brief.\n", []
    for turn in range(5):
        history += f"User: question {turn} about the tides and the moon\nAssistant: answer {turn}\n"
        route = router.route(history)
        ranks_of_turns.append(route.prefill_rank)
        assert route.target.room_stride == 4 and "@dp" in route.reason
    assert len(set(ranks_of_turns)) == 1  # every turn on the rank holding the history
    others = {router.route(f"A different conversation number {i} " * 6).prefill_rank for i in range(3)}
    assert ranks_of_turns[0] not in others and len(others) == 3  # new prefixes go to emptier ranks
    router.forget(A)
    assert all(router.index.size(f"{A}#dp{r}") == 0 for r in range(4))


def test_in_flight_counts_the_dp_rank_and_single_rank_servers_are_untouched():
    router = _dp_router(ranks=2)
    route = router.route("some prompt " * 10)
    with router.inflight.holding(route):
        assert router.inflight.loads() == {A: 1, B: 1, f"{A}#dp{route.prefill_rank}": 1}
    assert router.inflight.loads() == {}
    plain = _dp_router(ranks=1).route("some prompt " * 10)
    assert plain.prefill_rank is None and plain.target.room_stride == 1 and "@dp" not in plain.reason


def test_a_plain_dp_server_gets_rank_zero_rooms_only():
    router = _dp_router(ranks=2, serving=(0,))
    routes = [router.route(f"Conversation {i} " * 8) for i in range(4)]
    assert {r.prefill_rank for r in routes} == {0} and all("only_serving_rank" in r.reason for r in routes)
    assert all(r.target.room_stride == 2 for r in routes)
