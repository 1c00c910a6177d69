"""One attempt of one request: a PD pair sent concurrently, or one colocated call.

The two legs of a pair must run at the same time: SGLang answers the prefill
leg only after its KV reached the decode server, so awaiting prefill first
would hang until the 300 s bootstrap timeout. The prefill leg runs on a pool
thread, the decode leg on the caller's. When either fails, the other is
aborted at once with ``/abort_request`` (SGLang then frees the slot and answers
500 within milliseconds), and aborted again until it answers
(:mod:`backends.adapter._aborts`: an abort can overtake its request), so no server
holds a dead request for minutes.

Failures are blamed on the right leg: a decode leg that dies because its
prefill died is a prefill failure, and a 4xx from either leg is the caller's.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from backends.adapter._aborts import AbortFollowUp
from backends.adapter._inflight import Track
from backends.adapter._payloads import merge_pd_answers, rids_of, with_bootstrap, with_rids
from backends.adapter._route import PairTarget
from backends.adapter._transport import Timeouts, Transport, error_for
from backends.errors import (
    BadRequestError,
    DecodeFailedError,
    PDError,
    PrefillFailedError,
    RequestTimeoutError,
    ServerUnavailableError,
)

__all__ = ["Dispatcher", "Exchange", "LegOutcome", "new_rid"]

logger = logging.getLogger(__name__)

#: How SGLang 0.5.23's decode server reports a hand-off that failed on the prefill's side
#: (``srt/disaggregation/decode.py``: "Decode handshake failed ...", ``common/conn.py``:
#: ``KVTransferError``, "Lost connection with prefill instance", "Prefill bootstrap failed").
_PEER_FAILURE = re.compile(r"Decode handshake failed|KVTransferError|Lost connection with prefill|"
                           r"Prefill bootstrap failed", re.IGNORECASE)


def _untracked(server: str, rids: list[str], started: bool) -> None:
    pass


@dataclass
class LegOutcome:
    """One leg's answer and how long it took (seconds)."""

    body: Any
    latency: float


@dataclass
class Exchange:
    """One attempt on the wire, plain or streamed, PD or colocated: the engine's single view of it.

    Attributes
    ----------
    events
        Lazy: nothing is sent before the first ``next()``. A plain request
        yields one item, the answer (decode's, merged with prefill's prompt
        logprobs); a stream yields the server's SSE events.
    abort
        Aborts every leg still running (a consumer that stopped early, a
        broken stream). Never raises.
    prefill
        The prefill leg's outcome once it is known (PD only).
    """

    events: Iterator[Any]
    abort: Callable[[], None]
    prefill: Future | None = field(default=None)

    def prefill_latency(self) -> float | None:
        """Seconds the prefill leg took, when it answered successfully."""
        future = self.prefill
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result().latency


def new_rid() -> str:
    return uuid.uuid4().hex


