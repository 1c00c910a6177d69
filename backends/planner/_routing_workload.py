"""The benchmark's workloads as token-id prompts, sized for many prefill servers.

Why token ids: the routing simulation feeds the adapter's token index and the simulated radix
caches the same ids a server would see. The shapes are the benchmark's (``recipes/bench/
workloads.py``, as modelled by :meth:`Workload.benchmark`): every request reads a prefix of its
group's token *stream*, then tokens of its own.

- shared-prefix: groups of requests sharing a long prefix (a system prompt, a document);
- multi-turn: chat sessions; turn ``k + 1`` extends turn ``k``'s prompt with the reply and a new
  message, and every session starts with the same system prompt;
- few-shot: one long block of examples shared by every request.

Sized for ``P`` prefill servers (:func:`scaled_shape`): ``4 P`` shared-prefix groups and ``8 P``
concurrent chat sessions, so that a perfect router has several prefixes per server to place;
few-shot keeps its one block (a hot prefix whose traffic may need more than one server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.planner._costs import CostModel
from backends.planner._radix_sim import best_cached
from backends.planner._workload import BENCHMARK_SHAPES, Workload

__all__ = ["RoutingWorkload", "routing_workload", "scaled_shape", "token_text"]

#: Token ids are drawn from a Llama-2-sized vocabulary.
_VOCAB = 32000
#: Every token id as exactly 4 characters: the router's approximate record works in characters
#: and converts at 4 characters a token (``backends/adapter/_router.py``), here exactly.
_CHARS = [format(t, "04x") for t in range(_VOCAB)]


def token_text(ids) -> str:
    """The text standing for ``ids`` in the approximate record: 4 characters per token."""
    return "".join(map(_CHARS.__getitem__, ids))


def scaled_shape(name: str, prefill: int) -> dict[str, int]:
    """The benchmark shape ``name`` with its parallelism scaled to ``prefill`` servers."""
    if name == "shared-prefix":
        return {"groups": 4 * prefill}
    if name == "multi-turn":
        return {"concurrent_sessions": 8 * prefill}
    if name == "few-shot":
        return {}
    raise ValueError(f"unknown workload {name!r}; choose one of {sorted(BENCHMARK_SHAPES)}")


@dataclass(frozen=True)
class RoutingWorkload:
    """Requests in arrival order, as token ids.

    Attributes
    ----------
    prompts
        Each request's prompt token ids.
    arrival_s, output_tokens, group
        Arrival time, tokens generated, prefix group (a shared-prefix group, a chat session,
        the few-shot block) per request.
    best_cached
        Per request, the prompt tokens cached when every distinct prefix is computed once
        (one infinite cache, the same page size): the best any routing achieves.
    page_size
        The servers' page size the best was computed for.
    rate
        Mean arrivals per second.
    """

    name: str
    prompts: tuple[tuple[int, ...], ...]
    arrival_s: np.ndarray
    output_tokens: np.ndarray
    group: np.ndarray
    best_cached: np.ndarray
    page_size: int
    rate: float
    shape: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def best_hit_ratio(self) -> float:
        """Cached over prompt tokens with every distinct prefix computed once."""
        return float(self.best_cached.sum()) / max(self.prompt_tokens, 1)


def routing_workload(name: str, n: int, *, prefill: int = 16, utilisation: float = 0.7,
                     costs: CostModel | None = None, page_size: int = 16, seed: int = 0,
                     **shape: int) -> RoutingWorkload:
    """``n`` requests of the benchmark workload ``name`` as token ids, at a rate for ``utilisation``.

    Parameters
    ----------
    name
        ``shared-prefix``, ``multi-turn`` or ``few-shot`` (:data:`BENCHMARK_SHAPES`).
    prefill
        Prefill servers: sizes the shape (:func:`scaled_shape`) and the rate.
    utilisation
        Open-loop Poisson rate chosen so that ``prefill`` servers would be this busy if every
        distinct prefix were computed once, one forward per request (batching makes them less
        busy, worse routing more): ``rate = utilisation * prefill / mean prefill time``.
    costs
        Prefill times (default :meth:`CostModel.h200_llama8b`, from the project's H200 data).
    page_size
        For the best achievable: SGLang caches whole pages only.
    shape
        Overrides of the scaled shape (e.g. ``groups=8``).
    """
    costs = costs or CostModel.h200_llama8b()
    s = {**scaled_shape(name, prefill), **shape}
    w = Workload.benchmark(name, n, 1.0, seed=seed, **s)
    system = {**BENCHMARK_SHAPES[name], **s}.get("system_len", 0)  # multi-turn: one system prompt for all
    prompts = _token_prompts(w, np.random.default_rng([seed, 1]), system)
    best = np.asarray(best_cached(prompts, page_size), dtype=np.int64)
    lengths = np.asarray([len(p) for p in prompts])
    busy = sum(costs.prefill_time(int(u), int(c)) for u, c in zip(lengths - best, best))
    rate = utilisation * prefill * n / busy
    w = w.with_rate(rate)
    return RoutingWorkload(name, prompts, w.arrival_s, w.output_tokens, w.group, best, page_size, rate,
                           {**w.shape, "utilisation": utilisation, "page_size": page_size})


def _token_prompts(w: Workload, rng: np.random.Generator, shared_head: int) -> tuple[tuple[int, ...], ...]:
    """Group ``g``'s stream: ``shared_head`` tokens common to all groups, then its own; each
    request reads ``prefix_tokens`` of its stream, then ``prompt - prefix`` fresh tokens."""
    head = rng.integers(0, _VOCAB, shared_head).tolist()
    longest: dict[int, int] = {}
    for g, p in zip(w.group.tolist(), w.prefix_tokens.tolist()):
        if g >= 0:
            longest[g] = max(longest.get(g, 0), p)
    streams = {g: tuple(head + rng.integers(0, _VOCAB, max(n - shared_head, 0)).tolist()) for g, n in sorted(longest.items())}
    prompts = []
    for g, p, n in zip(w.group.tolist(), w.prefix_tokens.tolist(), w.prompt_tokens.tolist()):
        own = tuple(rng.integers(0, _VOCAB, n - p).tolist()) if n > p else ()
        prompts.append((streams[g][:p] if g >= 0 else ()) + own)
    return tuple(prompts)
