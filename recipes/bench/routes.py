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

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from sglang.lang.ir import SglSamplingParams

from backends import PDBackend, RoundRobin, Timeouts
from backends.payloads import sampling_body

STREAM_TTFT = "client time to first SSE chunk (stream=true)"


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
    """Plain ``/generate`` calls to one URL: a router in front of PD servers, or one colocated server."""

    kind = "http"

    def __init__(self, name: str, url: str, max_connections: int = 256) -> None:
        self.name = name
        self.url = url
        self._max_connections = max_connections
        self._client: httpx.Client | None = None

    def ttft_method(self, stream: bool) -> str:
        return STREAM_TTFT if stream else "not measured (non-streamed; only the adapter can time its prefill leg)"

    def open(self) -> None:
        limits = httpx.Limits(max_connections=self._max_connections, max_keepalive_connections=self._max_connections)
        self._client = httpx.Client(limits=limits, timeout=httpx.Timeout(600.0, connect=5.0), trust_env=False)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def send(self, prompt: str, params: SglSamplingParams, stream: bool) -> Outcome:
        body = request_body(prompt, params, stream)
        started = time.monotonic()
        outcome = Outcome()
        try:
            if stream:
                self._stream(body, started, outcome)
            else:
                answer = self._client.post(f"{self.url}/generate", json=body)
                if answer.status_code != 200:
                    outcome.error = f"HTTP {answer.status_code}: {answer.text[:300]}"
                else:
                    data = answer.json()
                    outcome.text, outcome.meta = data.get("text", ""), data.get("meta_info", {})
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.e2e = time.monotonic() - started
        return outcome

    def _stream(self, body: dict, started: float, outcome: Outcome) -> None:
        with self._client.stream("POST", f"{self.url}/generate", json=body) as answer:
            if answer.status_code != 200:
                outcome.error = f"HTTP {answer.status_code}: {answer.read().decode(errors='replace')[:300]}"
                return
            for line in answer.iter_lines():
                if not line.startswith("data:") or line[5:].strip() in ("", "[DONE]"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    outcome.error = f"in-band error: {event['error']}"
                    return
                if outcome.ttft is None:
                    outcome.ttft = time.monotonic() - started
                outcome.text, outcome.meta = event.get("text", ""), event.get("meta_info", {})
        if outcome.meta is None:
            outcome.error = "stream ended without any chunk"


class AdapterRoute:
    """``PDBackend`` built for this route only (cold prefix index), with the given prefill policy."""

    kind = "adapter"

    def __init__(self, name: str, prefill: list[str], decode: list[str], policy: str) -> None:
        self.name = name
        self.prefill, self.decode, self.policy = prefill, decode, policy
        self.backend: PDBackend | None = None

    def ttft_method(self, stream: bool) -> str:
        if stream:
            return STREAM_TTFT + " via PDBackend.request_stream"
        return "adapter metrics: prefill-leg latency (answered once the KV reached decode)"

    def open(self) -> None:
        policy = RoundRobin() if self.policy == "round_robin" else None  # None: the default CacheAware
        self.backend = PDBackend(prefill=self.prefill, decode=self.decode, prefill_policy=policy,
                                 timeouts=Timeouts(connect=5.0, first_byte=600.0, total=600.0))

    def close(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()
            self.backend = None

    def send(self, prompt: str, params: SglSamplingParams, stream: bool) -> Outcome:
        started = time.monotonic()
        outcome = Outcome()
        try:
            if stream:
                for event in self.backend.request_stream(request_body(prompt, params, stream=True)):
                    if outcome.ttft is None:
                        outcome.ttft = time.monotonic() - started
                    outcome.text, outcome.meta = event.get("text", ""), event.get("meta_info", {})
            else:
                answer = self.backend.request(request_body(prompt, params, stream=False))
                outcome.text, outcome.meta = answer["text"], answer["meta_info"]
        except Exception as exc:  # noqa: BLE001 - any failure is this request's error, reported
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.e2e = time.monotonic() - started
        return outcome

    def diagnostics(self) -> dict[str, Any]:
        """Why each request went where it went (``route_reason``), from the adapter's own metrics."""
        records = self.backend.metrics.records() if self.backend else []
        reasons = Counter(_reason_class(r.route_reason) for r in records)
        return {
            "route_reasons": dict(reasons),
            "prefill_servers": dict(Counter(r.prefill for r in records if r.prefill)),
            "metrics_ttft": [r.ttft for r in records if r.ttft is not None and r.error is None],
            "records": [r.as_dict() for r in records],
        }


def _reason_class(reason: str) -> str:
    """``prefill:prefix_match(0.93) decode:least_loaded(load=3)`` -> ``prefix_match``."""
    prefill = reason.split(" decode:")[0].removeprefix("prefill:")
    return re.sub(r"\([^)]*\)", "", prefill)
