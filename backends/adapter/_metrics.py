"""What every request cost, kept per request and in aggregate.

Each frontend call that reaches a server leaves one :class:`RequestRecord`.
:class:`Metrics` keeps the most recent records (bounded), running totals, and
optionally mirrors them into a ``prometheus_client`` registry of the caller's
(never the global one: two adapters in one process must not collide).
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["RequestRecord", "Metrics"]


@dataclass
class RequestRecord:
    """One request as the adapter saw it; times in seconds.

    ``ttft`` is the time to the first token: the first streamed chunk, or for
    a non-streamed pair the prefill leg's answer (SGLang answers the prefill
    leg once the KV has reached decode, right before the first token).
    ``prefix_wait`` is the part of it spent waiting for another request of
    this client to finish prefilling the prefix this one reuses
    (``Router.await_prefix``). ``hedged``: a second pair was sent because the
    prefill leg was late (``HedgePolicy``); ``hedge_won``: that pair answered first.
    """

    kind: str
    mode: str = "pd"
    prefill: str | None = None
    decode: str | None = None
    colocated: str | None = None
    route_reason: str = ""
    route_rule: str = ""
    attempts: int = 1
    ttft: float | None = None
    prefill_latency: float | None = None
    decode_time: float | None = None
    total: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    failed_servers: list[str] = field(default_factory=list)
    prefix_wait: float = 0.0
    hedged: bool = False
    hedge_won: bool = False

    @property
    def time_per_output_token(self) -> float | None:
        if self.decode_time is None or self.completion_tokens < 2:
            return None
        return self.decode_time / (self.completion_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time_per_output_token": self.time_per_output_token}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


class Metrics:
    """Thread-safe store of request records and totals.

    Parameters
    ----------
    keep
        How many recent records to keep for :meth:`summary` percentiles.
    registry
        A ``prometheus_client.CollectorRegistry`` to export into, or ``None``.
    """

    def __init__(self, keep: int = 10_000, registry: Any = None) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=keep)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._prometheus = _PrometheusMirror(registry) if registry is not None else None

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._counts["requests"] += 1
            self._counts["errors"] += record.error is not None
            self._counts["retries"] += _retries(record)
            self._counts["hedged"] += record.hedged
            self._counts["hedges_won"] += record.hedge_won
            self._counts["prompt_tokens"] += record.prompt_tokens
            self._counts["cached_tokens"] += record.cached_tokens
            self._counts["completion_tokens"] += record.completion_tokens
            self._counts[f"route:{record.mode}"] += 1
        if self._prometheus is not None:
            self._prometheus.observe(record)

    def watch(self, cache_status: Status, transfer_stats: Status) -> None:
        """Export the client's cache and KV-transfer status as gauges at each scrape (no-op without a registry).

        ``cache_status()`` is ``PDClient.cache_status``; ``transfer_stats()``
        the ``"servers"`` of ``PDClient.transfer_stats`` (read from the servers when scraped).
        """
        if self._prometheus is not None:
            self._prometheus.registry.register(_StatusCollector(cache_status, "cache", _CACHE_GAUGES))
            self._prometheus.registry.register(_StatusCollector(transfer_stats, "server", _TRANSFER_GAUGES))

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._counts.clear()

    def summary(self) -> dict[str, Any]:
        """Totals, hit ratio, latency percentiles and requests per server."""
        with self._lock:
            records = list(self._records)
            counts = dict(self._counts)
        prompt = counts.get("prompt_tokens", 0)
        pick = lambda name: [getattr(r, name) for r in records if getattr(r, name) is not None]  # noqa: E731
        return {
            **counts,
            "cache_hit_ratio": counts.get("cached_tokens", 0) / prompt if prompt else 0.0,
            "ttft": _percentiles(pick("ttft")),
            "prefill_latency": _percentiles(pick("prefill_latency")),
            "decode_time": _percentiles(pick("decode_time")),
            "total": _percentiles(pick("total")),
            "time_per_output_token": _percentiles(
                [r.time_per_output_token for r in records if r.time_per_output_token is not None]
            ),
            "by_server": dict(Counter(s for r in records for s in (r.prefill, r.decode, r.colocated) if s)),
        }


def _retries(record: RequestRecord) -> int:
    """Attempts after a failure: not the first (0 attempts: refused before sending), nor a hedge."""
    return max(record.attempts - 1 - record.hedged, 0)


class _PrometheusMirror:
    """Counters and histograms named ``sgl_pd_*`` in the caller's registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter as PCounter
        from prometheus_client import Histogram

        self.registry = registry
        self.requests = PCounter("sgl_pd_requests", "Requests by route mode and outcome", ["mode", "outcome"], registry=registry)
        self.retries = PCounter("sgl_pd_retries", "Extra attempts after a failure", registry=registry)
        self.hedges = PCounter("sgl_pd_hedges", "Second pairs sent for a late prefill, by whether they won",
                               ["outcome"], registry=registry)
        self.tokens = PCounter("sgl_pd_tokens", "Tokens by kind", ["kind"], registry=registry)
        self.server_requests = PCounter("sgl_pd_server_requests", "Requests per server and role", ["server", "role"], registry=registry)
        self.ttft = Histogram("sgl_pd_ttft_seconds", "Time to first token", registry=registry)
        self.total = Histogram("sgl_pd_request_seconds", "End-to-end request time", registry=registry)
        self.prefill = Histogram("sgl_pd_prefill_leg_seconds", "Prefill leg latency", registry=registry)

    def observe(self, record: RequestRecord) -> None:
        self.requests.labels(record.mode, "error" if record.error else "ok").inc()
        self.retries.inc(_retries(record))
        if record.hedged:
            self.hedges.labels("won" if record.hedge_won else "lost").inc()
        self.tokens.labels("prompt").inc(record.prompt_tokens)
        self.tokens.labels("cached").inc(record.cached_tokens)
        self.tokens.labels("completion").inc(record.completion_tokens)
        for role in ("prefill", "decode", "colocated"):
            server = getattr(record, role)
            if server:
                self.server_requests.labels(server, role).inc()
        self.total.observe(record.total)
        if record.ttft is not None:
            self.ttft.observe(record.ttft)
        if record.prefill_latency is not None:
            self.prefill.observe(record.prefill_latency)


