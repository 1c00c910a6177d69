"""The per-request engine: route, send, retry, blame, measure; one path for plain and streamed requests.

One request becomes attempts until one delivers its first result (a plain
request's whole answer, a stream's first event): each attempt is routed
(avoiding servers that already failed this request), counted as load from
that moment, sent as a PD pair or to a colocated server with a fresh
bootstrap room, and on failure blamed on the server at fault. Only then does
a stream relay the rest; a break after that is a
:class:`~backends.errors.StreamInterruptedError`, never a silent retry that
would repeat text. Every request leaves one :class:`RequestRecord`.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from backends.adapter._dispatch import Dispatcher, Exchange
from backends.adapter._health import HealthTracker
from backends.adapter._inflight import InFlight
from backends.adapter._metrics import Metrics, RequestRecord
from backends.adapter._payloads import RoomAllocator, batch_size, describe_shape, routing_prompt
from backends.adapter._retry import RetryPolicy
from backends.adapter._route import Route
from backends.adapter._router import Router
from backends.errors import (
    BadRequestError,
    DecodeFailedError,
    NoHealthyServerError,
    PDError,
    PoisonRequestError,
    PrefillFailedError,
    RequestTimeoutError,
    ServerUnavailableError,
    StreamInterruptedError,
)

__all__ = ["Delivered", "Engine"]

_NOTHING = object()


@dataclass
class Delivered:
    """A plain request's answer and the route that served it."""

    answer: Any
    route: Route


@dataclass
class _Opened:
    """An attempt that produced its first result."""

    route: Route
    exchange: Exchange
    first: Any
    load: ExitStack
    sent_at: float


