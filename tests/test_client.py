"""backends.adapter._client: PDClient (native requests and streams, pools, retries, rotation, flush_cache, metrics).

The same behaviours are checked against real SGLang servers in tests/e2e.
"""

import time

import pytest

from backends import PDBackend, PDClient
from backends.errors import (
    BadRequestError,
    ConfigurationError,
    DecodeFailedError,
    NoHealthyServerError,
    ServerUnavailableError,
)
from backends.testing import FakeServer, InMemoryTransport
from tests._support import C1, D1, P1, P2, make, make_client, params, state

# ----- pools and discovery ------------------------------------------------------------


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


def test_a_refused_pool_closes_the_transport_it_was_given():
    closed = []
    transport = InMemoryTransport({P1: FakeServer("decode"), D1: FakeServer("decode")})
    transport.close = lambda: closed.append(True)
    with pytest.raises(ConfigurationError):
        PDClient(prefill=[P1], decode=[D1], transport=transport)
    assert closed == [True]


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


# ----- native requests and their validation -------------------------------------------


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


def test_request_answers_decode_json_for_one_prompt_and_a_list_for_a_batch():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply=" ok")
    client, _ = make_client({P1: p1, D1: d1})
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    answer = client.request(body)
    assert answer["text"] == " ok" and answer["output_ids"] == [1, 2]
    assert body == {"text": "hi", "sampling_params": {"max_new_tokens": 2}}  # the caller's body is not changed
    batch = client.request({"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert [item["text"] for item in batch] == [" ok", " ok"]
    assert [r.kind for r in client.metrics.records()] == ["native", "native"]
    client.close()


def test_parallel_sampling_is_refused_in_pd():
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    with pytest.raises(BadRequestError, match="fork"):
        backend.generate(state(), params(n=2))


def test_parallel_sampling_is_served_by_a_colocated_pool():
    c1 = FakeServer("colocated")
    client, _ = make_client({C1: c1})
    client.request({"text": "hi", "sampling_params": {"n": 2}})
    assert c1.generated[0]["sampling_params"]["n"] == 2
    client.close()


# ----- retries ------------------------------------------------------------------------


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


def test_bad_request_is_not_retried():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    p1.generate_status = d1.generate_status = 400
    with pytest.raises(BadRequestError, match="fake 400"):
        backend.generate(state(), params())
    assert len(p1.generated) == 1 and backend.client.health()[P1]["healthy"]


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


# ----- rotation -----------------------------------------------------------------------


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


# ----- flush_cache and metrics --------------------------------------------------------


def test_flush_cache_asks_every_server_and_forgets_what_they_cached():
    p1, p2, d1, c1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode"), FakeServer("colocated")
    client, transport = make_client({P1: p1, P2: p2, D1: d1, C1: c1})
    client.request({"text": "a long shared prompt " * 20, "sampling_params": {}})
    assert any(client._router.index.size(url) for url in (P1, P2))
    client.flush_cache(wait=5)
    flushes = [url for method, url, _ in transport.calls if "/flush_cache" in url]
    assert flushes == [f"{url}/flush_cache?timeout=5" for url in (P1, P2, D1, C1)]
    assert all(method == "POST" for method, url, _ in transport.calls if "/flush_cache" in url)
    assert all(client._router.index.size(url) == 0 for url in (P1, P2, C1))
    client.close()


def test_flush_cache_names_every_server_that_refused():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    client, transport = make_client({P1: p1, D1: d1})

    def busy(method, path, body):
        if path == "/flush_cache":
            return 400, "Cache not flushed: requests are running"
        return d1(method, path, body)

    transport.servers[D1] = busy
    p1.dead = True
    with pytest.raises(ServerUnavailableError) as caught:
        client.flush_cache(wait=0)
    message = str(caught.value)
    assert f"{D1}: HTTP 400 Cache not flushed" in message and f"{P1}: " in message
    client.close()


def test_metrics_summary_and_prometheus_export():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")}, metrics_registry=registry)
    backend.generate(state(), params())
    summary = backend.metrics.summary()
    assert summary["requests"] == 1 and summary["by_server"] == {P1: 1, D1: 1}
    assert b'sgl_pd_requests_total{mode="pd",outcome="ok"} 1.0' in generate_latest(registry)


def test_a_failed_request_is_recorded_with_its_error_and_the_servers_that_failed():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    client, _ = make_client({P1: p1, D1: d1})
    p1.generate_status = 500
    with pytest.raises(ServerUnavailableError):
        client.request({"text": "hi", "sampling_params": {}})
    record = client.metrics.records()[-1]
    assert record.attempts == 3 and record.error is not None and record.failed_servers == [P1, P1, P1]
    assert client.metrics.summary()["errors"] == 1 and client.loads() == {}
    client.close()


def test_a_prefill_server_returns_to_rotation_only_after_a_canary_pair_through_it_succeeds():
    # SGLang's /health skips the KV transfer: a prefill server whose transfer thread died answers it
    # while every pair through it fails.
    from tests._support import wait_until

    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    client, transport = make_client({P1: p1, P2: p2, D1: d1})
    state = {"generate": "refused"}

    def broken(method, path, body):
        if path == "/generate" and state["generate"] == "refused":
            raise ConnectionError("refused")
        if path == "/generate" and state["generate"] == "hangs":
            return 500, {"error": {"message": "KV transfer failed"}}
        return p1(method, path, body)

    transport.servers[P1] = broken
    for i in range(6):  # some land on P1: refused, so out of rotation at once
        client.request({"text": f"q{i}", "sampling_params": {"max_new_tokens": 1}})
    assert not client.health()[P1]["healthy"]
    state["generate"] = "hangs"  # /health answers again, PD through it still fails
    time.sleep(0.5)
    assert not client.health()[P1]["healthy"]
    canaries = [c for c in transport.calls if c[1] == f"{P1}/generate" and c[2].get("text") == "Health check."]
    assert canaries  # the prober tried a real pair, not only /health
    state["generate"] = "works"
    assert wait_until(lambda: client.health()[P1]["healthy"], 5)
    client.close()
