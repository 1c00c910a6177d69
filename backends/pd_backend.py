"""``PDBackend``: SGLang's frontend language on prefill/decode-separated servers.

A :class:`sglang.lang.backend.base_backend.BaseBackend`, so any
``@sgl.function`` runs on it unchanged (``sgl.set_default_backend`` or
``backend=``). Each frontend call becomes one request routed to a prefill and
a decode server and sent as a PD pair (or to a colocated server), retried on
another pair when a server fails, and measured.

Frontend call -> what the servers see:

==========================  ====================================================
``gen``                     one pair, decode's answer
``gen`` with ``stream``     one pair, decode streams (SSE), retried until the first chunk
``select``                  2-3 pairs on the same prefill server (prompt logprobs
                            come from prefill and are merged before decode's)
``fork`` (n > 1)            a warm-up pair of the shared text (``commit_lazy_operations``)
``run_batch`` prefix        a warm-up pair on the server that will serve it (``cache_prefix``)
``end_program``             ``/abort_request`` for the program's legs still in flight
``sgl.flush_cache``         ``/flush_cache`` on every server
==========================  ====================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from typing import Any, Iterator, Sequence

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.backend.runtime_endpoint import compute_normalized_prompt_logprobs
from sglang.lang.chat_template import ChatTemplate
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.ir import SglSamplingParams

from backends.chat_template import resolve_chat_template
from backends.dispatch import Dispatcher, LegOutcome
from backends.errors import (
    BadRequestError,
    ConfigurationError,
    DecodeFailedError,
    NoHealthyServerError,
    PDError,
    PrefillFailedError,
    ServerUnavailableError,
    StreamInterruptedError,
)
from backends.health import HealthTracker
from backends.metrics import Metrics, RequestRecord
from backends.payloads import (
    RoomAllocator,
    batch_size,
    check_sampling,
    merge_pd_answers,
    routing_text,
    sampling_body,
)
from backends.prefix_index import PrefixIndex
from backends.retry import RetryPolicy
from backends.router import Route, Router
from backends.routing import CacheAware, LeastLoaded, Policy
from backends.servers import ServerInfo, discover, normalize_url
from backends.transport import HttpxTransport, Timeouts, Transport

logger = logging.getLogger(__name__)

# Rough characters per token, to turn the user's token threshold into the
# character units the prefix index works in.
_CHARS_PER_TOKEN = 4


class PDBackend(BaseBackend):
    """Runs SGLang programs on pools of prefill, decode and colocated servers.

    Parameters
    ----------
    prefill, decode
        URLs of SGLang servers started with ``--disaggregation-mode prefill``
        / ``decode``. Both empty, or both given.
    colocated
        URLs of ordinary servers. Alone, they make this a load-balancing
        backend for plain deployments (the same programs run unchanged); next
        to a PD pool they take short prompts (``colocated_below_tokens``) and
        serve while no PD pair is in rotation.
    chat_template
        A ``ChatTemplate`` or the name of an SGLang template; by default read
        from the model's own tokenizer files.
    prefill_policy, decode_policy, colocated_policy
        Server choice (:mod:`backends.routing`). Defaults: cache-aware on the
        whole prompt for prefill and colocated, least in-flight for decode.
    colocated_below_tokens
        Conditional disaggregation: prompts with fewer uncached tokens than
        this go to a colocated server. ``None`` (default) disables it.
    timeouts, retry
        Limits per leg and retry bounds per request.
    transport
        The network seam; an :class:`~backends.memory_transport.InMemoryTransport` in tests.
    metrics_registry
        A ``prometheus_client.CollectorRegistry`` to export metrics into.
    failure_threshold, probe_interval, breaker_cooldown
        Circuit breaker: consecutive errors that take a server out of
        rotation, seconds between health probes while it is out, and seconds
        before the first probe of a server whose breaker opened.
    max_pairs
        Requests in flight at once through this backend.
    """

    def __init__(
        self,
        prefill: Sequence[str] = (),
        decode: Sequence[str] = (),
        colocated: Sequence[str] = (),
        *,
        chat_template: str | ChatTemplate | None = None,
        prefill_policy: Policy | None = None,
        decode_policy: Policy | None = None,
        colocated_policy: Policy | None = None,
        colocated_below_tokens: int | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        transport: Transport | None = None,
        metrics_registry: Any = None,
        failure_threshold: int = 3,
        probe_interval: float = 1.0,
        breaker_cooldown: float = 10.0,
        max_pairs: int = 256,
    ) -> None:
        super().__init__()
        self.support_concate_and_append = False
        urls = {role: [normalize_url(u) for u in _as_list(role, given)]
                for role, given in (("prefill", prefill), ("decode", decode), ("colocated", colocated))}
        _check_pools(urls)
        if colocated_below_tokens is not None and colocated_below_tokens < 0:
            raise ConfigurationError(f"colocated_below_tokens must be >= 0 or None, got {colocated_below_tokens}")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._transport = transport or HttpxTransport(max_connections=2 * max_pairs)
        discovery = Timeouts(connect=self.timeouts.connect, first_byte=30.0, total=30.0)
        self.pools: dict[str, list[ServerInfo]] = {
            role: [discover(self._transport, url, role, discovery) for url in role_urls]
            for role, role_urls in urls.items()
        }
        self.model_path = _common_model(self.pools)
        self.chat_template = resolve_chat_template(self.model_path, chat_template)
        self.metrics = Metrics(registry=metrics_registry)
        self._index = PrefixIndex()
        all_urls = [s.url for servers in self.pools.values() for s in servers]
        self._health = HealthTracker(
            all_urls, self._probe, failure_threshold=failure_threshold,
            probe_interval=probe_interval, breaker_cooldown=breaker_cooldown,
            on_recover=lambda url: self._router.forget(url),
        )
        self._router = Router(
            self.pools, self._health, self._index,
            {"prefill": prefill_policy or CacheAware(), "decode": decode_policy or LeastLoaded(),
             "colocated": colocated_policy or CacheAware()},
            colocated_below_chars=None if colocated_below_tokens is None else colocated_below_tokens * _CHARS_PER_TOKEN,
        )
        self._dispatcher = Dispatcher(self._transport, self.timeouts, max_pairs=max_pairs)
        self._rooms = RoomAllocator()
        self._inflight: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._inflight_lock = threading.Lock()

    # ----- the frontend seam -------------------------------------------------

    def get_model_name(self) -> str:
        return self.model_path

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def generate(self, s: Any, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        body = {"text": s.text_, **sampling_body(sampling_params)}
        self._refuse_parallel_sampling(body)
        answer = self._execute("gen", body, sid=s.sid)
        return answer["text"], answer["meta_info"]

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        body = {"text": s.text_, **sampling_body(sampling_params), "stream": True}
        self._refuse_parallel_sampling(body)
        return self._stream("gen_stream", body, sid=s.sid)

    def select(
        self, s: Any, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod | None = None
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise BadRequestError(f"select needs greedy decoding (temperature 0), got temperature={temperature}")
        if not choices:
            raise BadRequestError("select needs at least one choice")
        if choices_method is None:
            from sglang.lang.choices import token_length_normalized
            choices_method = token_length_normalized
        # 1. cache the shared prompt and learn its token count; the rest follow it to the same prefill server.
        first, route = self._execute_routed("select", {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}, sid=s.sid)
        sticky = route.prefill.url if route.prefill else None
        logprob_start_len = max(first["meta_info"]["prompt_tokens"] - 2, 0)
        scored = self._execute("select", {
            "text": [s.text_ + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": logprob_start_len,
        }, sid=s.sid, prefer_prefill=sticky)
        input_logprobs = [r["meta_info"]["input_token_logprobs"] for r in scored]
        output_logprobs = [r["meta_info"]["output_token_logprobs"] for r in scored]
        normalized = [compute_normalized_prompt_logprobs(lp) for lp in input_logprobs]
        for i, logprobs in enumerate(input_logprobs):
            # Token healing: drop the boundary token when the prompt already ended with it.
            if s.text_.endswith(logprobs[0][-1]):
                normalized[i] = (normalized[i] * len(logprobs) - logprobs[0][0]) / (len(logprobs) - 1)
                input_logprobs[i] = logprobs[1:]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ids = [[token[1] for token in logprobs] for logprobs in input_logprobs]
            # logprob_start_len=0: SGLang 0.5.23 returns no prompt logprobs by default, which
            # makes the stock RuntimeEndpoint's unconditional select fail with an IndexError.
            plain = self._execute("select", {
                "input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": 0,
            }, sid=s.sid, prefer_prefill=sticky)
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in plain]
            # SGLang 0.5.23 gives no logprob (None) for the first position of a range;
            # the unconditional methods subtract lists element-wise, so count it as 0.
            input_logprobs = [[[lp if lp is not None else 0.0, *rest] for lp, *rest in lps] for lps in input_logprobs]
        return choices_method(
            choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=input_logprobs,
            output_token_logprobs=output_logprobs, unconditional_token_logprobs=unconditional,
        )

    def commit_lazy_operations(self, s: Any) -> None:
        """Before ``fork``: prefill the shared text once so every branch hits the cache."""
        self._warm(s.text_, sid=s.sid)

    def cache_prefix(self, prefix_str: str) -> None:
        """``run_batch``'s shared prefix: warm the server that will serve the batch."""
        self._warm(prefix_str)

    def end_program(self, s: Any) -> None:
        """Abort legs left behind by a program whose executor has stopped.

        SGLang calls this as soon as the program *function* returns, while the
        executor thread may still be running the queued ``gen`` calls, and
        again from ``__del__``. Aborting then would cancel live work, so only
        the legs of an executor that has finished (normally or by an error)
        are aborted: orphans that would otherwise hold a server slot. Never raises.
        """
        for executor in s if isinstance(s, list) else [s]:
            if not getattr(executor, "is_finished", True) and getattr(executor, "use_thread", False):
                continue
            with self._inflight_lock:
                legs = self._inflight.pop(getattr(executor, "sid", None), set())
            for server, rid in legs:
                self._dispatcher.abort(server, [rid])

    def flush_cache(self, wait: float = 30.0) -> None:
        """Empty every server's radix cache (and the adapter's record of them).

        SGLang refuses to flush while requests run; each server is given up to
        ``wait`` seconds to drain first.
        """
        failures = []
        limits = Timeouts(connect=self.timeouts.connect, first_byte=wait + 30.0, total=wait + 30.0)
        for info in self._all_servers():
            try:
                answer = self._transport.request("POST", f"{info.url}/flush_cache?timeout={wait}", timeouts=limits)
                if not answer.ok:
                    failures.append(f"{info.url}: HTTP {answer.status} {answer.error_message()}")
            except PDError as exc:
                failures.append(f"{info.url}: {exc}")
        self._index.forget()
        if failures:
            raise ServerUnavailableError("flush_cache failed on " + "; ".join(failures) + " (retry when idle)")

    def get_server_info(self) -> dict[str, Any]:
        info = {}
        for server in self._all_servers():
            answer = self._transport.request("GET", f"{server.url}/server_info", timeouts=self.timeouts)
            info[server.url] = answer.body
        return info

    def shutdown(self) -> None:
        """Stop the health prober and close connections. The servers keep running."""
        self._health.close()
        self._dispatcher.close()
        self._transport.close()

    close = shutdown

    def __enter__(self) -> "PDBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----- native requests and introspection -----------------------------------

    def request(self, body: dict) -> Any:
        """Send a native SGLang ``/generate`` body through routing, pairing and retries.

        For tools that speak SGLang's HTTP API rather than the frontend
        language (benchmarks, token-level checks): the answer is the server's
        JSON (decode's, with prefill's prompt logprobs merged), including
        ``output_ids``. Streaming bodies are refused; use :meth:`request_stream`.
        """
        body = self._native_body(body, "request")
        if body.get("stream"):
            raise BadRequestError("request() does not stream; use request_stream() for a streaming body")
        return self._execute("native", body)

    def request_stream(self, body: dict) -> Iterator[dict]:
        """Stream a native SGLang ``/generate`` body: yields the decode server's SSE events.

        Each event is SGLang's own chunk (cumulative ``text``, ``meta_info``;
        the last one has ``finish_reason``). Failures before the first chunk
        are retried on another pair; after it, a break raises
        :class:`StreamInterruptedError`. Lazy: nothing is sent before the first
        ``next()``; closing the iterator early aborts both legs. Prompt
        logprobs are not merged from the prefill leg here (use :meth:`request`).

        Examples
        --------
        >>> for event in backend.request_stream({"text": "Hi", "sampling_params": {"max_new_tokens": 8}}):  # doctest: +SKIP
        ...     print(event["text"])
        """
        body = self._native_body(body, "request_stream")
        if isinstance(body.get("text"), list) or isinstance((body.get("input_ids") or [None])[0], list):
            raise BadRequestError("request_stream() streams one prompt; send a batch with request()")
        return self._stream("native_stream", {**body, "stream": True}, sid=None, raw_events=True)

    def _native_body(self, body: Any, caller: str) -> dict:
        """A copy of a native ``/generate`` body fit to send, or a BadRequestError naming ``caller``."""
        if not isinstance(body, dict) or not ("text" in body or "input_ids" in body):
            raise BadRequestError(f"{caller}() needs a /generate body with 'text' or 'input_ids'")
        body = {**body, "sampling_params": dict(body.get("sampling_params") or {})}
        self._refuse_parallel_sampling(body)
        return body


    def health(self) -> dict[str, Any]:
        """Rotation state per server: healthy, consecutive failures, last error."""
        return {url: vars(state) for url, state in self._health.snapshot().items()}

    def loads(self) -> dict[str, int]:
        """Requests this backend has in flight, per server."""
        return self._router.loads()

    # ----- sending ------------------------------------------------------------

    def _all_servers(self) -> list[ServerInfo]:
        return [s for servers in self.pools.values() for s in servers]

    def _probe(self, url: str) -> bool:
        try:
            probe = Timeouts(connect=1.0, first_byte=5.0, total=10.0)
            return self._transport.request("GET", f"{url}/health", timeouts=probe).ok
        except PDError:
            return False

    def _refuse_parallel_sampling(self, body: dict) -> None:
        if body["sampling_params"].get("n", 1) not in (None, 1) and self.pools["prefill"]:
            raise BadRequestError("n > 1 is not supported through PD; use s.fork(n) or run_batch instead")

    def _warm(self, text: str, sid: str | None = None) -> None:
        self._execute("warm", {"text": text, "sampling_params": {"max_new_tokens": 1}}, sid=sid)

    def _allocate_room(self, route: Route, count: int) -> int:
        """Fresh rooms for one attempt, on the prefill DP rank the route chose (if the server has ranks)."""
        return self._rooms.allocate(count, ranks=route.prefill.dp_ranks, rank=route.prefill_rank or 0)

    def _tracker(self, sid: str | None):
        if sid is None:
            return lambda server, rids, started: None

        def track(server: str, rids: list[str], started: bool) -> None:
            with self._inflight_lock:
                legs = self._inflight[sid]
                for rid in rids:
                    (legs.add if started else legs.discard)((server, rid))
                if not legs:
                    self._inflight.pop(sid, None)

        return track

    def _execute(self, kind: str, body: dict, *, sid: str | None = None, prefer_prefill: str | None = None) -> Any:
        return self._execute_routed(kind, body, sid=sid, prefer_prefill=prefer_prefill)[0]

    def _execute_routed(
        self, kind: str, body: dict, *, sid: str | None = None, prefer_prefill: str | None = None
    ) -> tuple[Any, Route]:
        """Send ``body`` with retries; returns the answer (decode's, merged) and the route that served it."""
        record = RequestRecord(kind=kind, attempts=0)
        started = time.monotonic()
        avoid: set[str] = set()
        track = self._tracker(sid)

        def attempt() -> tuple[Any, Route]:
            check_sampling(body)
            record.attempts += 1
            route = self._router.route(routing_text(body), avoid=avoid, prefer_prefill=prefer_prefill)
            _describe(record, route)
            try:
                with self._router.in_flight(route):
                    if route.mode == "pd":
                        room = self._allocate_room(route, batch_size(body) or 1)
                        prefill, decode = self._dispatcher.pair(route.target, body, room, track)
                        answer = merge_pd_answers(prefill.body, decode.body)
                        _timings(record, prefill, decode)
                    else:
                        only = self._dispatcher.single(route.colocated.url, body, track)
                        answer = only.body
                        record.ttft = None
                        record.decode_time = None
            except PDError as exc:
                self._blame(exc, avoid, record)
                raise
            for url in route.servers:
                self._health.record_success(url)
            self._router.learned(route, body["text"] if isinstance(body.get("text"), list) else None)
            return answer, route

        try:
            answer, route = self.retry.retrying()(attempt)
        except PDError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.total = time.monotonic() - started
            self.metrics.record(record)
            raise self._explain(exc) from exc
        record.total = time.monotonic() - started
        _count_tokens(record, answer)
        self.metrics.record(record)
        return answer, route

    def _explain(self, error: PDError) -> PDError:
        """The final error; a leg failure with its whole role down becomes NoHealthyServerError."""
        role = {PrefillFailedError: "prefill", DecodeFailedError: "decode"}.get(type(error))
        down = self._router.out_of_rotation(role) if role else None
        if down is None:
            return error
        return NoHealthyServerError(
            f"no {role} server is in rotation ({down}); the last attempt failed with: {error}. "
            "Check the servers' logs; they return to rotation once /health passes.",
            server=error.server, status=error.status,
        )

    def _blame(self, error: PDError, avoid: set[str], record: RequestRecord) -> None:
        if error.server is None or isinstance(error, BadRequestError):
            return
        avoid.add(error.server)
        record.failed_servers.append(error.server)
        self._health.record_failure(error.server, str(error), unreachable=error.unreachable)

    def _stream(self, kind: str, body: dict, *, sid: str | None, raw_events: bool = False) -> Iterator[Any]:
        """Retry until the first chunk arrives; after that a failure is a StreamInterruptedError.

        Yields ``(text delta, meta_info)`` for the frontend, or the server's
        events with ``raw_events``. A generator: nothing is sent (and no load
        counted) until the first ``next()``, so a stream never read holds no
        server slot.
        """
        record = RequestRecord(kind=kind, attempts=0)
        started = time.monotonic()
        avoid: set[str] = set()
        track = self._tracker(sid)

        def open_stream() -> tuple[Route, Any, Iterator[dict], Any, dict, ExitStack]:
            check_sampling(body)
            record.attempts += 1
            route = self._router.route(routing_text(body), avoid=avoid)
            _describe(record, route)
            # Count the request as load from now on: its prefill (until the first chunk)
            # is when other requests' routing most needs to see it.
            load = ExitStack()
            load.enter_context(self._router.in_flight(route))
            try:
                if route.mode == "pd":
                    room = self._allocate_room(route, 1)
                    prefill, events, abort = self._dispatcher.pair_stream(route.target, body, room, track)
                else:
                    prefill, abort = None, lambda: None
                    events = self._dispatcher.transport.stream(
                        f"{route.colocated.url}/generate", json_body=body, timeouts=self.timeouts,
                        deadline=time.monotonic() + self.timeouts.total,
                    )
                first = next(events)
            except StopIteration:
                load.close()
                raise ServerUnavailableError(f"{route.servers[-1]} ended the stream before any text", server=route.servers[-1])
            except PDError as exc:
                load.close()
                self._blame(exc, avoid, record)
                raise
            except BaseException:
                load.close()
                raise
            return route, prefill, events, abort, first, load

        try:
            route, prefill, events, abort, first, load = self.retry.retrying()(open_stream)
        except PDError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.total = time.monotonic() - started
            self.metrics.record(record)
            raise self._explain(exc) from exc
        yield from self._relay(record, started, route, prefill, events, abort, first, load, raw_events)

    def _relay(self, record, started, route, prefill, events, abort, first, load, raw_events) -> Iterator[Any]:
        """Yield text deltas; the server sends cumulative text in every chunk."""
        record.ttft = time.monotonic() - started
        sent, last = 0, first
        finished = False
        try:
            with load:
                for event in _chain(first, events):
                    last = event
                    text = event.get("text", "")
                    delta, sent = text[sent:], len(text)
                    yield event if raw_events else (delta, event.get("meta_info", {}))
                finished = True
        except PDError as exc:
            record.error = f"StreamInterruptedError: {exc}"
            raise StreamInterruptedError(
                f"stream broke after {sent} characters: {exc}. The text so far was delivered; rerun the request.",
                server=exc.server,
            ) from exc
        finally:
            if not finished:
                abort()
                events.close()
            record.total = time.monotonic() - started
            record.decode_time = record.total - record.ttft
            if prefill is not None and prefill.done() and prefill.exception() is None:
                record.prefill_latency = prefill.result().latency
            _count_tokens(record, last)
            self.metrics.record(record)
        if finished:
            for url in route.servers:
                self._health.record_success(url)
            self._router.learned(route)


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _as_list(role: str, given: Sequence[str] | str) -> list[str]:
    if isinstance(given, str):
        return [given]
    if given is None:
        return []
    try:
        return list(given)
    except TypeError:
        raise ConfigurationError(f"{role} must be a list of URLs, got {given!r}") from None