class Engine:
    """Sends requests with retries over one client's router, dispatcher and registry.

    Parameters are the client's shared parts; the engine holds no state of
    its own beyond the room allocator, so it is safe to use from any thread.
    """

    def __init__(self, router: Router, dispatcher: Dispatcher, inflight: InFlight, health: HealthTracker,
                 retry: RetryPolicy, metrics: Metrics, died: Callable[[str], bool] = lambda url: False) -> None:
        self.router = router
        self.dispatcher = dispatcher
        self.inflight = inflight
        self.health = health
        self.retry = retry
        self.metrics = metrics
        self._died = died
        self._rooms = RoomAllocator()

    def send(self, kind: str, body: dict, *, program: str | None = None, prefer_prefill: str | None = None,
             check: Callable[[dict], None] = lambda body: None) -> Delivered:
        """One plain request: retried until it is answered; raises the final error."""
        record, started = RequestRecord(kind=kind, attempts=0), time.monotonic()
        opened = self._open(record, started, body, program, prefer_prefill, check, stream=False)
        opened.load.close()
        # Without a stream, the first token is due when the prefill leg answers (SGLang
        # answers it once the KV reached decode); decode is the rest of the attempt.
        record.ttft = record.prefill_latency = opened.exchange.prefill_latency()
        if record.ttft is not None:
            record.decode_time = max(time.monotonic() - opened.sent_at - record.ttft, 0.0)
        self._finish(record, started, opened.first)
        self.router.learned(opened.route, body["text"] if isinstance(body.get("text"), list) else None)
        return Delivered(opened.first, opened.route)

    def stream(self, kind: str, body: dict, *, program: str | None = None,
               check: Callable[[dict], None] = lambda body: None) -> Iterator[dict]:
        """One streamed request: yields the server's events; lazy (nothing is sent before the first ``next()``)."""
        record, started = RequestRecord(kind=kind, attempts=0), time.monotonic()
        opened = self._open(record, started, body, program, None, check, stream=True)
        record.ttft = time.monotonic() - started
        sent, last, finished = 0, opened.first, False
        try:
            with opened.load:
                for event in _chain(opened.first, opened.exchange.events):
                    last = event
                    sent = len(event.get("text", "")) if isinstance(event, dict) else sent
                    yield event
                finished = True
        except PDError as exc:
            record.error = f"StreamInterruptedError: {exc}"
            raise StreamInterruptedError(
                f"stream broke after {sent} characters: {exc}. The text so far was delivered; rerun the request.",
                server=exc.server,
            ) from exc
        finally:
            if not finished:
                opened.exchange.abort()
                opened.exchange.events.close()
            record.prefill_latency = opened.exchange.prefill_latency()
            record.decode_time = time.monotonic() - started - record.ttft
            self._finish(record, started, last)
        self.router.learned(opened.route)

    def _open(self, record: RequestRecord, started: float, body: dict, program: str | None,
              prefer_prefill: str | None, check: Callable[[dict], None], *, stream: bool) -> _Opened:
        """Attempts until one yields its first result; a refused or exhausted request is recorded and raised."""
        avoid: set[str] = set()
        answers: dict[tuple[int, str], tuple[str, str]] = {}  # this request's 5xx answers -> (server, error)
        lost: list[str] = []  # servers that died while this request was on them
        track = self.inflight.tracker(program)

        def attempt() -> _Opened:
            record.attempts += 1
            route = self.router.route(*routing_prompt(body), avoid=avoid, prefer_prefill=prefer_prefill)
            _describe(record, route)
            load, sent_at = ExitStack(), time.monotonic()
            prefilled = load.enter_context(self.router.holding(route))
            try:
                record.prefix_wait += self.router.await_prefix(route)
                if route.mode == "pd":
                    room = self._rooms.allocate(batch_size(body) or 1, ranks=route.prefill.dp_ranks,
                                                rank=route.prefill_rank or 0)
                    exchange = self.dispatcher.pair(route.target, body, room, track, stream=stream)
                else:
                    exchange = self.dispatcher.single(route.colocated.url, body, track, stream=stream)
                first = next(exchange.events, _NOTHING)
                prefilled()  # a first result means the prompt is prefilled (PD: its KV reached decode)
                if first is _NOTHING:
                    raise ServerUnavailableError(f"{route.servers[-1]} ended the stream before any text",
                                                 server=route.servers[-1])
            except PDError as exc:
                load.close()
                self._blame(exc, avoid, record, answers)
                self._contain(exc, lost, body)
                raise
            except BaseException:
                load.close()
                raise
            for url in route.servers:
                self.health.record_success(url)
            return _Opened(route, exchange, first, load, sent_at)

        try:
            check(body)  # once, before any attempt: a refused body costs no server anything
            return self.retry.retrying()(attempt)
        except PDError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.total = time.monotonic() - started
            self.metrics.record(record)
            raise self._explain(exc) from exc

    def _finish(self, record: RequestRecord, started: float, answer: Any) -> None:
        record.total = time.monotonic() - started
        _count_tokens(record, answer)
        self.metrics.record(record)

    def _explain(self, error: PDError) -> PDError:
        """The final error; a leg failure with its whole role down becomes NoHealthyServerError."""
        role = {PrefillFailedError: "prefill", DecodeFailedError: "decode"}.get(type(error))
        down = self.router.out_of_rotation(role) if role else None
        if down is None:
            return error
        return NoHealthyServerError(
            f"no {role} server is in rotation ({down}); the last attempt failed with: {error}. "
            "Check the servers' logs; they return to rotation once /health passes.",
            server=error.server, status=error.status,
        )

    def _contain(self, error: PDError, lost: list[str], body: dict) -> None:
        """Stop retrying a request that servers die under: an unknown poison input must not take the pool.

        A connection that broke (not refused, not timed out, no HTTP answer),
        to a server that then refuses connections, means the server died
        during this attempt. The request gets one more attempt; if a server
        dies under that one too, :class:`PoisonRequestError` ends it.
        """
        if error.server is None or error.status is not None or error.unreachable:
            return
        if isinstance(error, (BadRequestError, RequestTimeoutError)) or not self._died(error.server):
            return
        lost.append(error.server)
        self.health.record_failure(error.server, f"died during a request: {error}", unreachable=True)
        if len(lost) >= 2:
            raise PoisonRequestError(
                f"servers died during two attempts of this request ({', '.join(lost)}): it is likely an input "
                f"SGLang cannot survive, so it was not sent again. Request: {describe_shape(body)}. Check the "
                f"servers' logs for the crash; if it is an input, it can be added to the adapter's checks",
                servers=lost) from error

    def _blame(self, error: PDError, avoid: set[str], record: RequestRecord,
               answers: dict[tuple[int, str], tuple[str, str]]) -> None:
        """Count a failed attempt against its server, unless it is the request's own.

        A server that *answers* 5xx is alive; when a second attempt gets the
        same answer, the request caused it (SGLang aborts a request with HTTP
        500 when, e.g., ``min_new_tokens`` outlasts what its grammar allows:
        ``FINISH_ABORT("Grammar accept_token failed ...")`` in
        ``scheduler_components/batch_result_processor.py``): it raises
        :class:`BadRequestError` and costs no server its standing.
        """
        if error.server is None or isinstance(error, BadRequestError):
            return
        if error.status is not None and error.status >= 500:
            said = (error.status, re.split(r"answered HTTP \d+: ", str(error), maxsplit=1)[-1])
            if said in answers:
                first, counted = answers[said]
                self.health.forgive(first, counted)
                raise BadRequestError(f"{error}. {first} answered the same to an earlier attempt, so it is this "
                                      f"request's own error (fix the request; it was not retried further)",
                                      server=error.server, status=error.status) from error
            answers[said] = (error.server, str(error))
        avoid.add(error.server)
        record.failed_servers.append(error.server)
        self.health.record_failure(error.server, str(error), unreachable=error.unreachable)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _describe(record: RequestRecord, route: Route) -> None:
    record.mode = route.mode
    record.route_reason = route.reason
    record.route_rule = route.rule
    record.prefill = route.prefill.url if route.prefill else None
    record.decode = route.decode.url if route.decode else None
    record.colocated = route.colocated.url if route.colocated else None


def _count_tokens(record: RequestRecord, answer: Any) -> None:
    for item in answer if isinstance(answer, list) else [answer]:
        meta = item.get("meta_info", {}) if isinstance(item, dict) else {}
        record.prompt_tokens += meta.get("prompt_tokens", 0) or 0
        record.completion_tokens += meta.get("completion_tokens", 0) or 0
        record.cached_tokens += meta.get("cached_tokens", 0) or 0
