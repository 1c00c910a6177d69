"""backends.adapter._inflight: requests in flight, as load per server and as legs per program."""

import pytest

from backends.adapter._inflight import InFlight
from backends.adapter._policies import Choice
from backends.adapter._route import Route
from backends.adapter._servers import ServerInfo

P, D, C = "http://p:1", "http://d:1", "http://c:1"


def _pd(rank=None):
    prefill = ServerInfo(P, "prefill", "m", "p", 9000, dp_ranks=1 if rank is None else 4,
                         serving_ranks=(0,) if rank is None else (0, 1, 2, 3))
    choices = {"prefill": Choice(P, "r"), "decode": Choice(D, "r")}
    return Route("pd", choices, prefill=prefill, decode=ServerInfo(D, "decode", "m", "d"), prefill_rank=rank)


def _colocated():
    return Route("colocated", {"colocated": Choice(C, "r")}, colocated=ServerInfo(C, "colocated", "m", "c"))


def test_holding_counts_the_routes_servers_until_the_block_ends():
    inflight = InFlight()
    with inflight.holding(_pd()):
        assert inflight.loads() == {P: 1, D: 1}
        with inflight.holding(_pd(rank=2)), inflight.holding(_colocated()):
            assert inflight.loads() == {P: 2, D: 2, f"{P}#dp2": 1, C: 1}
        assert inflight.loads() == {P: 1, D: 1}
    assert inflight.loads() == {}


def test_holding_releases_its_count_when_the_block_raises():
    inflight = InFlight()
    with pytest.raises(RuntimeError, match="leg failed"):
        with inflight.holding(_pd(rank=1)):
            raise RuntimeError("leg failed")
    assert inflight.loads() == {} and inflight.loads([P, D, f"{P}#dp1"]) == {P: 0, D: 0, f"{P}#dp1": 0}


def test_loads_of_named_servers_include_the_idle_ones():
    inflight = InFlight()
    with inflight.holding(_pd()):
        assert inflight.loads((P, C)) == {P: 1, C: 0}
        assert inflight.loads([]) == {}


def test_legs_are_filed_per_program_and_taken_once():
    inflight = InFlight()
    alpha, beta, loose = inflight.tracker("alpha"), inflight.tracker("beta"), inflight.tracker(None)
    alpha(P, ["a-p"], True)
    alpha(D, ["a-d"], True)
    beta(C, ["b-0", "b-1"], True)
    loose(C, ["x"], True)
    alpha(P, ["a-p"], False)  # the prefill leg answered
    assert inflight.take_legs("alpha") == [(D, "a-d")]
    assert inflight.take_legs("alpha") == []  # taken: a second end_program aborts nothing
    assert inflight.take_legs("beta") == [(C, "b-0"), (C, "b-1")]
    assert inflight.take_legs("gamma") == []


def test_a_program_whose_legs_all_answered_leaves_nothing_to_abort():
    inflight = InFlight()
    track = inflight.tracker("done")
    track(P, ["r1", "r2"], True)
    track(P, ["r1"], False)
    track(P, ["r2"], False)
    track(D, ["late"], False)  # a leg reported back that was never filed
    assert inflight.take_legs("done") == []
    track(P, ["again"], True)  # the program's tracker keeps working after its legs were taken
    assert inflight.take_legs("done") == [(P, "again")]


def test_legs_do_not_count_as_load_and_load_does_not_file_legs():
    inflight = InFlight()
    inflight.tracker("p")(P, ["r"], True)
    assert inflight.loads() == {}
    with inflight.holding(_pd()):
        assert inflight.take_legs("p") == [(P, "r")] and inflight.take_legs(None) == []
