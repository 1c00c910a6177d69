"""``PDClient``: SGLang's native ``/generate`` API over pools of prefill, decode and colocated servers.

The adapter's core without the frontend language: it discovers the servers,
routes each request (prefill where it costs least given what each radix cache
holds, least-loaded decode), sends it as a
PD pair with SGLang's bootstrap protocol (or to a colocated server), retries
on another pair, keeps servers in or out of rotation, and measures every
request. :class:`~backends.adapter.PDBackend` adapts SGLang's frontend
language on top of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from backends.adapter._dispatch import Dispatcher
from backends.adapter._engine import Delivered, Engine
from backends.adapter._canary import Canary
from backends.adapter._health import HealthTracker, refuses_connections
from backends.adapter._hedge import HedgePolicy
from backends.adapter._inflight import InFlight
from backends.adapter._kv_routing import EventIndex
from backends.adapter._metrics import Metrics
from backends.adapter._payloads import check_sampling
from backends.adapter._poison import ServerLimits, check_generate_body
from backends.adapter._policies import LeastLoaded, Policy, PrefillCost
from backends.adapter._prefix_index import PrefixIndex
from backends.adapter._retry import RetryPolicy
from backends.adapter._router import Router
from backends.adapter._servers import ServerInfo, discover_pools, rank_key
from backends.adapter._transfer import read_transfer_stats, total
from backends.adapter._transport import HttpxTransport, Timeouts, Transport
from backends.errors import BadRequestError, ConfigurationError, PDError, ServerUnavailableError

__all__ = ["PDClient"]


class PDClient:
    """Sends SGLang ``/generate`` bodies to prefill/decode pairs or colocated servers.

    Parameters
    ----------
    prefill, decode : sequence of str
        URLs of SGLang servers started with ``--disaggregation-mode prefill``
        / ``decode``. Both empty, or both given.
    colocated : sequence of str
        URLs of ordinary servers. Alone, they make this a load balancer for
        plain deployments; next to a PD pool they take short prompts
        (``colocated_below_tokens``) and serve while no PD pair is in rotation.
    prefill_policy, decode_policy, colocated_policy, prefill_rank_policy : Policy, optional
        Server choice (:mod:`backends.adapter`). Defaults: ``PrefillCost()``
        (least prefill work: uncached tokens there plus the work queued there)
        for prefill, colocated and a DP prefill server's ranks;
        ``LeastLoaded()`` for decode.
    kv_events : bool
        Route on the servers' own KV cache events and published load where
        they publish them (``/server_info`` has ``kv_events``; the launcher
        turns them on): prompts are tokenized here with the model's tokenizer
        and matched in tokens against what each radix cache holds, shared by
        every client. ``False``, or servers that publish nothing: an
        approximate record of what this client sent, in characters.
    colocated_below_tokens : int, optional
        Conditional disaggregation: prompts with fewer uncached tokens than
        this go to a colocated server. ``None`` (default) disables it.
    timeouts : Timeouts, optional
        Limits per leg (seconds).
    retry : RetryPolicy, optional
        Retry bounds per request.
    transport : Transport, optional
        The network seam; :class:`backends.testing.MockTransport` in tests.
    metrics_registry : prometheus_client.CollectorRegistry, optional
        Where to export metrics.
    failure_threshold, probe_interval, breaker_cooldown : int, float, float
        Circuit breaker: consecutive errors that take a server out of
        rotation, seconds between health probes while it is out, seconds
        before the first probe of a server whose breaker opened.
    max_pairs : int
        Requests in flight at once through this client.
    hedge : HedgePolicy, optional
        Send a second pair when a PD request's prefill is late (off by default).

    Raises
    ------
    ConfigurationError
        Bad server lists, a server unreachable or of another role than listed,
        servers of different models, or a bad option.
    """

    def __init__(
        self,
        prefill: Sequence[str] = (),
        decode: Sequence[str] = (),
        colocated: Sequence[str] = (),
        *,
        prefill_policy: Policy | None = None,
        decode_policy: Policy | None = None,
        colocated_policy: Policy | None = None,
        prefill_rank_policy: Policy | None = None,
        colocated_below_tokens: int | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        transport: Transport | None = None,
        metrics_registry: Any = None,
        failure_threshold: int = 3,
        probe_interval: float = 1.0,
        breaker_cooldown: float = 10.0,
        max_pairs: int = 256,
        kv_events: bool = True,
        hedge: HedgePolicy | None = None,
    ) -> None:
        if colocated_below_tokens is not None and colocated_below_tokens < 0:
            raise ConfigurationError(f"colocated_below_tokens must be >= 0 or None, got {colocated_below_tokens}")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._transport = transport or HttpxTransport(max_connections=2 * max_pairs)
        discovery = Timeouts(connect=self.timeouts.connect, first_byte=30.0, total=30.0)
        try:
            self.pools: dict[str, list[ServerInfo]] = discover_pools(
                self._transport, {"prefill": prefill, "decode": decode, "colocated": colocated}, discovery)
        except BaseException:
            self._transport.close()
            raise
        self.model_path = next(s.model_path for servers in self.pools.values() for s in servers)
        self._limits = ServerLimits(vocab_size=_vocab_size(self.model_path),
                                    disaggregation_mode="prefill" if self.pools["prefill"] else "null",
                                    dp_size=max((s.dp_ranks for s in self.pools["prefill"]), default=1))
        self.metrics, self._inflight = Metrics(registry=metrics_registry), InFlight()
        try:
            self._events = EventIndex(self.pools["prefill"] + self.pools["colocated"]) if kv_events else None
        except BaseException:
            self._transport.close()
            raise
        decodes = [s.url for s in self.pools["decode"]]
        self._canary = Canary(self._transport, self.pools, lambda: self._health.available(decodes))
        self._health = HealthTracker(
            [s.url for s in self.servers], self._canary, failure_threshold=failure_threshold,
            probe_interval=probe_interval, breaker_cooldown=breaker_cooldown,
            on_recover=lambda url: self._router.forget(url),
        )
        self._router = Router(
            self.pools, self._health, PrefixIndex(), self._inflight,
            {"prefill": prefill_policy or PrefillCost(), "decode": decode_policy or LeastLoaded(),
             "colocated": colocated_policy or PrefillCost(), "prefill_rank": prefill_rank_policy or PrefillCost()},
            colocated_below_tokens=colocated_below_tokens, events=self._events,
        )
        self.metrics.watch(self.cache_status, lambda: self.transfer_stats()["servers"])
        self._dispatcher = Dispatcher(self._transport, self.timeouts, max_pairs=max_pairs)
        self._engine = Engine(self._router, self._dispatcher, self._inflight, self._health, self.retry, self.metrics,
                              died=lambda url: refuses_connections(self._transport, url), hedge=hedge)

    @property
    def servers(self) -> list[ServerInfo]:
        """Every server, prefill first, then decode, then colocated."""
        return [s for servers in self.pools.values() for s in servers]

    # ----- requests -------------------------------------------------------------

    def request(self, body: dict) -> Any:
        """Send a native SGLang ``/generate`` body through routing, pairing and retries.

        Parameters
        ----------
        body : dict
            What SGLang's ``/generate`` accepts: ``text`` or ``input_ids``
            (one prompt, or a list for a batch), ``sampling_params`` (a dict,
            or a list of one dict per item), logprob options. Not ``stream``
            (use :meth:`request_stream`).

        Returns
        -------
        dict or list of dict
            The server's JSON: decode's answer with prefill's prompt logprobs
            merged in front, ``output_ids`` included; a list for a batch.

        Raises
        ------
        BadRequestError
            Refused before sending, or by a server (4xx; never retried).
        NoHealthyServerError, PrefillFailedError, DecodeFailedError
            Every attempt failed; names the server.
        RequestTimeoutError
            A leg outlived its timeout on the last attempt.
        """
        body = self._native_body(body, "request")
        if body.get("stream"):
            raise BadRequestError("request() does not stream; use request_stream() for a streaming body")
        return self.send("native", body).answer

    def request_stream(self, body: dict) -> Iterator[dict]:
        """Stream a native ``/generate`` body: yields the serving server's SSE events.

        Each event is SGLang's own chunk (cumulative ``text``, ``meta_info``;
        the last one has ``finish_reason``). Failures before the first chunk
        are retried on another pair; after it, a break raises
        :class:`~backends.errors.StreamInterruptedError`. Lazy: nothing is
        sent before the first ``next()``; closing the iterator early aborts
        every leg (PD or colocated). Through PD with ``return_logprob``, each
        chunk gets the prefill leg's prompt logprobs (decode never saw the
        prompt), so the first chunk waits for that leg's answer.

        Raises
        ------
        BadRequestError
            A batch (streams carry one prompt), or refused as in :meth:`request`.
        PDError
            As :meth:`request`, before the first event; ``StreamInterruptedError`` after it.

        Examples
        --------
        >>> for event in client.request_stream({"text": "Hi", "sampling_params": {"max_new_tokens": 8}}):  # doctest: +SKIP
        ...     print(event["text"])
        """
        body = self._native_body(body, "request_stream")
        if isinstance(body.get("text"), list) or isinstance((body.get("input_ids") or [None])[0], list):
            raise BadRequestError("request_stream() streams one prompt; send a batch with request()")
        return self.stream("native_stream", {**body, "stream": True})

    def send(self, kind: str, body: dict, *, program: str | None = None,
             prefer_prefill: str | None = None) -> Delivered:
        """The engine's plain path, for adapters built on this client (the frontend's ``PDBackend``).

        ``kind`` labels the request in metrics; ``program`` files its legs
        for :meth:`abort_program`; ``prefer_prefill`` keeps it on a prefill
        server chosen before while that server is usable. The body is checked
        once before any attempt. Returns the answer and the route that served
        it; raises as :meth:`request`.
        """
        return self._engine.send(kind, body, program=program, prefer_prefill=prefer_prefill, check=self._check)

    def stream(self, kind: str, body: dict, *, program: str | None = None) -> Iterator[dict]:
        """The engine's streamed path (see :meth:`send`); yields raw SSE events."""
        return self._engine.stream(kind, body, program=program, check=self._check)

    def abort_program(self, program: str) -> None:
        """Abort (``/abort_request``) every leg of ``program`` still on the wire. Never raises."""
        for server, rid in self._inflight.take_legs(program):
            self._dispatcher.abort(server, [rid])

    def _native_body(self, body: Any, caller: str) -> dict:
        """A copy of a native ``/generate`` body fit to send, or a BadRequestError naming ``caller``."""
        if not isinstance(body, dict) or not ("text" in body or "input_ids" in body):
            raise BadRequestError(f"{caller}() needs a /generate body with 'text' or 'input_ids'")
        params = body.get("sampling_params")
        params = [dict(p) for p in params] if isinstance(params, list) else dict(params or {})
        return {**body, "sampling_params": params}

    def _check(self, body: dict) -> None:
        """Refuse what no server can serve, and what SGLang accepts but cannot survive (:mod:`._poison`)."""
        check_sampling(body)
        check_generate_body(body, self._limits)

    # ----- servers --------------------------------------------------------------

    def flush_cache(self, wait: float = 30.0) -> None:
        """Empty every server's radix cache (and this client's record of them).

        SGLang refuses to flush while requests run; each server is given up to
        ``wait`` seconds to drain first.

        Raises
        ------
        ServerUnavailableError
            A server still refused (or could not be reached); names each.
        """
        failures = []
        limits = Timeouts(connect=self.timeouts.connect, first_byte=wait + 30.0, total=wait + 30.0)
        for info in self.servers:
            try:
                answer = self._transport.request("POST", f"{info.url}/flush_cache?timeout={wait}", timeouts=limits)
                if not answer.ok:
                    failures.append(f"{info.url}: HTTP {answer.status} {answer.error_message()}")
            except PDError as exc:
                failures.append(f"{info.url}: {exc}")
            self._router.forget(info.url)
        if failures:
            raise ServerUnavailableError("flush_cache failed on " + "; ".join(failures) + " (retry when idle)")

    def health(self) -> dict[str, dict[str, Any]]:
        """Rotation state per server URL: ``healthy``, ``consecutive_failures``, ``last_error``, ..."""
        return {url: vars(state) for url, state in self._health.snapshot().items()}

    def loads(self) -> dict[str, int]:
        """Requests this client has in flight, per server (and prefill DP rank, as ``URL#dpR``)."""
        return self._inflight.loads()

    def cache_status(self) -> dict[str, dict[str, Any]]:
        """What routing knows of each radix cache (server, or DP rank ``URL#dpR``).

        Per cache: ``index`` (``"events"`` when its server publishes KV
        events, else ``"approximate"``), ``blocks`` indexed from events,
        ``event_lag_s`` (publish to receipt), ``last_event_age_s``, ``load_age_s``,
        replays, resets, gaps and errors of its event stream, and
        ``approximate_keys`` (this client's record of what it sent there).
        """
        status: dict[str, dict[str, Any]] = {}
        events = self._events.stats() if self._events is not None else {}
        for info in self.pools["prefill"] + self.pools["colocated"]:
            names = [info.url] + [rank_key(info.url, r) for r in range(info.dp_ranks) if info.dp_ranks > 1]
            for name in names:
                stream = events.get(name)
                if stream is None and name == info.url and info.dp_ranks > 1:
                    continue  # a multi-rank server's caches are its ranks
                status[name] = {"index": "events" if stream is not None else "approximate",
                                "approximate_keys": self._router.index.size(name), **(stream or {})}
        return status

    def server_info(self) -> dict[str, Any]:
        """Each server's ``/server_info`` JSON, by URL (raises a ``PDError`` for an unreachable one)."""
        return {s.url: self._transport.request("GET", f"{s.url}/server_info", timeouts=self.timeouts).body
                for s in self.servers}

    def transfer_stats(self) -> dict[str, Any]:
        """KV transfer overhead as the PD servers measure it (``--enable-metrics``, the launcher's default).

        ``{"servers": {url: stats or None}, "all": stats}``, stats as ``TransferStats.as_dict``.
        """
        per = read_transfer_stats(self._transport, [s.url for s in self.pools["prefill"] + self.pools["decode"]])
        return {"servers": {u: s.as_dict() if s else None for u, s in per.items()}, "all": total(per.values()).as_dict()}

    def close(self) -> None:
        """Stop the health prober, the KV-event thread and the leg pool, close connections.

        The servers keep running.
        """
        self._health.close()
        if self._events is not None:
            self._events.close()
        self._engine.close()
        self._canary.close()
        self._dispatcher.close()
        self._transport.close()

    def __enter__(self) -> "PDClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vocab_size(model_path: str) -> int | None:
    """The model's vocabulary from its local ``config.json``; ``None`` (checks that need it skipped) otherwise."""
    try:
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if isinstance(size, int) else None
