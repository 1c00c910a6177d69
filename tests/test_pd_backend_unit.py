"""PDBackend's protocol, retry and failure logic over in-memory servers.

The same behaviours are checked against real SGLang servers in tests/e2e.
"""

import threading
import time
import types

import pytest
from sglang.lang.chat_template import get_chat_template
from sglang.lang.ir import SglSamplingParams

from backends.errors import (
    BadRequestError,
    ConfigurationError,
    DecodeFailedError,
    NoHealthyServerError,
    StreamInterruptedError,
)
from backends.testing import InMemoryTransport
from backends import PDBackend
from backends.adapter._retry import RetryPolicy
from backends.testing import FakeServer

P1, P2, D1, C1 = "http://p1:1", "http://p2:1", "http://d1:1", "http://c1:1"


def make(servers, **kwargs):
    transport = InMemoryTransport(servers)
    roles = {"prefill": [], "decode": [], "colocated": []}
    for url, server in servers.items():
        roles[server.role].append(url)
    kwargs.setdefault("retry", RetryPolicy(max_attempts=3, backoff=0.0, max_backoff=0.0))
    kwargs.setdefault("probe_interval", 0.05)
    backend = PDBackend(**roles, transport=transport, chat_template=get_chat_template("chatml"), **kwargs)
    return backend, transport


def state(text="hello " * 40):
    return types.SimpleNamespace(text_=text, sid="sid-1")


def params(**kw):
    return SglSamplingParams(max_new_tokens=kw.pop("max_new_tokens", 4), temperature=0, **kw)


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


def test_wrong_role_is_refused_with_a_clear_message():
    transport = InMemoryTransport({P1: FakeServer("decode"), D1: FakeServer("decode")})
    with pytest.raises(ConfigurationError, match="http://p1:1 is a 'decode' server .* listed as prefill"):
        PDBackend(prefill=[P1], decode=[D1], transport=transport, chat_template="chatml")


def test_nothing_listening_is_a_configuration_error():
    transport = InMemoryTransport({D1: FakeServer("decode")})
    with pytest.raises(ConfigurationError, match="cannot reach the prefill server http://p1:1"):
        PDBackend(prefill=[P1], decode=[D1], transport=transport, chat_template="chatml")


def test_half_a_pd_pool_is_refused():
    with pytest.raises(ConfigurationError, match="no decode server"):
        PDBackend(prefill=[P1], transport=InMemoryTransport({}))


def test_mixed_models_are_refused():
    with pytest.raises(ConfigurationError, match="one model"):
        make({P1: FakeServer("prefill", model="a"), D1: FakeServer("decode", model="b")})


def test_dead_prefill_costs_one_retry_on_the_other():
    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, P2: p2, D1: d1})
    p1.dead = p2.dead = False
    p1.dead = True
    results = [backend.generate(state(f"prompt {i} " * 30), params())[0] for i in range(6)]
    assert results == [" reply"] * 6
    assert backend.client.health()[P1]["healthy"] is False
    records = backend.metrics.records()
    assert sum(r.attempts - 1 for r in records) == 1  # only the first request paid a retry
    assert all(r.prefill == P2 for r in records)


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


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


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
    assert _wait_until(lambda: p1.released_by_abort == [rid], 3.0), "the held prefill leg was never aborted"
    assert p1.aborted.count(rid) >= 2  # the first abort came too early; a later one freed it
    assert _wait_until(lambda: backend.client._dispatcher._follow_up.pending() == 0, 3.0)
    backend.shutdown()


def test_abort_follow_up_stops_when_the_leg_answers_or_its_deadline_passes():
    from backends.adapter._aborts import AbortFollowUp

    sent = []
    follow_up = AbortFollowUp(lambda server, rids: sent.append((server, *rids)), first_pause=0.02, max_pause=0.05)
    try:
        answered = threading.Event()
        follow_up.watch("http://p", ["r1"], answered, deadline=time.monotonic() + 10)
        assert _wait_until(lambda: len(sent) >= 3, 2.0)
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


def test_a_probe_that_raises_does_not_end_the_prober():
    from backends.adapter._health import HealthTracker

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
        assert _wait_until(lambda: tracker.available([P1]) == [P1], 3.0), "the prober died on the first probe"
    finally:
        tracker.close()


