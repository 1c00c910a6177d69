"""The adapter as users outgrow one process: N client processes, each with its own ``PDClient``.

Why processes and not threads: a web app's workers or a batch job's machines
share nothing but the servers, so each keeps its own routing state; only the
servers' KV events and published load are common to all. The bench spreads
requests over the processes in turn, as a load balancer in front of workers
would, and each process sends its share from a thread pool, so concurrency is
the runner's, whatever N.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sglang.lang.ir import SglSamplingParams

from recipes.bench.routes import STREAM_TTFT, AdapterRoute, Outcome

__all__ = ["ClientPoolRoute"]

_STOP = None
_REPLY_TIMEOUT_S = 900.0  # above the routes' own 600 s request limit: a lost reply fails, never hangs


def _worker(options: dict, inbox, outbox) -> None:
    """One client process: a route of its own, sending what the parent hands it."""
    route = AdapterRoute("worker", options["prefill"], options["decode"], options["policy"],
                         kv_events=options["kv_events"])
    route.open()
    outbox.put(("ready", None, None))
    try:
        with ThreadPoolExecutor(max_workers=options["threads"]) as pool:
            while (job := inbox.get()) is not _STOP:
                ident, prompt, params, stream = job

                def run(ident=ident, prompt=prompt, params=params, stream=stream) -> None:
                    outbox.put(("done", ident, vars(route.send(prompt, params, stream))))
                pool.submit(run)
        outbox.put(("records", None, route.diagnostics()["records"]))
    finally:
        route.close()


class ClientPoolRoute:
    """``processes`` adapter clients behind one route; the same interface as :class:`AdapterRoute`."""

    kind = "adapter"

    def __init__(self, name: str, prefill: list[str], decode: list[str], policy: str, processes: int,
                 kv_events: bool = True, threads: int = 64) -> None:
        self.name, self.processes = name, processes
        self._options = {"prefill": prefill, "decode": decode, "policy": policy, "kv_events": kv_events,
                         "threads": threads}
        self._workers: list[Any] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._ids, self._turn = itertools.count(), itertools.count()
        self._lock = threading.Lock()
        self._records: list[dict] = []
        self._reader: threading.Thread | None = None

    def ttft_method(self, stream: bool) -> str:
        return (STREAM_TTFT if stream else "adapter metrics: prefill-leg latency") + \
            f" via {self.processes} client processes"

    def open(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per client, as separate workers are
        self._outbox = ctx.Queue()
        for _ in range(self.processes):
            inbox = ctx.Queue()
            worker = ctx.Process(target=_worker, args=(self._options, inbox, self._outbox), daemon=True)
            worker.start()
            self._inboxes.append(inbox)
            self._workers.append(worker)
        for _ in range(self.processes):
            kind, _, _ = self._outbox.get(timeout=300)
            if kind != "ready":
                raise RuntimeError(f"a client process failed to start: {kind}")
        self._reader = threading.Thread(target=self._read, name="bench-client-pool", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, ident, payload = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() for w in self._workers):
                    return
                continue
            except (EOFError, OSError):
                return
            if kind == "done":
                with self._lock:
                    event, box = self._waiting.pop(ident, (None, None))
                if event is not None:
                    box.append(payload)
                    event.set()
            elif kind == "records":
                with self._lock:
                    self._records.extend(payload)

    def send(self, prompt: str, params: SglSamplingParams, stream: bool) -> Outcome:
        started, ident, event, box = time.monotonic(), next(self._ids), threading.Event(), []
        with self._lock:
            self._waiting[ident] = (event, box)
        self._inboxes[next(self._turn) % self.processes].put((ident, prompt, params, stream))
        if not event.wait(_REPLY_TIMEOUT_S):
            with self._lock:
                self._waiting.pop(ident, None)
            return Outcome(error="no reply from the client process", e2e=time.monotonic() - started)
        return Outcome(**box[0])

    def close(self) -> None:
        """Stop every client process (each closes its client and reports its records) and the reader. Idempotent."""
        for inbox in self._inboxes:
            inbox.put(_STOP)
        for worker in self._workers:
            worker.join(60)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._workers, self._inboxes = [], []

    def diagnostics(self) -> dict[str, Any]:
        """Routing reasons and records of every client process (stops them: their records come at exit)."""
        self.close()
        records = list(self._records)
        return {"client_processes": self.processes,
                "route_reasons": dict(Counter(r["route_rule"] for r in records)),
                "prefill_servers": dict(Counter(r["prefill"] for r in records if r["prefill"])),
                "records": records}
