"""Fake SGLang servers for an :class:`~backends.testing.InMemoryTransport`: fast tests and overhead benchmarks.

They answer the few routes the adapter uses the way SGLang 0.5.23 does,
including the PD protocol's rule that a PD server refuses a ``/generate``
without ``bootstrap_room``, and can be told to fail, to hold a lone leg until
it is aborted, or to ignore early aborts. Real-server tests of the same
behaviour live in the project's ``tests/e2e``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["FakeServer"]


class FakeServer:
    """One fake SGLang server; call it as an :class:`~backends.testing.InMemoryTransport` handler.

    Parameters
    ----------
    role : {"prefill", "decode", "colocated"}
        What ``/model_info`` reports (``disaggregation_mode``).
    model, bootstrap_port, reply
        Its model path, prefill bootstrap port and generated text.

    Attributes
    ----------
    dead
        Raise ``ConnectionError`` on every request (a killed process).
    generate_status
        Status to answer ``/generate`` with (e.g. 500 or 400) instead of success.
    arrival_delay
        Seconds a ``/generate`` takes to reach the scheduler; an abort for its
        rid before then is ignored, as SGLang ignores aborts of unknown rids.
    hold
        Seconds a ``/generate`` waits for its missing partner leg (SGLang: up to
        300 s) unless aborted, which answers 500 at once; 0 answers at once.
    """

    def __init__(self, role: str, model: str = "tiny", bootstrap_port: int = 9000, reply: str = " reply") -> None:
        self.role = role
        self.model = model
        self.bootstrap_port = bootstrap_port
        self.reply = reply
        self.dead = False
        self.generate_status = 200
        self.generated: list[dict] = []
        self.aborted: list[str] = []
        self.dp_size = 1
        self.enable_dp_attention = False
        self.load_balance_method = "follow_bootstrap_room" if role == "prefill" else "round_robin"
        self.arrival_delay = 0.0
        #: The ``kv_events`` block ``/server_info`` advertises (``None``: the server publishes no KV events).
        self.kv_events: dict | None = None
        self.hold = 0.0
        self.released_by_abort: list[str] = []
        self._held: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def _wait_for_partner(self, rid: str) -> bool:
        """Hold a lone leg; True when an abort released it."""
        time.sleep(self.arrival_delay)
        released = threading.Event()
        with self.lock:
            self._held[rid] = released
        try:
            return released.wait(self.hold)
        finally:
            with self.lock:
                self._held.pop(rid, None)

    def _answer(self, body: dict, text: str) -> dict:
        meta = {"prompt_tokens": len(text) // 4, "completion_tokens": 2, "cached_tokens": 0,
                "finish_reason": {"type": "length"}}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[-1.0, 1, "a"]] if self.role != "decode" else []
            meta["output_token_logprobs"] = []
        return {"text": self.reply, "output_ids": [1, 2], "meta_info": meta}

    def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.dead:
            raise ConnectionError("connection refused")
        if path == "/model_info":
            mode = {"prefill": "prefill", "decode": "decode"}.get(self.role, "null")
            return 200, {"model_path": self.model, "disaggregation_mode": mode}
        if path == "/server_info":
            info = {"disaggregation_bootstrap_port": self.bootstrap_port, "dp_size": self.dp_size,
                    "load_balance_method": self.load_balance_method, "enable_dp_attention": self.enable_dp_attention}
            return 200, info if self.kv_events is None else {**info, "kv_events": self.kv_events}
        if path == "/health":
            return 200, {}
        if path == "/flush_cache":
            return 200, {}
        if path == "/abort_request":
            with self.lock:
                self.aborted.append(body["rid"])
                held = self._held.get(body["rid"])
            if held is not None:
                held.set()
            return 200, {}
        if path == "/generate":
            with self.lock:
                self.generated.append(body)
            if self.generate_status != 200:
                return self.generate_status, {"error": {"message": f"fake {self.generate_status}"}}
            if self.hold and self._wait_for_partner(body.get("rid")):
                with self.lock:
                    self.released_by_abort.append(body.get("rid"))
                return 500, {"error": {"message": "Aborted by AbortReq."}}
            if self.role in ("prefill", "decode") and "bootstrap_room" not in body:
                return 400, {"error": {"message": "bootstrap_room is required in PD mode"}}
            texts = body.get("text")
            if isinstance(texts, list):
                return 200, [self._answer(body, t) for t in texts]
            if body.get("stream"):
                return 200, [{"text": self.reply[: i + 1], "meta_info": {"completion_tokens": i + 1}}
                             for i in range(len(self.reply))]
            return 200, self._answer(body, texts or "")
        return 404, {"error": {"message": f"no route {path}"}}
