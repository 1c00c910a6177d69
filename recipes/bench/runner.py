"""Send one workload through one route: arrivals, concurrency and turn order.

Why its own module: every route must see the same requests in the same order
under the same load, and the rules that guarantee it (seeded Poisson arrival
times, a cap on requests in flight, a chat turn waiting for the reply it
extends) are the benchmark's methodology, independent of any route.

Timing starts when a request is actually sent: a chat turn waiting for its
previous reply is not charged for the wait.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from backends import PDClient
from recipes.bench.routes import Outcome
from recipes.bench.workloads import Render, Workload


@dataclass
class Sample:
    """One request as the benchmark saw it; times in seconds from the run's start."""

    conversation: int
    turn: int
    prompt: str
    sent_at: float
    ttft: float | None
    e2e: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.completion_tokens < 2 or self.error:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


@dataclass
class RunResult:
    samples: list[Sample]
    duration: float


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request may go out (all 0 for an infinite rate)."""
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(f"arrivals/{seed}")
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(request_rate)
    return offsets


def run_workload(workload: Workload, route, *, render: Render, stream: bool, concurrency: int | None,
                 request_rate: float, seed: int, on_done: Callable[[], None] = lambda: None) -> RunResult:
    """Send every turn of ``workload`` through an opened ``route``; never raises for a failed request.

    Parameters
    ----------
    concurrency
        Most requests in flight at once; ``None`` for no cap (open loop).
    request_rate
        Poisson arrivals per second; ``inf`` sends as fast as ``concurrency`` allows.
    """
    turns = workload.turns
    offsets = arrival_offsets(len(turns), request_rate, seed)
    params = workload.sampling_params()
    slots = threading.Semaphore(concurrency) if concurrency else None
    finished = {(t.conversation, t.index): threading.Event() for t in turns}
    replies: dict[tuple[int, int], tuple[str, str] | None] = {}
    samples: list[Sample] = []
    lock = threading.Lock()
    aborted = threading.Event()
    start = time.monotonic()

    def history(turn) -> list[tuple[str, str]] | None:
        pairs = []
        for index in range(turn.index):
            finished[(turn.conversation, index)].wait()
            pair = replies.get((turn.conversation, index))
            if pair is None:
                return None
            pairs.append(pair)
        return pairs

    def task(turn) -> None:
        try:
            pairs = history(turn) if workload.chat else []
            sent_at = time.monotonic() - start
            if aborted.is_set():
                outcome, prompt = Outcome(error="aborted"), ""
            elif pairs is None:
                outcome, prompt = Outcome(error="skipped: an earlier turn of this session failed"), ""
            else:
                prompt = workload.prompt(turn, pairs, render)
                outcome = route.send(prompt, params, stream)
            meta = outcome.meta or {}
            sample = Sample(turn.conversation, turn.index, prompt, sent_at, outcome.ttft, outcome.e2e,
                            int(meta.get("prompt_tokens") or 0), int(meta.get("completion_tokens") or 0),
                            int(meta.get("cached_tokens") or 0), outcome.error)
            with lock:
                samples.append(sample)
                replies[(turn.conversation, turn.index)] = None if outcome.error else (turn.user, outcome.text)
        finally:
            finished[(turn.conversation, turn.index)].set()
            if slots is not None:
                slots.release()
            on_done()

    # One daemon thread per request: an interrupted run (Ctrl-C, SIGTERM) must not wait at
    # exit for requests still in flight, some of which may hang until a server timeout.
    threads: list[threading.Thread] = []
    crashed: list[BaseException] = []

    def guarded(turn) -> None:
        try:
            task(turn)
        except BaseException as exc:  # a bug in the bench itself, re-raised below
            crashed.append(exc)

    try:
        for i, (turn, offset) in enumerate(zip(turns, offsets)):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if slots is not None:
                slots.acquire()
            thread = threading.Thread(target=guarded, args=(turn,), name=f"bench-{i}", daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    except BaseException:
        # Ctrl-C or SIGTERM: send nothing more and release turns waiting for a reply;
        # the caller closes the route, which makes requests in flight fail.
        aborted.set()
        for event in finished.values():
            event.set()
        raise
    if crashed:
        raise crashed[0]
    duration = time.monotonic() - start
    samples.sort(key=lambda s: s.sent_at)
    return RunResult(samples, duration)


def flush_caches(servers, wait: float = 120.0) -> None:
    """Empty every server's radix cache through the library (``PDClient.flush_cache``).

    Parameters
    ----------
    servers
        A ``Servers`` of :mod:`recipes.bench.topology`.
    wait
        Seconds each server may take to drain first (it refuses to flush while requests run).

    Raises
    ------
    PDError
        A server still refused (someone else keeps it busy) or is unreachable.
    """
    with PDClient(prefill=servers.prefill, decode=servers.decode, colocated=servers.colocated) as client:
        client.flush_cache(wait=wait)