def _check_pools(urls: dict[str, list[str]]) -> None:
    if bool(urls["prefill"]) != bool(urls["decode"]):
        missing = "decode" if urls["prefill"] else "prefill"
        raise ConfigurationError(f"PD needs both prefill and decode servers; no {missing} server was given")
    if not any(urls.values()):
        raise ConfigurationError("PDBackend needs servers: prefill=[...] and decode=[...], and/or colocated=[...]")
    every = [u for role_urls in urls.values() for u in role_urls]
    duplicates = sorted({u for u in every if every.count(u) > 1})
    if duplicates:
        raise ConfigurationError(f"servers listed more than once: {duplicates}")


def _common_model(pools: dict[str, list[ServerInfo]]) -> str:
    models = {s.model_path for servers in pools.values() for s in servers}
    if len(models) != 1:
        detail = ", ".join(f"{s.url}={s.model_path}" for servers in pools.values() for s in servers)
        raise ConfigurationError(f"all servers must serve one model; found {detail}")
    return models.pop()


def _describe(record: RequestRecord, route: Route) -> None:
    record.mode = route.mode
    record.route_reason = route.reason
    record.prefill = route.prefill.url if route.prefill else None
    record.decode = route.decode.url if route.decode else None
    record.colocated = route.colocated.url if route.colocated else None


def _timings(record: RequestRecord, prefill: LegOutcome, decode: LegOutcome) -> None:
    record.prefill_latency = prefill.latency
    record.ttft = prefill.latency
    record.decode_time = max(decode.latency - prefill.latency, 0.0)


def _count_tokens(record: RequestRecord, answer: Any) -> None:
    for item in answer if isinstance(answer, list) else [answer]:
        meta = item.get("meta_info", {}) if isinstance(item, dict) else {}
        record.prompt_tokens += meta.get("prompt_tokens", 0) or 0
        record.completion_tokens += meta.get("completion_tokens", 0) or 0
        record.cached_tokens += meta.get("cached_tokens", 0) or 0
