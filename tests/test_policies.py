"""backends.adapter._policies: routing policies over a Candidates view; pure logic, no servers."""

import pytest

from backends.adapter._policies import (
    CacheAware,
    Candidates,
    Choice,
    LeastLoaded,
    LoadGuard,
    PrefillCost,
    RandomChoice,
    RoundRobin,
    SmallestCache,
)
from backends.errors import ConfigurationError

A, B, C = "http://a:1", "http://b:1", "http://c:1"


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
    assert policy.choose(Candidates((A, B), loads={A: 0, B: 0}, held_tokens={A: 10, B: 2})).server == B


def test_cache_aware_follows_the_longest_match():
    policy = CacheAware()
    choice = policy.choose(Candidates((A, B), matched_tokens={A: 0, B: 900}, prompt_tokens=1000))
    assert choice.server == B and choice.reason.startswith("prefix_match")


def test_cache_aware_ignores_small_matches():
    policy = CacheAware(min_match_ratio=0.3)
    choice = policy.choose(Candidates((A, B), loads={B: 2}, matched_tokens={B: 100}, prompt_tokens=1000))
    assert choice.server == A and "no_prefix_match" in choice.reason


def test_cache_aware_balances_when_loads_diverge():
    policy = LoadGuard(CacheAware(), balance_abs=4, balance_rel=1.5)
    busy = Candidates((A, B), loads={A: 0, B: 10}, matched_tokens={B: 900}, prompt_tokens=1000)
    assert policy.choose(busy).server == A
    calm = Candidates((A, B), loads={A: 0, B: 3}, matched_tokens={B: 900}, prompt_tokens=1000)
    assert policy.choose(calm).server == B


def test_cache_aware_rejects_bad_ratio():
    with pytest.raises(ValueError, match="min_match_ratio"):
        CacheAware(min_match_ratio=2)


def test_new_prefixes_go_to_the_smaller_cache_unless_loads_diverge():
    policy = LoadGuard(CacheAware(), balance_abs=4, balance_rel=1.5)
    # B is busier this instant but caches less: the new conversation (and its later turns) goes there.
    spread = Candidates((A, B), loads={A: 1, B: 2}, held_tokens={A: 40, B: 10}, prompt_tokens=100)
    choice = policy.choose(spread)
    assert choice.server == B and "smallest_cache" in choice.reason
    diverged = Candidates((A, B), loads={A: 0, B: 9}, held_tokens={A: 40, B: 10}, prompt_tokens=100)
    assert policy.choose(diverged).server == A and "imbalanced" in policy.choose(diverged).reason
    smallest = SmallestCache()
    ties = [smallest.choose(Candidates((A, B), held_tokens={A: 3, B: 3})).server for _ in range(2)]
    assert sorted(ties) == [A, B]


def test_choices_carry_a_rule_without_numbers():
    assert Choice(A, "x(1)").rule == "x(1)"  # defaults to the reason
    assert LeastLoaded().choose(Candidates((A,), loads={A: 2})) == Choice(A, "least_loaded(load=2)", "least_loaded")
    matched = CacheAware().choose(Candidates((A, B), matched_tokens={A: 500}, prompt_tokens=1000))
    assert (matched.reason, matched.rule) == ("prefix_match(0.50)", "prefix_match")
    cold = CacheAware().choose(Candidates((A, B), held_tokens={A: 1}, prompt_tokens=1000))
    assert (cold.server, cold.reason, cold.rule) == (B, "no_prefix_match(0.00)->smallest_cache(tokens=0)",
                                                    "no_prefix_match->smallest_cache")
    guarded = LoadGuard(CacheAware(), balance_abs=1, balance_rel=1.0).choose(
        Candidates((A, B), loads={A: 5}, matched_tokens={A: 900}, prompt_tokens=1000))
    assert (guarded.server, guarded.reason, guarded.rule) == (
        B, "imbalanced(5>0)->least_loaded(load=0)", "imbalanced->least_loaded")


