"""In-memory twin of :class:`backends.adapter._transport.HttpxTransport` for fast tests.

Each server is a Python callable; no sockets, no threads of its own. Use it to
test routing, retries and failure handling in milliseconds, beside the
real-server tests of the same behaviour.

Examples
--------
>>> def server(method, path, body):
...     return 200, {"text": "hi", "meta_info": {}}
>>> transport = InMemoryTransport({"http://p:1": server})
>>> transport.request("POST", "http://p:1/generate", json_body={}, timeouts=Timeouts()).body["text"]
'hi'
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from backends.adapter._transport import Response, Timeouts, error_for, origin, raise_for_stream_event
from backends.errors import ServerUnavailableError

__all__ = ["Handler", "InMemoryTransport"]

#: ``handler(method, path, json_body)`` returns ``(status, body)``; for a stream
#: request ``body`` may be a list of events. Raising ``ConnectionError`` plays
#: a dead server (a refused connection); ``ConnectionResetError`` one that dies
#: during the request (the connection breaks).
Handler = Callable[[str, str, Any], tuple[int, Any]]


class InMemoryTransport:
    """Routes requests to per-server handlers and records every call."""

    def __init__(self, servers: dict[str, Handler]) -> None:
        self.servers = dict(servers)
        self.calls: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()

    def _dispatch(self, method: str, url: str, json_body: Any) -> tuple[str, int, Any]:
        parts = urlsplit(url)
        base = origin(url)
        with self._lock:
            self.calls.append((method, url, json_body))
        handler = self.servers.get(base)
        if handler is None:
            raise ServerUnavailableError(f"cannot reach {url}: nothing listening", server=base, unreachable=True)
        try:
            status, body = handler(method, parts.path, json_body)
        except ConnectionResetError as exc:  # the server went away mid-request (as httpx's ReadError)
            raise ServerUnavailableError(f"connection to {url} broke: {exc!r}", server=base) from exc
        except ConnectionError as exc:
            raise ServerUnavailableError(f"cannot reach {url}: {exc!r}", server=base, unreachable=True) from exc
        return base, status, body

    def request(
        self, method: str, url: str, *, json_body: Any = None, timeouts: Timeouts, deadline: float | None = None
    ) -> Response:
        _, status, body = self._dispatch(method, url, json_body)
        return Response(status, body, url)

    def stream(self, url: str, *, json_body: Any, timeouts: Timeouts, deadline: float | None = None) -> Iterator[dict]:
        base, status, body = self._dispatch("POST", url, json_body)
        if status != 200:
            raise error_for(Response(status, body, url))
        for event in body:
            if isinstance(event, BaseException):
                raise ServerUnavailableError(f"stream from {url} broke: {event!r}", server=base, unreachable=True) from event
            raise_for_stream_event(event, url)
            yield event

    def close(self) -> None:
        pass

    def paths(self, base_url: str) -> list[str]:
        """Paths requested from one server, in order."""
        with self._lock:
            return [urlsplit(url).path for _, url, _ in self.calls if url.startswith(base_url)]
