"""backends.adapter._transport: HttpxTransport's mapping of HTTP answers, SSE and network failures to PDErrors."""

import errno
import json
import time

import httpx
import pytest

from backends.adapter._transport import HttpxTransport, Response, Timeouts, error_for, parse_sse_line
from backends.errors import BadRequestError, RequestTimeoutError, ServerUnavailableError


def test_a_bare_os_error_from_the_connection_pool_is_a_retryable_failure(monkeypatch):
    transport = HttpxTransport()

    def bad_fd(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(httpx.Client, "request", bad_fd)
    with pytest.raises(ServerUnavailableError, match="broke") as caught:
        transport.request("GET", "http://p1:1/health", timeouts=Timeouts())
    assert caught.value.server == "http://p1:1" and not caught.value.unreachable
    transport.close()


@pytest.fixture
def served():
    """An HttpxTransport whose httpx client answers with ``served.handler`` (an httpx.MockTransport)."""
    transport = HttpxTransport()
    transport.close()
    holder = {}
    transport._client = httpx.Client(transport=httpx.MockTransport(lambda request: holder["handler"](request)))

    def serve(handler):
        holder["handler"] = handler
        return transport

    yield serve
    transport.close()


def _sse(*lines: str) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def test_json_and_text_answers_are_parsed(served):
    transport = served(lambda request: httpx.Response(200, json={"ok": 1}) if request.url.path == "/a"
                       else httpx.Response(200, text="Cache flushed.\n"))
    answer = transport.request("POST", "http://s:1/a", json_body={"x": 1}, timeouts=Timeouts())
    assert (answer.status, answer.body, answer.url, answer.ok) == (200, {"ok": 1}, "http://s:1/a", True)
    assert transport.request("GET", "http://s:1/b", timeouts=Timeouts()).body == "Cache flushed.\n"


def test_a_refused_connection_is_unreachable(served):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ServerUnavailableError, match="cannot reach") as caught:
        served(refuse).request("GET", "http://s:1/health", timeouts=Timeouts())
    assert caught.value.unreachable


def test_a_read_timeout_is_a_request_timeout(served):
    def slow(request):
        raise httpx.ReadTimeout("silence", request=request)

    with pytest.raises(RequestTimeoutError, match="did not answer in time"):
        served(slow).request("POST", "http://s:1/generate", json_body={}, timeouts=Timeouts())


def test_a_passed_deadline_sends_nothing(served):
    sent = []
    transport = served(lambda request: sent.append(request) or httpx.Response(200, json={}))
    with pytest.raises(RequestTimeoutError, match="deadline passed"):
        transport.request("POST", "http://s:1/generate", json_body={}, timeouts=Timeouts(), deadline=time.monotonic() - 1)
    assert sent == []


def test_a_stream_yields_its_sse_events_and_skips_comments_and_done(served):
    body = _sse(": keep-alive", 'data: {"text": "a"}', "", 'data: {"text": "ab"}', "", "data: [DONE]", "")
    transport = served(lambda request: httpx.Response(200, content=body))
    events = list(transport.stream("http://s:1/generate", json_body={"stream": True}, timeouts=Timeouts()))
    assert events == [{"text": "a"}, {"text": "ab"}]


def test_a_stream_refused_by_status_raises_by_class(served):
    status = {"code": 400}
    transport = served(lambda request: httpx.Response(status["code"], json={"error": {"message": "too long"}}))
    with pytest.raises(BadRequestError, match="too long"):
        list(transport.stream("http://s:1/generate", json_body={}, timeouts=Timeouts()))
    status["code"] = 503
    with pytest.raises(ServerUnavailableError, match="503"):
        list(transport.stream("http://s:1/generate", json_body={}, timeouts=Timeouts()))


def test_an_in_band_stream_error_raises_after_the_events_before_it(served):
    body = _sse('data: {"text": "a"}', 'data: {"error": {"message": "scheduler died"}}')
    transport = served(lambda request: httpx.Response(200, content=body))
    stream = transport.stream("http://s:1/generate", json_body={}, timeouts=Timeouts())
    assert next(stream) == {"text": "a"}
    with pytest.raises(ServerUnavailableError, match="mid-stream: scheduler died"):
        next(stream)


def test_an_in_band_4xx_is_the_callers_fault(served):
    body = _sse('data: {"error": {"message": "prompt too long", "code": 400}}')
    transport = served(lambda request: httpx.Response(200, content=body))
    with pytest.raises(BadRequestError, match="prompt too long") as caught:
        list(transport.stream("http://s:1/generate", json_body={}, timeouts=Timeouts()))
    assert caught.value.status == 400


def test_parse_sse_line():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    for ignored in ["", ": comment", "data: [DONE]", "data:   ", "event: message"]:
        assert parse_sse_line(ignored) is None
    with pytest.raises(json.JSONDecodeError):
        parse_sse_line("data: {broken")


@pytest.mark.parametrize("status, error", [(400, BadRequestError), (404, BadRequestError), (422, BadRequestError),
                                           (408, ServerUnavailableError), (429, ServerUnavailableError),
                                           (500, ServerUnavailableError), (503, ServerUnavailableError)])
def test_error_for_blames_4xx_on_the_caller_and_the_rest_on_the_server(status, error):
    raised = error_for(Response(status, {"error": {"message": "why"}}, "http://s:1/generate"))
    assert type(raised) is error and raised.status == status and "why" in str(raised)


def test_error_message_reads_every_shape_sglang_answers_with():
    assert Response(400, {"error": {"message": "m"}}, "u").error_message() == "m"
    assert Response(400, {"error": "flat"}, "u").error_message() == "flat"
    assert Response(400, {"detail": "x"}, "u").error_message() == "{'detail': 'x'}"
    assert Response(400, "plain text", "u").error_message() == "plain text"
    assert not Response(500, {}, "u").ok and Response(204, None, "u").ok


@pytest.mark.parametrize("field", ["connect", "first_byte", "total"])
def test_timeouts_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        Timeouts(**{field: 0})
