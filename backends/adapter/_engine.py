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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from backends.adapter._dispatch import Dispatcher, Exchange
from backends.adapter._health import HealthTracker
from backends.adapter._hedge import Hedger, HedgePolicy
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
                 retry: RetryPolicy, metrics: Metrics, died: Callable[[str], bool] = lambda url: False,
                 hedge: HedgePolicy | None = None) -> None:
        self.router = router
        self.dispatcher = dispatcher
        self.inflight = inflight
        self.health = health
        self.retry = retry
        self.metrics = metrics
        self._died = died
        self._rooms = RoomAllocator()
        self.hedger = Hedger(hedge) if hedge is not None else None
        # Attempts of hedged requests run here, so the caller can wait on two; a loser whose prefill
        # is frozen holds its thread until its deadline, hence the room.
        self._pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="pd-hedge") if hedge else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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

        def attempt(late: frozenset[str] = frozenset(), slot: _Slot | None = None) -> _Opened:
            record.attempts += 1
            route = self.router.route(*routing_prompt(body), avoid=avoid | late, prefer_prefill=prefer_prefill)
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
                if slot is not None:
                    slot.route, slot.exchange = route, exchange
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
            return self.retry.retrying()(attempt if self.hedger is None else lambda: self._hedged(attempt, record))
        except PDError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.total = time.monotonic() - started
            self.metrics.record(record)
            raise self._explain(exc) from exc

    def _hedged(self, attempt: Callable[..., _Opened], record: RequestRecord) -> _Opened:
        """``attempt``, plus a second one on another prefill server if the first one's prefill is late.

        The first attempt to produce a result wins; the other is aborted on both
        of its servers and its in-flight counts released when it ends. A late
        prefill server that lost the race is counted as failing (three in a
        row take it out of rotation until the canary pair through it passes, :mod:`._canary`).
        """
        hedger, first = self.hedger, _Slot()
        primary = self._pool.submit(attempt, frozenset(), first)
        delay = hedger.delay()
        try:
            return primary.result(timeout=delay)
        except FutureTimeout:
            pass
        leg = first.exchange.prefill if first.exchange is not None else None
        if first.route is None or first.route.mode != "pd" or (leg is not None and leg.done()) or not hedger.take():
            return primary.result()
        record.hedged, late, second = True, first.route.prefill.url, _Slot()
        hedge = self._pool.submit(attempt, frozenset({late}), second)
        try:
            done, _ = wait([primary, hedge], return_when=FIRST_COMPLETED)
            winner = next(iter(done))
            if winner.exception() is not None:  # the other one may still succeed
                winner = hedge if winner is primary else primary
                winner.exception()  # waits
        except BaseException:
            for slot, future in ((first, primary), (second, hedge)):
                _discard(slot, future, self._pool)
            raise
        loser_slot, loser = (second, hedge) if winner is primary else (first, primary)
        _discard(loser_slot, loser, self._pool)
        if winner is hedge and winner.exception() is None:
            record.hedge_won = True
            hedger.won_race()
            self.health.record_failure(late, f"prefill leg gave no answer within {delay:.1f}s while "
                                             f"{second.route.prefill.url} served the request")
        return winner.result()

    def _finish(self, record: RequestRecord, started: float, answer: Any) -> None:
        if self.hedger is not None and record.mode == "pd" and record.prefill_latency is not None:
            self.hedger.observe(record.prefill_latency)
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

        A server that *answers* 5xx is alive; when another server gives a
        later attempt the same answer, the request caused it (as SGLang's
        request aborts the transport already knows, ``REQUEST_CAUSED_500``):
        it raises :class:`BadRequestError` and costs no server its standing.
        The same server saying it twice proves nothing either way.
        """
        if error.server is None or isinstance(error, BadRequestError):
            return
        if error.status is not None and error.status >= 500:
            said = (error.status, re.split(r"answered HTTP \d+: ", str(error), maxsplit=1)[-1])
            if said in answers and answers[said][0] != error.server:
                first, counted = answers[said]
                self.health.forgive(first, counted)
                raise BadRequestError(f"{error}. {first} answered the same to an earlier attempt, so it is this "
                                      f"request's own error (fix the request; it was not retried further)",
                                      server=error.server, status=error.status) from error
            answers.setdefault(said, (error.server, str(error)))
        avoid.add(error.server)
        record.failed_servers.append(error.server)
        self.health.record_failure(error.server, str(error), unreachable=error.unreachable)


@dataclass
class _Slot:
    """Where a hedged attempt shows its route and exchange as soon as it has them."""

    route: Route | None = None
    exchange: Exchange | None = None


def _discard(slot: _Slot, future: Future, pool: ThreadPoolExecutor) -> None:
    """Abort an attempt that lost a race (both its servers), and release it once it ends.

    The abort goes from ``pool``: a frozen server takes its timeout to refuse it.
    """
    if slot.exchange is not None:
        pool.submit(slot.exchange.abort)

    def release(done: Future) -> None:
        if not done.cancelled() and done.exception() is None:
            opened = done.result()
            opened.exchange.abort()
            opened.exchange.events.close()
            opened.load.close()

    future.add_done_callback(release)


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