Status = Callable[[], dict[str, dict[str, Any] | None]]

_CACHE_GAUGES = (("blocks", "sgl_pd_cache_indexed_blocks", "Blocks indexed from the server's KV events"),
                 ("event_lag_s", "sgl_pd_cache_event_lag_seconds", "Publish-to-receipt delay of the last event batch"),
                 ("last_event_age_s", "sgl_pd_cache_last_event_age_seconds", "Seconds since the last live event batch"))
_TRANSFER_GAUGES = (("transfers", "sgl_pd_kv_transfers", "KV transfers the server measured since it started"),
                    ("mean_latency_ms", "sgl_pd_kv_transfer_mean_latency_ms", "Mean KV transfer latency (ms)"),
                    ("mean_speed_gb_s", "sgl_pd_kv_transfer_mean_speed_gb_s", "Mean KV transfer speed (GB/s)"),
                    ("transfer_failed", "sgl_pd_kv_transfer_failed", "Requests whose KV transfer failed"),
                    ("bootstrap_failed", "sgl_pd_kv_bootstrap_failed", "Requests whose bootstrap handshake failed"))


class _StatusCollector:
    """Gauges labelled by name (a cache, a server), read from ``status()`` when scraped."""

    def __init__(self, status: Status, label: str, gauges: tuple[tuple[str, str, str], ...]) -> None:
        self._status, self._label, self._gauges = status, label, gauges

    def describe(self) -> list:
        return []  # unchecked: the names are known only at scrape time

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        status = self._status()
        for key, name, doc in self._gauges:
            family = GaugeMetricFamily(name, doc, labels=[self._label])
            for who, fields in status.items():
                if fields and fields.get(key) is not None:
                    family.add_metric([who], float(fields[key]))
            yield family
