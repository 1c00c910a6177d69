"""backends.adapter._engine through PDClient: one path for plain and streamed requests (checks, retries, aborts)."""

import pytest

from backends.adapter._retry import RetryPolicy
from backends.errors import BadRequestError, PoisonRequestError
from backends.testing import FakeServer
from tests._support import C1, D1, P1, make_client


def _generate_calls(transport, *servers):
    return [path for server in servers for path in transport.paths(server) if path == "/generate"]


def test_a_colocated_stream_closed_early_aborts_its_rid_on_the_colocated_server():
    c1 = FakeServer("colocated", reply="abcdef")
    client, transport = make_client({C1: c1})
    stream = client.request_stream({"text": "hi", "sampling_params": {"max_new_tokens": 6}})
    assert [next(stream)["text"], next(stream)["text"]] == ["a", "ab"]
    assert client.loads() == {C1: 1}
    stream.close()
    rid = c1.generated[0]["rid"]
    assert c1.aborted == [rid]
    assert transport.calls[-1] == ("POST", f"{C1}/abort_request", {"rid": rid})
    assert client.loads() == {}
    record = client.metrics.records()[-1]
    assert (record.kind, record.mode, record.colocated, record.error) == ("native_stream", "colocated", C1, None)
    client.close()


def test_a_colocated_stream_read_to_its_end_aborts_nothing():
    c1 = FakeServer("colocated", reply="abc")
    client, _ = make_client({C1: c1})
    assert [e["text"] for e in client.request_stream({"text": "hi"})] == ["a", "ab", "abc"]
    assert c1.aborted == [] and client.loads() == {}
    client.close()


def test_a_pd_stream_closed_early_aborts_its_decode_leg():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abcdef")
    client, _ = make_client({P1: p1, D1: d1})
    stream = client.request_stream({"text": "hi"})
    next(stream)
    stream.close()
    rid = d1.generated[0]["rid"]
    assert rid.endswith("-d") and d1.aborted == [rid] and client.loads() == {}
    client.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refused_body_is_recorded_with_no_attempt_and_reaches_no_server(streamed):
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    client, transport = make_client({P1: p1, D1: d1})
    body = {"text": "hi", "sampling_params": {"max_new_tokens": -1}}
    with pytest.raises(BadRequestError, match="max_new_tokens"):
        list(client.request_stream(body)) if streamed else client.request(body)
    record = client.metrics.records()[-1]
    assert record.attempts == 0 and record.error.startswith("BadRequestError")
    assert _generate_calls(transport, P1, D1) == [] and client.loads() == {}
    client.close()


def test_validation_runs_once_before_the_first_attempt_not_per_attempt():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    client, transport = make_client({P1: p1, D1: d1})
    failed_once = []

    def decode_fails_once(method, path, body):
        if path == "/generate" and not failed_once:
            failed_once.append(body["rid"])
            return 503, {"error": {"message": "busy"}}
        return d1(method, path, body)

    transport.servers[D1] = decode_fails_once
    checked = []
    original = client._check

    def counting_check(body):
        checked.append(len(_generate_calls(transport, P1, D1)))  # /generate calls made before this check
        original(body)

    client._check = counting_check
    before = []
    for i in range(2):
        before.append(len(_generate_calls(transport, P1, D1)))
        client.request({"text": f"prompt {i}", "sampling_params": {"max_new_tokens": 2}})
    assert [r.attempts for r in client.metrics.records()] == [2, 1]  # the first request was retried
    assert checked == before  # one check per request, before its first leg was sent
    client.close()


def test_a_refused_body_raises_bad_request_also_with_a_prometheus_registry():
    from prometheus_client import CollectorRegistry

    client, _ = make_client({C1: FakeServer("colocated")}, metrics_registry=CollectorRegistry())
    try:
        with pytest.raises(BadRequestError, match="max_new_tokens"):
            client.request({"text": "hi", "sampling_params": {"max_new_tokens": -1}})
    finally:
        client.close()