def test_cache_aware_hands_new_prefixes_to_the_policy_it_is_given():
    policy = CacheAware(new_prefix=RoundRobin())
    picks = [policy.choose(Candidates((A, B, C), prompt_tokens=100)).rule for _ in range(2)]
    assert picks == ["no_prefix_match->round_robin"] * 2
    assert CacheAware(min_match_ratio=0.0).choose(Candidates((A, B), matched_tokens={B: 1}, prompt_tokens=1000)).server == B


def test_load_guard_needs_load_beyond_both_margins_and_sane_settings():
    def guard():
        return LoadGuard(RoundRobin(), balance_abs=4, balance_rel=2.0, fallback=SmallestCache())

    # The guarded pick (A, round robin's first) stands unless it is both 4 above and twice the least load.
    assert guard().choose(Candidates((A, B), loads={A: 10, B: 6})).server == A  # 4 above: not more
    assert guard().choose(Candidates((A, B), loads={A: 11, B: 6})).server == A  # 5 above but not twice
    diverged = guard().choose(Candidates((A, B), loads={A: 20, B: 6}, held_tokens={A: 5, B: 0}))
    assert (diverged.server, diverged.reason) == (B, "imbalanced(20>6)->smallest_cache(tokens=0)")
    for bad in ({"balance_abs": -1}, {"balance_rel": 0.5}):
        with pytest.raises(ConfigurationError, match="LoadGuard needs"):
            LoadGuard(RoundRobin(), **bad)


def test_prefill_cost_keeps_the_prefix_owner_until_recomputing_elsewhere_is_cheaper():
    policy = PrefillCost(request_tokens=10, recompute_weight=1)
    owner = dict(matched_tokens={A: 900}, prompt_tokens=1000)
    calm = policy.choose(Candidates((A, B), pending={A: 3, B: 0}, queued_tokens={A: 200}, **owner))
    assert (calm.server, calm.rule) == (A, "prefix_match")  # 100 + 200 + 30 < 1000
    busy = policy.choose(Candidates((A, B), pending={A: 3, B: 0}, loads={A: 0}, queued_tokens={A: 950}, **owner))
    assert (busy.server, busy.rule) == (B, "least_work")  # 100 + 950 + 30 > 1000
    assert policy.work(Candidates((A, B), pending={A: 3}, loads={A: 40}, queued_tokens={A: 950}, **owner), A) == 1080
    # Weighing the recompute (the default 2): B's 900 tokens already cached on A count twice.
    weighted = PrefillCost(request_tokens=10)
    assert weighted.work(Candidates((A, B), **owner), B) == 1900
    assert weighted.choose(Candidates((A, B), pending={A: 3}, queued_tokens={A: 950}, **owner)).server == A
    assert "events" in PrefillCost().choose(Candidates((A,), prompt_tokens=5, index="events")).reason


def test_prefill_cost_spreads_new_prefixes_and_an_idle_restarted_server_takes_work():
    policy = PrefillCost()
    picks = {policy.choose(Candidates((A, B), prompt_tokens=100)).server for _ in range(2)}
    assert picks == {A, B}  # nobody holds it: exact ties go round robin
    assert policy.choose(Candidates((A, B), prompt_tokens=100)).rule == "new_prefix"
    # B restarted empty; A holds every prefix but has a queue longer than one recompute.
    choice = policy.choose(Candidates((A, B), matched_tokens={A: 512}, prompt_tokens=600, pending={A: 8},
                                      queued_tokens={A: 1200}, held_tokens={A: 10_000, B: 0}))
    assert choice.server == B
    with pytest.raises(ConfigurationError):
        PrefillCost(request_tokens=-1)
    with pytest.raises(ConfigurationError):
        PrefillCost(recompute_weight=0.5)


def test_a_short_shared_header_does_not_keep_new_conversations_off_the_servers_lacking_it():
    header = dict(matched_tokens={A: 16}, prompt_tokens=128, held_tokens={A: 5000, B: 0})
    new = PrefillCost().choose(Candidates((A, B), **header))  # 16/128 < 0.3: a new prefix
    assert (new.server, new.rule) == (B, "new_prefix")  # equal work; B's cache is the smaller
    assert PrefillCost().work(Candidates((A, B), **header), A) == 128
    assert PrefillCost(min_match_ratio=0.1).work(Candidates((A, B), **header), B) == 144
