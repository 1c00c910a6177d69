"""One attempt of one request: a PD pair sent concurrently, or one colocated call.

The two legs of a pair must run at the same time: SGLang answers the prefill
leg only after its KV reached the decode server, so awaiting prefill first
would hang until the 300 s bootstrap timeout. The prefill leg runs on a pool
thread, the decode leg on the caller's. When either fails, the other is
aborted at once with ``/abort_request`` (SGLang then frees the slot and answers
500 within milliseconds), and aborted again until it answers
(:mod:`backends.aborts`: an abort can overtake its request), so no server
holds a dead request for minutes.

Failures are blamed on the right leg: a decode leg that dies because its
prefill died is a prefill failure, and a 4xx from either leg is the caller's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from backends.aborts import AbortFollowUp
from backends.errors import (
    BadRequestError,
    DecodeFailedError,
    PDError,
    PrefillFailedError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from backends.payloads import rids_of, with_bootstrap, with_rids
from backends.transport import Response, Timeouts, Transport, error_for

logger = logging.getLogger(__name__)

Track = Callable[[str, list[str], bool], None]


def _untracked(server: str, rids: list[str], started: bool) -> None:
    pass


@dataclass(frozen=True)
class PairTarget:
    """Where one attempt goes: a prefill and a decode server, and how decode finds prefill."""

    prefill: str
    decode: str
    bootstrap_host: str
    bootstrap_port: int | None
    room_stride: int = 1


@dataclass
class LegOutcome:
    body: Any
    latency: float


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

    Every sending method takes an optional ``track(url, rids, started)``
    callback that learns which request ids are in flight where, so the owner
    can abort them later (``end_program``).
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
        finally:
            track(server, rids, False)
        if not response.ok:
            raise error_for(response)
        return LegOutcome(response.body, time.monotonic() - started)

    def single(self, server: str, body: dict, track: Track = _untracked) -> LegOutcome:
        """A plain request to a colocated server."""
        leg = with_rids(body, new_rid())
        deadline = time.monotonic() + self.timeouts.total
        try:
            return self._leg(server, leg, deadline, track)
        except RequestTimeoutError:
            self.abort(server, rids_of(leg))
            raise

    def _legs(self, target: PairTarget, body: dict, room: int) -> tuple[dict, dict]:
        rid = new_rid()
        paired = with_bootstrap(body, target.bootstrap_host, target.bootstrap_port, room, target.room_stride)
        return with_rids(paired, f"{rid}-p"), with_rids(paired, f"{rid}-d")

    def pair(self, target: PairTarget, body: dict, room: int, track: Track = _untracked) -> tuple[LegOutcome, LegOutcome]:
        """Both legs concurrently; returns (prefill, decode) outcomes or raises the root cause."""
        prefill_body, decode_body = self._legs(target, body, room)
        deadline = time.monotonic() + self.timeouts.total
        prefill_future, prefill_answered, decode_answered = self._start_prefill(
            target, prefill_body, decode_body, deadline, track)
        try:
            try:
                decode = self._leg(target.decode, decode_body, deadline, track)
            finally:
                decode_answered.set()
        except BaseException as decode_error:
            cause = _root_cause(target, prefill_future, decode_error)  # before the abort muddles it
            if not prefill_future.done():
                self.abort_until_answered(target.prefill, rids_of(prefill_body), prefill_answered, deadline)
            raise cause from decode_error
        try:
            prefill = prefill_future.result(timeout=max(0.1, deadline - time.monotonic()))
        except FutureTimeout:
            self.abort(target.prefill, rids_of(prefill_body))
            raise RequestTimeoutError(f"prefill leg on {target.prefill} never answered", server=target.prefill)
        except PDError as exc:
            raise _as_leg_error(exc, target.prefill, PrefillFailedError) from exc
        return prefill, decode

    def pair_stream(
        self, target: PairTarget, body: dict, room: int, track: Track = _untracked
    ) -> tuple[Future, Iterator[dict], Callable[[], None]]:
        """Start both legs with decode streaming.

        Returns the prefill future, decode's event iterator and a function that
        aborts both legs (for a consumer that stops early or a broken stream).
        """
        prefill_body, decode_body = self._legs(target, body, room)
        decode_body["stream"] = True
        prefill_body = {k: v for k, v in prefill_body.items() if k != "stream"}
        deadline = time.monotonic() + self.timeouts.total
        prefill_future, prefill_answered, decode_answered = self._start_prefill(
            target, prefill_body, decode_body, deadline, track)

        def abort_both() -> None:
            if not prefill_future.done():
                self.abort_until_answered(target.prefill, rids_of(prefill_body), prefill_answered, deadline)
            self.abort(target.decode, rids_of(decode_body))

        def events() -> Iterator[dict]:
            track(target.decode, rids_of(decode_body), True)
            try:
                yield from self.transport.stream(
                    f"{target.decode}/generate", json_body=decode_body, timeouts=self.timeouts, deadline=deadline
                )
            except BaseException as decode_error:
                cause = _root_cause(target, prefill_future, decode_error)
                if not prefill_future.done():
                    self.abort_until_answered(target.prefill, rids_of(prefill_body), prefill_answered, deadline)
                if isinstance(decode_error, GeneratorExit):
                    raise
                raise cause from decode_error
            finally:
                decode_answered.set()
                track(target.decode, rids_of(decode_body), False)

        return prefill_future, events(), abort_both

    def _start_prefill(self, target: PairTarget, prefill_body: dict, decode_body: dict, deadline: float,
                       track: Track) -> tuple[Future, threading.Event, threading.Event]:
        """Send the prefill leg on the pool; if it fails, abort the decode leg until it answers.

        Returns the prefill future and the two legs' "answered" events (the
        caller sets decode's once its decode leg returns).
        """
        prefill_answered, decode_answered = threading.Event(), threading.Event()
        future = self._pool.submit(self._leg, target.prefill, prefill_body, deadline, track)
        future.add_done_callback(lambda f: prefill_answered.set())
        future.add_done_callback(lambda f: _failed(f) and self.abort_until_answered(
            target.decode, rids_of(decode_body), decode_answered, deadline))
        return future, prefill_answered, decode_answered

    def close(self) -> None:
        self._pool.shutdown(wait=False)  # a queued prefill leg must still run: its decode leg is already sent
        self._follow_up.close()


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
    decode was aborted because of it (or lost its peer); anything else is
    decode's own failure, and prefill is merely aborted.
    """
    if isinstance(decode_error, BadRequestError):
        return decode_error
    if prefill_future.done() and not prefill_future.cancelled() and prefill_future.exception() is not None:
        return _as_leg_error(prefill_future.exception(), target.prefill, PrefillFailedError)
    return _as_leg_error(decode_error, target.decode, DecodeFailedError)
