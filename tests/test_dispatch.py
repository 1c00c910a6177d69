"""backends.adapter._dispatch: PD pairs (bootstrap fields, rooms, merged answers, a failed leg aborting the other)
and colocated calls (lazy, tracked by rid, abortable)."""

import threading
import time

import pytest

from backends.adapter._dispatch import Dispatcher
from backends.adapter._retry import RetryPolicy
from backends.adapter._transport import Timeouts
from backends.errors import DecodeFailedError
from backends.testing import FakeServer, InMemoryTransport
from tests._support import C1, D1, P1, P2, make, params, state


def test_pair_carries_bootstrap_fields_and_returns_decode_answer():
    prefill, decode = FakeServer("prefill", bootstrap_port=9123), FakeServer("decode", reply=" from decode")
    backend, _ = make({P1: prefill, D1: decode})
    text, meta = backend.generate(state(), params())
    assert text == " from decode"
    p, d = prefill.generated[0], decode.generated[0]
    assert p["bootstrap_room"] == d["bootstrap_room"]
    assert (p["bootstrap_host"], p["bootstrap_port"]) == ("p1", 9123) == (d["bootstrap_host"], d["bootstrap_port"])
    assert p["rid"] != d["rid"] and p["text"] == d["text"]
    backend.generate(state(), params())
    assert prefill.generated[1]["bootstrap_room"] != p["bootstrap_room"]


def test_prompt_logprobs_come_from_prefill():
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    _, meta = backend.generate(state(), params(return_logprob=True, logprob_start_len=0))
    assert meta["input_token_logprobs"] == [[-1.0, 1, "a"]]


def test_batched_body_gets_one_room_per_item():
    prefill, decode = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: prefill, D1: decode})
    answer = backend.client.send("select", {"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 0}}).answer
    rooms = prefill.generated[0]["bootstrap_room"]
    assert len(answer) == 3 and rooms == decode.generated[0]["bootstrap_room"]
    assert len(set(rooms)) == 3 and len(prefill.generated[0]["rid"]) == 3


def test_failed_leg_aborts_the_other():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1}, retry=RetryPolicy(max_attempts=1))
    d1.generate_status = 503
    with pytest.raises(DecodeFailedError, match="503"):
        backend.generate(state(), params())
    deadline = time.monotonic() + 2
    while not p1.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    # The prefill leg may have finished before the abort was needed; if not, it was aborted by id.
    assert p1.aborted == [] or p1.aborted == [p1.generated[0]["rid"]]


def test_prefill_failure_aborts_decode_leg():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    release = threading.Event()
    decode_call = d1.__call__

    def slow_decode(method, path, body):
        if path == "/generate":
            release.wait(2)
        return decode_call(method, path, body)

    backend, transport = make({P1: p1, D1: d1}, retry=RetryPolicy(max_attempts=1))
    transport.servers[D1] = slow_decode
    p1.generate_status = 500
    threading.Timer(0.5, release.set).start()
    with pytest.raises(Exception):
        backend.generate(state(), params())
    assert d1.aborted and d1.aborted[0].endswith("-d")


# ----- colocated calls ---------------------------------------------------------------


class _Legs:
    """A ``track`` callback that keeps the (server, rid) legs on the wire."""

    def __init__(self):
        self.open: set[tuple[str, str]] = set()
        self.events: list[tuple[str, tuple[str, ...], bool]] = []

    def __call__(self, server, rids, started):
        self.events.append((server, tuple(rids), started))
        for rid in rids:
            (self.open.add if started else self.open.discard)((server, rid))


@pytest.fixture
def colocated():
    server = FakeServer("colocated", reply="abcd")
    transport = InMemoryTransport({C1: server})
    dispatcher = Dispatcher(transport, Timeouts())
    yield server, transport, dispatcher
    dispatcher.close()