class Dispatcher:
    """Sends legs over a transport; owns the pool that runs prefill legs.

    Parameters
    ----------
    transport
        The network seam.
    timeouts
        Limits for every leg.
    max_pairs
        Pairs in flight at once (one pool thread each). ``run_batch`` runs up
        to 96 programs at a time by default.

    Every sending method takes a ``track(url, rids, started)`` callback
    (:class:`~backends.adapter._inflight.InFlight`) that learns which request
    ids are on the wire where, so their owner can abort them later.
    """

    def __init__(self, transport: Transport, timeouts: Timeouts, max_pairs: int = 256) -> None:
        self.transport = transport
        self.timeouts = timeouts
        self._pool = ThreadPoolExecutor(max_workers=max_pairs, thread_name_prefix="pd-prefill-leg")
        self._follow_up = AbortFollowUp(self.abort)

    def abort(self, server: str, rids: list[str]) -> None:
        """Ask a server to drop requests; never raises (the server may be the dead one)."""
        quick = Timeouts(connect=1.0, first_byte=2.0, total=2.0)
        for rid in rids:
            try:
                self.transport.request("POST", f"{server}/abort_request", json_body={"rid": rid}, timeouts=quick)
            except Exception as exc:  # noqa: BLE001 - also a closed client during shutdown
                logger.debug("abort of %s on %s failed: %s", rid, server, exc)

    def abort_until_answered(self, server: str, rids: list[str], answered: threading.Event, deadline: float) -> None:
        """Abort now, and again until the leg has ``answered`` (or ``deadline`` passes)."""
        self.abort(server, rids)
        self._follow_up.watch(server, rids, answered, deadline)

    def _leg(self, server: str, body: dict, deadline: float, track: Track) -> LegOutcome:
        rids = rids_of(body)
        track(server, rids, True)
        started = time.monotonic()
        try:
            response = self.transport.request(
                "POST", f"{server}/generate", json_body=body, timeouts=self.timeouts, deadline=deadline
            )
            if not response.ok:
                raise error_for(response)
        except PDError as exc:
            raise _named(exc, server)
        finally:
            track(server, rids, False)
        return LegOutcome(response.body, time.monotonic() - started)

    def _stream_leg(self, server: str, body: dict, deadline: float, track: Track) -> Iterator[dict]:
        rids = rids_of(body)
        track(server, rids, True)
        try:
            yield from self.transport.stream(f"{server}/generate", json_body=body, timeouts=self.timeouts,
                                             deadline=deadline)
        except PDError as exc:
            raise _named(exc, server)
        finally:
            track(server, rids, False)

    def single(self, server: str, body: dict, track: Track = _untracked, *, stream: bool = False) -> Exchange:
        """A request to a colocated server, plain or streamed; abortable by its rid like any leg."""
        leg = with_rids(body, new_rid())
        rids = rids_of(leg)
        deadline = time.monotonic() + self.timeouts.total

        def events() -> Iterator[Any]:
            try:
                if stream:
                    yield from self._stream_leg(server, {**leg, "stream": True}, deadline, track)
                else:
                    yield self._leg(server, leg, deadline, track).body
            except RequestTimeoutError:
                self.abort(server, rids)
                raise

        return Exchange(events(), abort=lambda: self.abort(server, rids))

    def pair(self, target: PairTarget, body: dict, room: int, track: Track = _untracked, *,
             stream: bool = False) -> Exchange:
        """Both legs of a PD pair, concurrently; decode's answer (merged) or its stream.

        The prefill leg starts on the pool and the decode leg in the caller's
        thread, both at the first ``next()``. A failure of either aborts the
        other and raises the root cause (:func:`_root_cause`).
        """
        rid = new_rid()
        paired = with_bootstrap(body, target.bootstrap_host, target.bootstrap_port, room, target.room_stride)
        prefill_body = {k: v for k, v in with_rids(paired, f"{rid}-p").items() if k != "stream"}
        decode_body = {**with_rids(paired, f"{rid}-d"), "stream": stream}
        deadline = time.monotonic() + self.timeouts.total
        prefill_answered, decode_answered = threading.Event(), threading.Event()
        exchange = Exchange(iter(()), abort=lambda: None)

        def abort_prefill() -> None:
            if exchange.prefill is not None and not exchange.prefill.done():
                self.abort_until_answered(target.prefill, rids_of(prefill_body), prefill_answered, deadline)

        def abort_both() -> None:  # decode first: a frozen prefill server makes its abort wait for the timeout
            self.abort(target.decode, rids_of(decode_body))
            abort_prefill()

        def events() -> Iterator[Any]:
            future = self._pool.submit(self._leg, target.prefill, prefill_body, deadline, track)
            future.add_done_callback(lambda f: prefill_answered.set())
            future.add_done_callback(lambda f: _failed(f) and self.abort_until_answered(
                target.decode, rids_of(decode_body), decode_answered, deadline))
            exchange.prefill = future
            try:
                try:
                    if stream:
                        # Decode never saw the prompt: its chunks carry no prompt logprobs, prefill's answer does.
                        prefill = None
                        for event in self._stream_leg(target.decode, decode_body, deadline, track):
                            if body.get("return_logprob"):
                                prefill = prefill or self._prefill_answer(target, prefill_body, future, deadline)
                                event = merge_pd_answers(prefill.body, event, body.get("sampling_params"))
                            yield event
                        return
                    decode = self._leg(target.decode, decode_body, deadline, track)
                finally:
                    decode_answered.set()
            except BaseException as decode_error:
                cause = _root_cause(target, future, decode_error)  # before the abort muddles it
                abort_prefill()
                if isinstance(decode_error, GeneratorExit):
                    raise
                raise cause from decode_error
            yield merge_pd_answers(self._prefill_answer(target, prefill_body, future, deadline).body, decode.body,
                                   body.get("sampling_params"))

        exchange.events = events()
        exchange.abort = abort_both
        return exchange

    def _prefill_answer(self, target: PairTarget, prefill_body: dict, future, deadline: float) -> LegOutcome:
        """The prefill leg's answer, once decode has answered; its errors as the prefill leg's."""
        try:
            return future.result(timeout=max(0.1, deadline - time.monotonic()))
        except FutureTimeout:
            self.abort(target.prefill, rids_of(prefill_body))
            raise RequestTimeoutError(f"prefill leg on {target.prefill} never answered", server=target.prefill) from None
        except PDError as exc:
            raise _as_leg_error(exc, target.prefill, PrefillFailedError) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False)  # a queued prefill leg must still run: its decode leg is already sent
        self._follow_up.close()


def _named(error: PDError, server: str) -> PDError:
    """The error naming the server as the pool knows it (its base URL), whatever endpoint failed."""
    error.server = server
    return error


def _failed(future: Future) -> bool:
    return future.cancelled() or future.exception() is not None


def _as_leg_error(error: BaseException, server: str, leg: type[ServerUnavailableError]) -> BaseException:
    """Name the failed leg; caller errors, timeouts and already-named failures pass unchanged."""
    if isinstance(error, (BadRequestError, RequestTimeoutError, leg)) or not isinstance(error, ServerUnavailableError):
        return error
    role = "prefill" if leg is PrefillFailedError else "decode"
    return leg(f"{role} leg failed: {error}", server=server, status=error.status, unreachable=error.unreachable)


def _root_cause(target: PairTarget, prefill_future: Future, decode_error: BaseException) -> BaseException:
    """The error to report when the decode leg failed.

    A 4xx is the caller's whatever else happened. Otherwise the leg that failed
    first is to blame: a prefill leg already failed when decode's did means
    decode was aborted because of it (or lost its peer). A decode leg that
    reports its KV hand-off from the prefill failed (a frozen or dead prefill:
    the handshake, the transfer, the bootstrap or the peer connection) blames
    the prefill too, so a healthy decode server stays in rotation and the
    retry avoids the prefill. Anything else is decode's own failure, and
    prefill is merely aborted.
    """
    if isinstance(decode_error, BadRequestError):
        return decode_error
    if prefill_future.done() and not prefill_future.cancelled() and prefill_future.exception() is not None:
        return _as_leg_error(prefill_future.exception(), target.prefill, PrefillFailedError)
    if isinstance(decode_error, ServerUnavailableError) and _PEER_FAILURE.search(str(decode_error)):
        return PrefillFailedError(
            f"decode server {target.decode} could not receive the KV cache from prefill {target.prefill}: "
            f"{decode_error}", server=target.prefill, status=decode_error.status)
    return _as_leg_error(decode_error, target.decode, DecodeFailedError)
