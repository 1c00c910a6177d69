"""Workloads for the simulator: when each request arrives, how long it is, what it shares.

A request's prompt is modelled as ``prefix_tokens`` tokens read from the start of its
group's shared token *stream*, then ``prompt_tokens - prefix_tokens`` tokens of its own.
That covers the three shapes the benchmark uses (``recipes/bench/workloads.py``):

- shared prefix: a group's stream is its system prompt or document; every request reads
  the same ``prefix_len`` tokens of it, then a unique question;
- multi-turn chat: a session's stream is its conversation; turn ``k`` reads the whole
  history (so its ``prefix_tokens`` equals its ``prompt_tokens``) and turn ``k+1`` reads further;
- few-shot: one group, one block of examples, a unique question each.

Arrivals are open-loop (times fixed in advance), Poisson unless the trace says otherwise.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Workload", "BENCHMARK_SHAPES", "PrefixCache"]

#: The benchmark's "full" shapes (``recipes/bench_pd.py``), in tokens.
BENCHMARK_SHAPES: dict[str, dict[str, int]] = {
    "shared-prefix": dict(groups=8, prefix_len=1024, suffix_len=32, output_len=32),
    "multi-turn": dict(turns=4, turn_len=96, system_len=16, output_len=32, concurrent_sessions=12),
    "few-shot": dict(block_len=1536, question_len=32, output_len=32),
}


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order; every array has one entry per request.

    Attributes
    ----------
    arrival_s : ndarray of float
        Arrival time, s from the start, non-decreasing.
    prompt_tokens, output_tokens : ndarray of int
        Prompt length and tokens generated (>= 1; the first comes from prefill).
    group : ndarray of int
        Prefix group (shared stream) id; -1 shares nothing.
    prefix_tokens : ndarray of int
        Leading prompt tokens taken from the group's stream (0 when ``group`` is -1).
    """

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    group: np.ndarray
    prefix_tokens: np.ndarray
    shape: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        for name in ("prompt_tokens", "output_tokens", "group", "prefix_tokens"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Workload.{name} has {len(getattr(self, name))} entries, arrival_s has {n}")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError("Workload.arrival_s must be non-negative and non-decreasing (sort the trace)")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("every request needs prompt_tokens >= 1 and output_tokens >= 1")
        if n and np.any((self.prefix_tokens < 0) | (self.prefix_tokens > self.prompt_tokens)):
            raise ValueError("prefix_tokens must lie within [0, prompt_tokens]")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def with_rate(self, rate: float) -> "Workload":
        """The same requests with arrival times rescaled to a mean of ``rate`` requests/s."""
        scale = (len(self) - 1) / rate / self.duration_s if self.duration_s > 0 else 0.0
        return _make(self.name, self.arrival_s * scale, self.prompt_tokens, self.output_tokens, self.group,
                     self.prefix_tokens, {**self.shape, "rate": rate})

    def to_trace(self, path: str | Path) -> None:
        """Write as JSONL, one request a line (readable by :meth:`from_trace`)."""
        with open(path, "w") as out:
            for i in range(len(self)):
                out.write(json.dumps({"arrival_s": float(self.arrival_s[i]), "prompt_tokens": int(self.prompt_tokens[i]),
                                      "output_tokens": int(self.output_tokens[i]), "group": int(self.group[i]),
                                      "prefix_tokens": int(self.prefix_tokens[i])}) + "\n")

    # ----- constructors ------------------------------------------------------------------
    @classmethod
    def from_trace(cls, path: str | Path) -> "Workload":
        """Read a JSON list or JSONL of requests.

        Keys per request: ``arrival_s`` (or ``timestamp`` in s, or ``timestamp_ms``),
        ``prompt_tokens`` (or ``input_length``), ``output_tokens`` (or ``output_length``,
        ``completion_tokens``), optional ``group`` (any JSON value) and ``prefix_tokens``.
        Requests are sorted by arrival; times are shifted to start at 0.
        """
        text = Path(path).read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
        if not rows:
            raise ValueError(f"{path}: no requests")

        def pick(row: dict, *keys: str, default: Any = None) -> Any:
            for key in keys:
                if key in row:
                    return row[key]
            if default is None:
                raise ValueError(f"{path}: a request lacks all of {keys}: {row}")
            return default

        arrival = [float(pick(r, "arrival_s", "timestamp", default=-1.0)) if "timestamp_ms" not in r
                   else r["timestamp_ms"] / 1000 for r in rows]
        if min(arrival) < 0:
            raise ValueError(f"{path}: every request needs arrival_s, timestamp (s) or timestamp_ms")
        groups: dict[str, int] = {}
        gid = [-1 if r.get("group") is None else groups.setdefault(json.dumps(r["group"]), len(groups)) for r in rows]
        prefix = [int(r.get("prefix_tokens", 0)) if g >= 0 else 0 for r, g in zip(rows, gid)]
        order = np.argsort(arrival, kind="stable")
        arr = np.asarray(arrival)[order]
        return _make(Path(path).name, arr - arr[0],
                     np.asarray([int(pick(r, "prompt_tokens", "input_length")) for r in rows])[order],
                     np.asarray([int(pick(r, "output_tokens", "output_length", "completion_tokens")) for r in rows])[order],
                     np.asarray(gid)[order], np.asarray(prefix)[order], {"trace": str(path)})

    @classmethod
    def from_distribution(cls, n: int, rate: float, prompt_tokens: float, output_tokens: float, *,
                          prompt_cv: float = 0.0, output_cv: float = 0.0, groups: int = 0,
                          prefix_tokens: int = 0, seed: int = 0) -> "Workload":
        """``n`` Poisson arrivals at ``rate`` requests/s with log-normal lengths.

        Lengths have the given means and coefficients of variation (0: constant). With
        ``groups > 0`` each request reads the first ``prefix_tokens`` of a random group's stream.
        """
        rng = np.random.default_rng(seed)
        prompt, output = (_lognormal(rng, m, cv, n) for m, cv in ((prompt_tokens, prompt_cv), (output_tokens, output_cv)))
        group = rng.integers(0, groups, n) if groups > 0 else np.full(n, -1)
        prefix = np.where(group >= 0, np.minimum(prefix_tokens, prompt), 0)
        shape = dict(n=n, rate=rate, prompt_tokens=prompt_tokens, output_tokens=output_tokens, prompt_cv=prompt_cv,
                     output_cv=output_cv, groups=groups, prefix_tokens=prefix_tokens, seed=seed)
        return _make("distribution", _poisson(rng, n, rate), prompt, output, group, prefix, shape)

    @classmethod
    def benchmark(cls, name: str, n: int, rate: float, seed: int = 0, **shape: int) -> "Workload":
        """The benchmark's workload ``name`` (see :data:`BENCHMARK_SHAPES`) as ``n`` Poisson arrivals.

        Multi-turn sessions run ``concurrent_sessions`` at a time, taking turns in a shuffled
        order each round, as the benchmark sends them; a turn's prompt is the system prompt,
        every earlier turn and reply, then its own message (chat-template tokens not counted).
        """
        if name not in BENCHMARK_SHAPES:
            raise ValueError(f"unknown workload {name!r}; choose one of {sorted(BENCHMARK_SHAPES)}")
        unknown = set(shape) - set(BENCHMARK_SHAPES[name])
        if unknown:
            raise ValueError(f"{name}: unknown shape parameter(s) {sorted(unknown)}; valid: {sorted(BENCHMARK_SHAPES[name])}")
        s = {**BENCHMARK_SHAPES[name], **shape}
        rng = np.random.default_rng(seed)
        out = np.full(n, s["output_len"])
        if name == "shared-prefix":
            group = rng.integers(0, s["groups"], n)
            prefix, prompt = np.full(n, s["prefix_len"]), np.full(n, s["prefix_len"] + s["suffix_len"])
        elif name == "few-shot":
            group = np.zeros(n, dtype=int)
            prefix, prompt = np.full(n, s["block_len"]), np.full(n, s["block_len"] + s["question_len"])
        else:
            group, turn = [], []
            batch, session = s["concurrent_sessions"], 0
            while len(group) < n:
                for k in range(s["turns"]):
                    for sid in rng.permutation(batch):
                        group.append(session + sid), turn.append(k)
                session += batch
            group, turn = np.asarray(group[:n]), np.asarray(turn[:n])
            prompt = s["system_len"] + turn * (s["turn_len"] + s["output_len"]) + s["turn_len"]
            prefix = prompt.copy()
        return _make(name, _poisson(rng, n, rate), prompt, out, group, prefix, {**s, "n": n, "rate": rate, "seed": seed})


class PrefixCache:
    """A radix cache (or the adapter's record of one) in this module's prefix model, in tokens.

    Holds, per group, the length of the group's stream cached, and each request's private tail;
    evicts least recently used entries first, a prefix's tail before its head, down to ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.total, self.held = capacity, 0, OrderedDict()

    def match(self, group: int, prefix: int, touch: bool = True) -> int:
        if group < 0 or group not in self.held:
            return 0
        if touch:
            self.held.move_to_end(group)
        return min(self.held[group], prefix)

    def insert(self, group: int, prefix: int, tail: int, request: int) -> None:
        # keys: a group's stream is its id (>= 0); request i's private tail is -2 - i; group -1 shares nothing
        for k, size in ((group, prefix), (-2 - request, tail)):
            if k != -1 and size > self.held.get(k, 0):
                self.total += size - self.held.get(k, 0)
                self.held[k] = size
                self.held.move_to_end(k)
        while self.total > self.capacity:
            k, size = next(iter(self.held.items()))
            cut = min(size, self.total - self.capacity)  # a radix tree drops a prefix's tail first
            self.total -= cut
            if cut == size:
                del self.held[k]
            else:
                self.held[k] = size - cut


def _make(name, arrival, prompt, output, group, prefix, shape) -> Workload:
    return Workload(name, np.asarray(arrival, dtype=float), np.asarray(prompt, dtype=np.int64),
                    np.asarray(output, dtype=np.int64), np.asarray(group, dtype=np.int64),
                    np.asarray(prefix, dtype=np.int64), shape)


def _poisson(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    if cv <= 0:
        return np.full(n, max(int(round(mean)), 1))
    sigma = np.sqrt(np.log1p(cv * cv))
    return np.maximum(np.rint(rng.lognormal(np.log(mean) - sigma * sigma / 2, sigma, n)), 1).astype(np.int64)