def test_a_bare_os_error_from_the_connection_pool_is_a_retryable_failure(monkeypatch):
    import errno

    import httpx

    from backends.errors import ServerUnavailableError
    from backends.adapter._transport import HttpxTransport, Timeouts

    transport = HttpxTransport()

    def bad_fd(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(httpx.Client, "request", bad_fd)
    with pytest.raises(ServerUnavailableError, match="broke") as caught:
        transport.request("GET", "http://p1:1/health", timeouts=Timeouts())
    assert caught.value.server == "http://p1:1" and not caught.value.unreachable
    transport.close()


def test_a_stream_never_iterated_sends_nothing_and_holds_no_load():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abc")
    backend, _ = make({P1: p1, D1: d1})
    stream = backend.generate_stream(state(), params())
    assert p1.generated == [] and d1.generated == [] and backend.client.loads() == {}
    del stream
    assert backend.client.loads() == {}
    assert "".join(d for d, _ in backend.generate_stream(state(), params())) == "abc"
    assert backend.client.loads() == {}


def test_dp_prefill_rooms_keep_a_conversation_on_one_rank():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    p1.dp_size, p1.enable_dp_attention = 4, True
    backend, _ = make({P1: p1, D1: d1})
    assert backend.client.pools["prefill"][0].dp_ranks == 4 and backend.client.pools["prefill"][0].serving_ranks == (0, 1, 2, 3)
    history = "System: you keep a ship's log.\n"
    for turn in range(4):
        history += f"User: entry {turn}, wind north, sea calm\nAssistant:"
        backend.generate(state(history), params())
        history += " noted.\n"
    rooms = [body["bootstrap_room"] for body in p1.generated]
    assert len({room % 4 for room in rooms}) == 1 and len(set(rooms)) == 4
    assert [b["bootstrap_room"] for b in d1.generated] == rooms

    plain_dp = FakeServer("prefill")
    plain_dp.dp_size = 2  # no DP attention: SGLang 0.5.23 serves PD prefill on rank 0 only
    pinned, _ = make({P2: plain_dp, D1: FakeServer("decode")})
    for i in range(3):
        pinned.generate(state(f"prompt {i} " * 10), params())
    assert [b["bootstrap_room"] % 2 for b in plain_dp.generated] == [0, 0, 0]

    round_robin = FakeServer("prefill")
    round_robin.dp_size, round_robin.load_balance_method = 4, "round_robin"  # rooms do not pick the rank
    plain, _ = make({P2: round_robin, D1: FakeServer("decode")})
    assert plain.client.pools["prefill"][0].dp_ranks == 1


def test_bad_request_is_not_retried():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    p1.generate_status = d1.generate_status = 400
    with pytest.raises(BadRequestError, match="fake 400"):
        backend.generate(state(), params())
    assert len(p1.generated) == 1 and backend.client.health()[P1]["healthy"]


def test_no_healthy_decode_raises_quickly_and_recovers():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    d1.dead = True
    started = time.monotonic()
    with pytest.raises((NoHealthyServerError, DecodeFailedError)):
        backend.generate(state(), params())
    assert time.monotonic() - started < 2
    d1.dead = False
    deadline = time.monotonic() + 3
    while not backend.client.health()[D1]["healthy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.generate(state(), params())[0] == " reply"


def test_circuit_breaker_opens_after_repeated_server_errors():
    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    backend, transport = make({P1: p1, P2: p2, D1: d1}, failure_threshold=2, probe_interval=60)
    p1.generate_status = 500
    for i in range(4):
        backend.generate(state(f"q{i} " * 50), params())
    assert backend.client.health()[P1]["healthy"] is False
    assert backend.client.health()[P1]["consecutive_failures"] == 2


def test_cache_aware_keeps_a_prefix_on_one_prefill_server():
    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, P2: p2, D1: d1})
    shared_a, shared_b = "alpha " * 100, "beta " * 100
    for i in range(5):
        backend.generate(state(shared_a + f"question {i}"), params())
    for i in range(5):
        backend.generate(state(shared_b + f"question {i}"), params())
    records = backend.metrics.records()
    a_servers = {r.prefill for r in records[:5]}
    b_servers = {r.prefill for r in records[5:]}
    assert len(a_servers) == 1 and len(b_servers) == 1 and a_servers != b_servers


