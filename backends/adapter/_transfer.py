"""KV transfer overhead, as the servers measure it: latency, speed, failed transfers and bootstraps.

The hand-off between a prefill and a decode server is invisible from the
client: the prefill leg's answer includes it, the decode leg waits on it.
SGLang measures it on the prefill server per request and exports it on
``/metrics`` when started with ``--enable-metrics`` (the launcher's default):
histograms ``sglang:kv_transfer_latency_ms`` and
``sglang:kv_transfer_speed_gb_s``, counters
``sglang:num_bootstrap_failed_reqs_total`` and
``sglang:num_transfer_failed_reqs_total`` (``observability/metrics_collector.py``;
observed in ``disaggregation/prefill.py`` when a transfer finishes, and
failures on both roles). This module reads them, with
``prometheus_client``'s own parser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from prometheus_client.parser import text_string_to_metric_families

from backends.adapter._transport import Timeouts, Transport
from backends.errors import PDError

__all__ = ["TransferStats", "read_transfer_stats", "total"]

_SCRAPE = Timeouts(connect=1.0, first_byte=3.0, total=3.0)


@dataclass(frozen=True)
class TransferStats:
    """One server's KV transfers since it started (a prefill server sends, a decode server receives).

    Attributes
    ----------
    transfers
        Transfers measured (prefill servers; 0 on decode servers).
    latency_ms_total, speed_gb_s_total
        Sums over those transfers, in ms and GB/s; :attr:`mean_latency_ms`
        and :attr:`mean_speed_gb_s` divide them.
    bootstrap_failed, transfer_failed
        Requests whose bootstrap handshake or KV transfer failed on this server.
    """

    transfers: int = 0
    latency_ms_total: float = 0.0
    speed_gb_s_total: float = 0.0
    bootstrap_failed: int = 0
    transfer_failed: int = 0

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_ms_total / self.transfers if self.transfers else None

    @property
    def mean_speed_gb_s(self) -> float | None:
        return self.speed_gb_s_total / self.transfers if self.transfers else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_latency_ms": self.mean_latency_ms, "mean_speed_gb_s": self.mean_speed_gb_s}


_SAMPLES = {  # sample name -> field, summed over every label set (TP ranks, models)
    "sglang:kv_transfer_latency_ms_count": "transfers",
    "sglang:kv_transfer_latency_ms_sum": "latency_ms_total",
    "sglang:kv_transfer_speed_gb_s_sum": "speed_gb_s_total",
    "sglang:num_bootstrap_failed_reqs_total": "bootstrap_failed",
    "sglang:num_transfer_failed_reqs_total": "transfer_failed",
}


def parse_transfer_stats(text: str) -> TransferStats:
    """The transfer figures in one ``/metrics`` page (Prometheus text format)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _SAMPLES.get(sample.name)
            if field is not None:
                found[field] = found.get(field, 0.0) + sample.value
    return TransferStats(transfers=int(found.get("transfers", 0)), latency_ms_total=found.get("latency_ms_total", 0.0),
                         speed_gb_s_total=found.get("speed_gb_s_total", 0.0),
                         bootstrap_failed=int(found.get("bootstrap_failed", 0)),
                         transfer_failed=int(found.get("transfer_failed", 0)))


def read_transfer_stats(transport: Transport, urls: Iterable[str]) -> dict[str, TransferStats | None]:
    """Each server's :class:`TransferStats`; ``None`` for one that is down or exports no metrics."""
    stats: dict[str, TransferStats | None] = {}
    for url in urls:
        try:
            response = transport.request("GET", f"{url}/metrics", timeouts=_SCRAPE)
        except PDError:
            stats[url] = None
            continue
        stats[url] = parse_transfer_stats(response.body) if isinstance(response.body, str) and response.ok else None
    return stats


def total(stats: Iterable[TransferStats | None]) -> TransferStats:
    """The sum over servers (those without figures left out)."""
    known = [s for s in stats if s is not None]
    return TransferStats(*(sum(getattr(s, f) for s in known) for f in
                           ("transfers", "latency_ms_total", "speed_gb_s_total", "bootstrap_failed", "transfer_failed")))
