"""Hedged requests: a second pair for a PD request whose prefill is late, within a budget.

"The Tail at Scale" (Dean and Barroso, CACM 2013): defer a second copy of a
request until the first has been outstanding longer than the 95th percentile
of recent latencies, and the extra load stays a few percent while the tail
shrinks. Here the signal is the prefill leg: it answers once the prompt's KV
reached decode (SGLang), so a prefill leg that has not answered long after
the others do means a queued, stalled or frozen prefill server, whatever the
generation's length. The hedge is a fresh attempt on another prefill server
with a fresh bootstrap room; the first to produce a result wins and the
other is aborted on both of its servers (:mod:`._engine`).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

from backends.errors import ConfigurationError

__all__ = ["HedgePolicy", "Hedger"]


@dataclass(frozen=True)
class HedgePolicy:
    """When to hedge a PD request, and how many hedges to allow.

    Parameters
    ----------
    quantile
        The delay is this quantile of the last ``window`` prefill-leg
        latencies (seconds), bounded by ``min_delay`` and ``max_delay``;
        ``max_delay`` until ``min_samples`` latencies are known.
    budget
        Hedges allowed per request, on average (0.05: at most 5% extra pairs),
        with up to ``burst`` at once (a server freezing under load leaves many
        requests late together).

    Raises
    ------
    ConfigurationError
        A setting out of range.
    """

    quantile: float = 0.95
    min_delay: float = 0.5
    max_delay: float = 5.0
    min_samples: int = 20
    window: int = 500
    budget: float = 0.05
    burst: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1 or not 0 < self.min_delay <= self.max_delay:
            raise ConfigurationError("HedgePolicy needs 0 < quantile < 1 and 0 < min_delay <= max_delay, got "
                                     f"{self.quantile}, {self.min_delay}, {self.max_delay}")
        if self.budget < 0 or self.burst < 1 or self.window < self.min_samples or self.min_samples < 2:
            raise ConfigurationError("HedgePolicy needs budget >= 0, burst >= 1 and 2 <= min_samples <= window")


class Hedger:
    """One client's hedging state: recent prefill-leg latencies, the budget, the counts. Thread-safe."""

    def __init__(self, policy: HedgePolicy) -> None:
        self.policy = policy
        self._latencies: deque[float] = deque(maxlen=policy.window)
        self._tokens = float(policy.burst)
        self._lock = threading.Lock()
        self.sent = self.won = 0

    def observe(self, prefill_latency: float) -> None:
        """A PD request's prefill leg answered after ``prefill_latency`` seconds; it earns budget."""
        with self._lock:
            self._latencies.append(prefill_latency)
            self._tokens = min(self.policy.burst, self._tokens + self.policy.budget)

    def delay(self) -> float:
        """Seconds to wait for the prefill leg before hedging."""
        p = self.policy
        with self._lock:
            if len(self._latencies) < p.min_samples:
                return p.max_delay
            cut = statistics.quantiles(self._latencies, n=100, method="inclusive")[round(p.quantile * 100) - 1]
        return min(max(cut, p.min_delay), p.max_delay)

    def take(self) -> bool:
        """Spend one hedge from the budget; ``False`` when it is used up."""
        with self._lock:
            if self._tokens < 1 - 1e-9:  # ten requests at 0.1 sum to 0.999...
                return False
            self._tokens -= 1
            self.sent += 1
            return True

    def won_race(self) -> None:
        with self._lock:
            self.won += 1

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"sent": self.sent, "won": self.won, "budget_left": self._tokens}