def test_stream_yields_deltas_and_breaks_loudly():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abcdef")
    backend, transport = make({P1: p1, D1: d1})
    chunks = [delta for delta, _ in backend.generate_stream(state(), params())]
    assert "".join(chunks) == "abcdef" and len(chunks) == 6

    def broken(method, path, body):
        if path == "/generate" and body.get("stream"):
            return 200, [{"text": "ab", "meta_info": {}}, ConnectionResetError("peer died")]
        return d1(method, path, body)

    transport.servers[D1] = broken
    stream = backend.generate_stream(state(), params())
    assert next(stream)[0] == "ab"
    with pytest.raises(StreamInterruptedError, match="after 2 characters"):
        next(stream)


def test_request_stream_yields_the_servers_events_and_refuses_batches():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abc")
    backend, _ = make({P1: p1, D1: d1})
    events = list(backend.client.request_stream({"text": "hi", "sampling_params": {"max_new_tokens": 3}}))
    assert [e["text"] for e in events] == ["a", "ab", "abc"]
    assert d1.generated[-1]["stream"] is True and "stream" not in p1.generated[-1]
    for bad, message in [({"text": ["a", "b"]}, "one prompt"), ({"input_ids": [[1], [2]]}, "one prompt"),
                         ({"sampling_params": {}}, "'text' or 'input_ids'"), ("hi", "'text' or 'input_ids'")]:
        with pytest.raises(BadRequestError, match=message):
            backend.client.request_stream(bad)
    with pytest.raises(BadRequestError, match="request_stream"):
        backend.client.request({"text": "hi", "stream": True})


def test_in_band_stream_error_before_text_is_retried_elsewhere():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="xy")
    backend, transport = make({P1: p1, D1: d1})
    calls = []

    def flaky(method, path, body):
        if path == "/generate" and body.get("stream"):
            calls.append(1)
            if len(calls) == 1:
                return 200, [{"error": {"message": "scheduler hiccup"}}]
        return d1(method, path, body)

    transport.servers[D1] = flaky
    assert "".join(d for d, _ in backend.generate_stream(state(), params())) == "xy"
    assert backend.metrics.records()[-1].attempts == 2


def test_colocated_pool_alone_serves_plain_requests():
    c1 = FakeServer("colocated", reply=" plain")
    backend, _ = make({C1: c1})
    assert backend.generate(state(), params())[0] == " plain"
    assert "bootstrap_room" not in c1.generated[0]


def test_short_prompts_go_colocated_when_enabled():
    p1, d1, c1 = FakeServer("prefill"), FakeServer("decode"), FakeServer("colocated")
    backend, _ = make({P1: p1, D1: d1, C1: c1}, colocated_below_tokens=50)
    backend.generate(state("short"), params())
    backend.generate(state("long prompt " * 100), params())
    modes = [r.mode for r in backend.metrics.records()]
    assert modes == ["colocated", "pd"]


def test_parallel_sampling_is_refused_in_pd():
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    with pytest.raises(BadRequestError, match="fork"):
        backend.generate(state(), params(n=2))


def test_no_endpoint_attribute_and_no_concat_append():
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    assert not hasattr(backend, "endpoint")
    assert backend.support_concate_and_append is False


def test_metrics_summary_and_prometheus_export():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")}, metrics_registry=registry)
    backend.generate(state(), params())
    summary = backend.metrics.summary()
    assert summary["requests"] == 1 and summary["by_server"] == {P1: 1, D1: 1}
    assert b'sgl_pd_requests_total{mode="pd",outcome="ok"} 1.0' in generate_latest(registry)


def test_end_program_spares_running_programs_and_aborts_orphans():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    running = types.SimpleNamespace(sid="live", is_finished=False, use_thread=True)
    finished = types.SimpleNamespace(sid="dead", is_finished=True, use_thread=True)
    backend.client._inflight.tracker("live")(D1, ["rid-live"], True)
    backend.client._inflight.tracker("dead")(D1, ["rid-dead"], True)
    backend.end_program([running, finished])
    assert d1.aborted == ["rid-dead"]