def test_a_colocated_stream_is_lazy_tracked_while_open_and_aborted_by_its_rid(colocated):
    server, transport, dispatcher = colocated
    legs = _Legs()
    exchange = dispatcher.single(C1, {"text": "hi", "sampling_params": {"max_new_tokens": 4}}, legs, stream=True)
    assert transport.calls == [] and legs.events == []  # nothing sent before the first next()

    first = next(exchange.events)
    assert first["text"] == "a"
    body = server.generated[0]
    rid = body["rid"]
    assert body["stream"] is True and isinstance(rid, str) and "bootstrap_room" not in body
    assert legs.open == {(C1, rid)}  # tracked while the stream is open

    exchange.abort()
    assert transport.calls[-1] == ("POST", f"{C1}/abort_request", {"rid": rid})
    assert server.aborted == [rid]

    exchange.events.close()
    assert legs.open == set() and legs.events[-1] == (C1, (rid,), False)


def test_a_colocated_stream_read_to_the_end_is_untracked_and_not_aborted(colocated):
    server, _, dispatcher = colocated
    legs = _Legs()
    exchange = dispatcher.single(C1, {"text": "hi", "sampling_params": {}}, legs, stream=True)
    assert [event["text"] for event in exchange.events] == ["a", "ab", "abc", "abcd"]
    assert legs.open == set() and len(legs.events) == 2 and server.aborted == []


def test_a_plain_colocated_call_is_lazy_and_tracked_only_while_on_the_wire(colocated):
    server, transport, dispatcher = colocated
    seen_during_call = []
    legs = _Legs()
    original = transport.servers[C1]

    def spying(method, path, body):
        if path == "/generate":
            seen_during_call.append(set(legs.open))
        return original(method, path, body)

    transport.servers[C1] = spying
    exchange = dispatcher.single(C1, {"text": "hi", "sampling_params": {}}, legs)
    assert transport.calls == []
    answer = next(exchange.events)
    rid = server.generated[0]["rid"]
    assert answer["text"] == "abcd" and "stream" not in server.generated[0]
    assert seen_during_call == [{(C1, rid)}] and legs.open == set()
    with pytest.raises(StopIteration):
        next(exchange.events)
    exchange.abort()  # after the answer: still aimed at the same rid
    assert server.aborted == [rid]


def test_each_colocated_call_gets_its_own_rid(colocated):
    server, _, dispatcher = colocated
    for _ in range(3):
        next(dispatcher.single(C1, {"text": "hi", "sampling_params": {}}).events)
    assert len({body["rid"] for body in server.generated}) == 3


def test_an_abort_of_a_dead_server_does_not_raise():
    dispatcher = Dispatcher(InMemoryTransport({}), Timeouts())
    try:
        dispatcher.abort(C1, ["r1", "r2"])
    finally:
        dispatcher.close()


def test_a_failed_kv_handoff_on_decode_blames_the_prefill_and_spares_decode():
    """SGLang's decode reports a frozen or dead prefill as its own 500; the fault is the prefill's."""
    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    backend, transport = make({P1: p1, P2: p2, D1: d1}, failure_threshold=1)
    decode_call = d1.__call__
    failed_once = []

    def handshake_fails_with_p1(method, path, body):
        if path == "/generate" and body.get("bootstrap_host") == "p1" and not failed_once:
            failed_once.append(body["rid"])
            return 500, {"error": {"message": "Decode handshake failed for request rank=0 with exception "
                                              "KVTransferError(bootstrap_room=1): Prefill bootstrap failed"}}
        return decode_call(method, path, body)

    transport.servers[D1] = handshake_fails_with_p1
    for i in range(4):
        backend.generate(state(f"prompt {i} " * 30), params())
    health = backend.client.health()
    assert failed_once and health[D1]["healthy"] and not health[P1]["healthy"]
    failed = [r for r in backend.metrics.records() if r.failed_servers]
    assert [r.failed_servers for r in failed] == [[P1]] and failed[0].attempts == 2
