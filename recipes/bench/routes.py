"""The ways one request reaches the servers: the adapter, SGLang's routers, or one server.

Why one interface: the runner sends the same prompts, in the same order, through
every route, and each route must time them the same way. A route is opened
(a router process started, an adapter built), sent requests from many threads,
then closed. Routers as processes: :mod:`recipes.bench.router_process`.

TTFT: with ``stream=True`` (the default) every route streams and TTFT is the
client-side time to the first SSE chunk (SGLang sends it with the first
token). The adapter streams the same body through ``PDBackend.request_stream``.
With ``stream=False`` the router routes have no TTFT and the adapter's comes
from its metrics: the prefill leg's latency, which SGLang answers once the KV
reached decode.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sglang.lang.ir import SglSamplingParams

from backends import HttpxTransport, PDClient, PDError, RoundRobin, Timeouts, sampling_body

STREAM_TTFT = "client time to first SSE chunk (stream=true)"
_LIMITS = Timeouts(connect=5.0, first_byte=600.0, total=600.0)


@dataclass
class Outcome:
    """What one request returned: final text and meta_info, client-side times in seconds."""

    text: str = ""
    meta: dict | None = None
    ttft: float | None = None
    e2e: float = 0.0
    error: str | None = None


def request_body(prompt: str, params: SglSamplingParams, stream: bool) -> dict:
    """The ``/generate`` body every route sends (the adapter builds the same one itself)."""
    body = {"text": prompt, **sampling_body(params)}
    if stream:
        body["stream"] = True
    return body


class HttpRoute:
    """Plain ``/generate`` calls to one URL: a router in front of PD servers, or one colocated server.

    Sent over the library's own transport (the same pooled httpx client and
    SSE parsing the adapter uses), so routes differ only in where requests go.
    """

    kind = "http"

    def __init__(self, name: str, url: str, max_connections: int = 256) -> None:
        self.name = name
        self.url = url
        self._max_connections = max_connections
        self._transport: HttpxTransport | None = None

    def ttft_method(self, stream: bool) -> str:
        return STREAM_TTFT if stream else "not measured (non-streamed; only the adapter can time its prefill leg)"

    def open(self) -> None:
        self._transport = HttpxTransport(max_connections=self._max_connections)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def send(self, prompt: str, params: SglSamplingParams, stream: bool) -> Outcome:
        body = request_body(prompt, params, stream)
        started = time.monotonic()
        outcome = Outcome()
        try:
            if stream:
                for event in self._transport.stream(f"{self.url}/generate", json_body=body, timeouts=_LIMITS):
                    if outcome.ttft is None:
                        outcome.ttft = time.monotonic() - started
                    outcome.text, outcome.meta = event.get("text", ""), event.get("meta_info", {})
                if outcome.meta is None:
                    outcome.error = "stream ended without any chunk"
            else:
                answer = self._transport.request("POST", f"{self.url}/generate", json_body=body, timeouts=_LIMITS)
                if not answer.ok:
                    outcome.error = f"HTTP {answer.status}: {answer.error_message()[:300]}"
                else:
                    outcome.text, outcome.meta = answer.body.get("text", ""), answer.body.get("meta_info", {})
        except PDError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.e2e = time.monotonic() - started
        return outcome


class AdapterRoute:
    """A ``PDClient`` built for this route only (cold routing state), with the given prefill policy.

    ``kv_events=False`` makes it route on its approximate record of what it sent,
    even where the servers publish KV events (the adapter before events).
    """

    kind = "adapter"

    def __init__(self, name: str, prefill: list[str], decode: list[str], policy: str, kv_events: bool = True) -> None:
        self.name = name
        self.prefill, self.decode, self.policy, self.kv_events = prefill, decode, policy, kv_events
        self.client: PDClient | None = None

    def ttft_method(self, stream: bool) -> str:
        if stream:
            return STREAM_TTFT + " via PDClient.request_stream"
        return "adapter metrics: prefill-leg latency (answered once the KV reached decode)"

    def open(self) -> None:
        policy = RoundRobin() if self.policy == "round_robin" else None  # None: the default PrefillCost()
        self.client = PDClient(prefill=self.prefill, decode=self.decode, prefill_policy=policy, timeouts=_LIMITS,
                               kv_events=self.kv_events)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def send(self, prompt: str, params: SglSamplingParams, stream: bool) -> Outcome:
        started = time.monotonic()
        outcome = Outcome()
        try:
            if stream:
                for event in self.client.request_stream(request_body(prompt, params, stream=True)):
                    if outcome.ttft is None:
                        outcome.ttft = time.monotonic() - started
                    outcome.text, outcome.meta = event.get("text", ""), event.get("meta_info", {})
            else:
                answer = self.client.request(request_body(prompt, params, stream=False))
                outcome.text, outcome.meta = answer["text"], answer["meta_info"]
        except Exception as exc:  # noqa: BLE001 - any failure is this request's error, reported
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.e2e = time.monotonic() - started
        return outcome

    def diagnostics(self) -> dict[str, Any]:
        """Why each request went where it went (``route_rule``), from the adapter's own metrics."""
        records = self.client.metrics.records() if self.client else []
        reasons = Counter(r.route_rule for r in records)
        return {
            "route_reasons": dict(reasons),
            "prefill_servers": dict(Counter(r.prefill for r in records if r.prefill)),
            "metrics_ttft": [r.ttft for r in records if r.ttft is not None and r.error is None],
            "records": [r.as_dict() for r in records],
        }