def _first_stream_empty(transport, server):
    """Make ``server``'s first streamed /generate end before any event."""
    empty = []

    def handler(method, path, body):
        if path == "/generate" and body.get("stream") and not empty:
            empty.append(body["rid"])
            return 200, []
        return server(method, path, body)

    transport.servers[D1] = handler


def test_a_stream_that_ends_before_any_event_is_retried():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="ok")
    client, transport = make_client({P1: p1, D1: d1})
    _first_stream_empty(transport, d1)
    assert [e["text"] for e in client.request_stream({"text": "hi"})] == ["o", "ok"]
    assert client.metrics.records()[-1].attempts == 2
    client.close()


def test_a_stream_that_ends_before_any_event_is_blamed_on_its_server():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="ok")
    client, transport = make_client({P1: p1, D1: d1})
    _first_stream_empty(transport, d1)
    try:
        list(client.request_stream({"text": "hi"}))
        assert client.metrics.records()[-1].failed_servers == [D1]
    finally:
        client.close()


def test_the_same_5xx_answer_twice_is_the_requests_own_error_and_costs_no_server_its_standing():
    c1, c2 = FakeServer("colocated"), FakeServer("colocated")
    client, transport = make_client({C1: c1, "http://c2:1": c2})
    grammar = {"error": {"message": "Scheduler aborted the request: an input it cannot run"}}
    for url in (C1, "http://c2:1"):
        transport.servers[url] = lambda method, path, body, s=transport.servers[url]: (
            (500, grammar) if path == "/generate" else s(method, path, body))
    with pytest.raises(BadRequestError, match="cannot run.*same to an earlier attempt"):
        client.request({"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert len(_generate_calls(transport, C1, "http://c2:1")) == 2  # one retry, not every attempt
    assert all(state["healthy"] for state in client.health().values())
    # A 5xx that differs on the retry is the servers' own: retried and counted as before.
    answers = iter([(503, {"error": {"message": "busy"}}), (500, {"error": {"message": "other"}})])
    for url in (C1, "http://c2:1"):
        transport.servers[url] = lambda method, path, body, s=c1: (
            next(answers, None) or s(method, path, body)) if path == "/generate" else s(method, path, body)
    assert client.request({"text": "hi", "sampling_params": {"max_new_tokens": 2}})["text"]
    assert len(client.metrics.records()[-1].failed_servers) == 2
    client.close()


def _dies_on(marker: str, server: FakeServer):
    """A server that crashes on requests whose prompt holds ``marker``: the connection breaks, then refuses."""
    dead = []

    def handler(method, path, body):
        if dead:
            raise ConnectionRefusedError("nothing listening")
        if path == "/generate" and marker in str(body.get("text", "")):
            dead.append(True)
            raise ConnectionResetError("peer closed the connection")
        return server(method, path, body)

    return handler, dead


def test_an_unknown_poison_input_costs_at_most_two_servers_and_says_so():
    servers = {f"http://c{i}:1": FakeServer("colocated") for i in range(4)}
    client, transport = make_client(servers, retry=RetryPolicy(max_attempts=4, backoff=0.0, max_backoff=0.0))
    deaths = {}
    for url, server in servers.items():
        transport.servers[url], deaths[url] = _dies_on("POISON", server)
    with pytest.raises(PoisonRequestError, match="servers died during two attempts.*text of 10 characters") as caught:
        client.request({"text": "POISON now", "sampling_params": {"max_new_tokens": 2}})
    assert len(caught.value.servers) == 2 and sum(bool(d) for d in deaths.values()) == 2  # the other two live
    assert isinstance(caught.value, BadRequestError)
    # An innocent request whose server died (SIGKILL) under it is still retried and served.
    client2, transport2 = make_client({"http://a:1": FakeServer("colocated"), "http://b:1": FakeServer("colocated")})
    transport2.servers["http://a:1"], a_died = _dies_on("hello", FakeServer("colocated"))
    answers = [client2.request({"text": f"hello {i}", "sampling_params": {"max_new_tokens": 2}}) for i in range(6)]
    assert a_died and all(answer["text"] for answer in answers)
    assert any(record.failed_servers == ["http://a:1"] for record in client2.metrics.records())
    client.close()
    client2.close()
