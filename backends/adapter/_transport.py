"""HTTP transport: one pooled, thread-safe client with timeouts everywhere.

The transport is the seam between the adapter and the network. It knows
nothing of prefill or decode; it sends JSON, parses JSON or server-sent
events, and turns network failures into :mod:`backends.errors` exceptions that
name the server. :class:`backends.testing.InMemoryTransport` is its
in-memory twin for tests of routing and retry logic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from urllib.parse import urlsplit

import httpx

from backends.errors import BadRequestError, RequestTimeoutError, ServerUnavailableError

__all__ = ["Timeouts", "Response", "Transport", "origin", "parse_sse_line", "raise_for_stream_event", "HttpxTransport", "error_for"]


@dataclass(frozen=True)
class Timeouts:
    """Time limits for one request leg, in seconds.

    Parameters
    ----------
    connect
        Opening a TCP connection. Short: a dead host should cost a retry, not a wait.
    first_byte
        Longest silence while streaming (first chunk included).
    total
        Whole request, from send to last byte.
    """

    connect: float = 3.0
    first_byte: float = 120.0
    total: float = 600.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "total"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Timeouts.{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class Response:
    """A complete HTTP answer: status code and parsed JSON (or raw text)."""

    status: int
    body: Any
    url: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_message(self) -> str:
        """The server's own error text, however it was shaped."""
        body = self.body
        if isinstance(body, dict):
            err = body.get("error", body)
            if isinstance(err, dict):
                return str(err.get("message", err))
            return str(err)
        return str(body)


class Transport(Protocol):
    """What the adapter needs from the network."""

    def request(
        self, method: str, url: str, *, json_body: Any = None, timeouts: Timeouts, deadline: float | None = None
    ) -> Response: ...

    def stream(self, url: str, *, json_body: Any, timeouts: Timeouts, deadline: float | None = None) -> Iterator[dict]: ...

    def close(self) -> None: ...


def origin(url: str) -> str:
    """``scheme://host:port`` of an endpoint URL: how errors name the server (never the endpoint)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def parse_sse_line(line: str) -> dict | None:
    """One SSE line to its JSON event; ``None`` for blank lines, comments and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def raise_for_stream_event(event: dict, url: str) -> None:
    """SGLang reports mid-stream failures in-band with HTTP 200; make them exceptions."""
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and 400 <= code < 500 and code not in (408, 429):
            # e.g. a prompt longer than the context: the request's fault, like an HTTP 4xx
            raise BadRequestError(f"{url} refused the request mid-stream: {message}", server=origin(url), status=code)
        raise ServerUnavailableError(f"{url} reported an error mid-stream: {message}", server=origin(url))


def _remaining(deadline: float | None, fallback: float) -> float:
    if deadline is None:
        return fallback
    left = deadline - time.monotonic()
    if left <= 0:
        raise RequestTimeoutError("total request deadline passed before the request was sent")
    return min(left, fallback)


def _transport_error(url: str, exc: httpx.TransportError | OSError) -> ServerUnavailableError:
    """A refused connection proves the server is down; a reset one may be a stale keep-alive.

    A bare ``OSError`` (httpcore's pool checks sockets with ``poll`` outside its
    error mapping, so EBADF escapes raw) is a broken connection too.
    """
    if isinstance(exc, httpx.ConnectError):
        return ServerUnavailableError(f"cannot reach {url}: {exc!r}", server=origin(url), unreachable=True)
    return ServerUnavailableError(f"connection to {url} broke: {exc!r}", server=origin(url))


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class HttpxTransport:
    """Pooled httpx client shared by every thread of the adapter.

    Parameters
    ----------
    max_connections
        Upper bound of open connections across all servers. ``run_batch`` runs
        up to 96 programs at once and each pair holds two connections.
    """

    def __init__(self, max_connections: int = 512) -> None:
        # No time-based expiry and no idle surplus: httpcore 1.0's pool may close an idle
        # connection in one thread after assigning it to a request of another, which then
        # fails with EBADF under load. Sockets SGLang closed (its keep-alive is 5 s) are
        # still dropped: the pool sees them readable and discards them before reuse.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=None
        )
        self._client = httpx.Client(limits=limits, trust_env=False)

    def _timeout(self, timeouts: Timeouts, read: float) -> httpx.Timeout:
        return httpx.Timeout(connect=timeouts.connect, read=read, write=timeouts.connect * 4, pool=timeouts.total)

    def request(
        self, method: str, url: str, *, json_body: Any = None, timeouts: Timeouts, deadline: float | None = None
    ) -> Response:
        read = _remaining(deadline, timeouts.total)
        try:
            answer = self._client.request(method, url, json=json_body, timeout=self._timeout(timeouts, read))
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(f"{url} did not answer in time ({type(exc).__name__})", server=origin(url)) from exc
        except (httpx.TransportError, OSError) as exc:
            raise _transport_error(url, exc) from exc
        return Response(answer.status_code, _decode(answer), url)

    def stream(self, url: str, *, json_body: Any, timeouts: Timeouts, deadline: float | None = None) -> Iterator[dict]:
        read = _remaining(deadline, timeouts.first_byte)
        try:
            with self._client.stream("POST", url, json=json_body, timeout=self._timeout(timeouts, read)) as answer:
                if answer.status_code != 200:
                    answer.read()
                    raise error_for(Response(answer.status_code, _decode(answer), url))
                for line in answer.iter_lines():
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    raise_for_stream_event(event, url)
                    yield event
                    if deadline is not None and time.monotonic() > deadline:
                        raise RequestTimeoutError(f"{url}: stream exceeded its total timeout", server=origin(url))
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(f"{url} went silent mid-stream ({type(exc).__name__})", server=origin(url)) from exc
        except (httpx.TransportError, OSError) as exc:
            raise _transport_error(url, exc) from exc

    def close(self) -> None:
        self._client.close()


#: HTTP 500 answers SGLang 0.5.23 gives when it aborts one request for its own content, the server
#: unharmed: a grammar its sampling parameters cannot satisfy (``FINISH_ABORT`` in
#: ``managers/scheduler_components/batch_result_processor.py``, ``disaggregation/prefill.py``,
#: ``disaggregation/decode_schedule_batch_mixin.py``).
REQUEST_CAUSED_500 = ("Grammar accept_token failed",)


def error_for(response: Response) -> Exception:
    """Map an HTTP error answer to the exception tree: 4xx is the caller's fault, 5xx/408/429 the server's.

    Except the 500s in :data:`REQUEST_CAUSED_500`: the request's own, like a 4xx.
    """
    message = f"{response.url} answered HTTP {response.status}: {response.error_message()}"
    if response.status == 500 and any(known in message for known in REQUEST_CAUSED_500):
        return BadRequestError(message + " (SGLang aborted this request for its content: fix the request; "
                               "it was not retried)", server=origin(response.url), status=response.status)
    if response.status in (408, 429) or response.status >= 500:
        return ServerUnavailableError(message, server=origin(response.url), status=response.status)
    return BadRequestError(message + " (fix the request; it was not retried)", server=origin(response.url), status=response.status)
