"""Routing policies and the prefix index: pure logic, no servers."""

import pytest

from backends.adapter._prefix_index import PrefixIndex, block_keys
from backends.adapter._policies import Candidates, CacheAware, LeastLoaded, LoadGuard, RandomChoice, RoundRobin

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def test_block_keys_chain_over_the_whole_prefix():
    one = block_keys("x" * 64 + "y" * 32, 32)
    two = block_keys("x" * 64 + "z" * 32, 32)
    assert len(one) == 3 and one[:2] == two[:2] and one[2] != two[2]
    # Same block text at another depth is another key: keys stand for whole prefixes.
    assert block_keys("y" * 32, 32)[0] != one[2]


def test_prefix_index_matches_leading_blocks_only():
    index = PrefixIndex(block_chars=4)
    index.insert(A, index.keys("abcdefgh"))
    match = index.match_chars(index.keys("abcdefghijkl"), [A, B])
    assert match == {A: 8, B: 0}
    assert index.match_chars(index.keys("zzzzefgh"), [A])[A] == 0


def test_prefix_index_evicts_tails_before_heads():
    index = PrefixIndex(block_chars=1, capacity=4)
    index.insert(A, index.keys("abcd"))
    index.insert(A, index.keys("xy"))  # pushes out two blocks: they must be the deepest of "abcd"
    assert index.size(A) == 4
    assert index.match_chars(index.keys("abcd"), [A])[A] == 2
    index.forget(A)
    assert index.size(A) == 0


def test_round_robin_cycles():
    policy = RoundRobin()
    picks = [policy.choose(Candidates((A, B, C))).server for _ in range(6)]
    assert picks == [A, B, C, A, B, C]


def test_random_choice_is_seeded():
    first = [RandomChoice(seed=3).choose(Candidates((A, B, C))).server for _ in range(5)]
    again = [RandomChoice(seed=3).choose(Candidates((A, B, C))).server for _ in range(5)]
    assert first == again


def test_least_loaded_prefers_low_load_then_emptier_cache():
    policy = LeastLoaded()
    assert policy.choose(Candidates((A, B), loads={A: 3, B: 1})).server == B
    assert policy.choose(Candidates((A, B), loads={A: 0, B: 0}, held_blocks={A: 10, B: 2})).server == B


def test_cache_aware_follows_the_longest_match():
    policy = CacheAware()
    choice = policy.choose(Candidates((A, B), matched_chars={A: 0, B: 900}, prompt_chars=1000))
    assert choice.server == B and choice.reason.startswith("prefix_match")


def test_cache_aware_ignores_small_matches():
    policy = CacheAware(min_match_ratio=0.3)
    choice = policy.choose(Candidates((A, B), loads={B: 2}, matched_chars={B: 100}, prompt_chars=1000))
    assert choice.server == A and "no_prefix_match" in choice.reason


def test_cache_aware_balances_when_loads_diverge():
    policy = LoadGuard(CacheAware(), balance_abs=4, balance_rel=1.5)
    busy = Candidates((A, B), loads={A: 0, B: 10}, matched_chars={B: 900}, prompt_chars=1000)
    assert policy.choose(busy).server == A
    calm = Candidates((A, B), loads={A: 0, B: 3}, matched_chars={B: 900}, prompt_chars=1000)
    assert policy.choose(calm).server == B


def test_cache_aware_rejects_bad_ratio():
    with pytest.raises(ValueError, match="min_match_ratio"):
        CacheAware(min_match_ratio=2)


def test_router_claims_the_prefix_when_it_decides():
    """A request routed while another of its group is still in flight follows it (no success needed)."""
    from backends.adapter._health import HealthTracker
    from backends.adapter._router import Router
    from backends.adapter._policies import LeastLoaded
    from backends.adapter._servers import ServerInfo

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


def test_rooms_never_repeat_and_land_on_the_asked_rank():
    from backends.adapter._payloads import RoomAllocator, with_bootstrap

    rooms = RoomAllocator(seed=7)
    used = []
    for count, ranks, rank in [(1, 1, 0), (3, 4, 2), (1, 4, 0), (2, 2, 1), (1, 1, 0), (5, 8, 7)]:
        first = rooms.allocate(count, ranks=ranks, rank=rank)
        items = with_bootstrap({"text": ["x"] * count}, "h", 1, first, stride=ranks)["bootstrap_room"]
        assert all(room % ranks == rank for room in items)  # every item of a select on one DP rank
        used += items
    assert len(used) == len(set(used))
    with pytest.raises(ValueError, match="rank"):
        rooms.allocate(1, ranks=2, rank=2)


def _dp_router(ranks: int, serving: tuple[int, ...] | None = None):
    from backends.adapter._health import HealthTracker
    from backends.adapter._router import Router
    from backends.adapter._servers import ServerInfo

    serving = tuple(range(ranks)) if serving is None else serving
    pools = {"prefill": [ServerInfo(A, "prefill", "m", "a", 9000, dp_ranks=ranks, serving_ranks=serving)],
             "decode": [ServerInfo(B, "decode", "m", "b")], "colocated": []}
    return _router(pools)


def _router(pools):
    from backends.adapter._health import HealthTracker
    from backends.adapter._inflight import InFlight
    from backends.adapter._router import Router

    urls = [s.url for servers in pools.values() for s in servers]
    return Router(pools, HealthTracker(urls, probe=lambda url: True), PrefixIndex(), InFlight(),
                  {"prefill": CacheAware(), "decode": LeastLoaded(), "colocated": CacheAware(),
                   "prefill_rank": CacheAware()})


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


def test_new_prefixes_go_to_the_smaller_cache_unless_loads_diverge():
    from backends.adapter._policies import SmallestCache

    policy = LoadGuard(CacheAware(), balance_abs=4, balance_rel=1.5)
    # B is busier this instant but caches less: the new conversation (and its later turns) goes there.
    spread = Candidates((A, B), loads={A: 1, B: 2}, held_blocks={A: 40, B: 10}, prompt_chars=100)
    choice = policy.choose(spread)
    assert choice.server == B and "smallest_cache" in choice.reason
    diverged = Candidates((A, B), loads={A: 0, B: 9}, held_blocks={A: 40, B: 10}, prompt_chars=100)
    assert policy.choose(diverged).server == A and "imbalanced" in policy.choose(diverged).reason
    smallest = SmallestCache()
    ties = [smallest.choose(Candidates((A, B), held_blocks={A: 3, B: 3})).server for _ in range(2)]
    assert sorted(ties) == [A, B]
