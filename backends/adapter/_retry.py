"""When a failed attempt is tried again, as one small tenacity policy.

Only failures another server pair may not have are retried (connection
errors, 5xx, 408/429, timeouts: see :func:`backends.errors.is_retryable`);
a 4xx raises at once. Each retry gets a fresh bootstrap room and avoids the
servers that already failed this request, so a dead server costs one quick
retry rather than a timeout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from backends.errors import ConfigurationError, is_retryable

__all__ = ["RetryPolicy"]

logger = logging.getLogger(__name__)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.warning("attempt %d failed (%s); retrying on another pair", state.attempt_number, error)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one request, composable from tenacity's strategies.

    The numbers are the defaults; ``stop`` and ``wait`` take any tenacity
    strategy instead, composed as tenacity composes them, e.g.
    ``RetryPolicy(stop=stop_after_attempt(3) | stop_after_delay(20), wait=wait_fixed(0.1))``.

    Parameters
    ----------
    max_attempts
        Attempts in all, the first included.
    budget
        Seconds after the first attempt started after which no new attempt
        starts. Generous by default: under load one attempt can run for a
        minute before its connection breaks, and it still deserves a retry.
    backoff, max_backoff
        First and longest pause between attempts (exponential in between).
        Short: the next attempt goes to another server, not the same one.
    stop, wait
        tenacity stop and wait strategies replacing the ones the numbers above make.

    Raises
    ------
    ConfigurationError
        A bound out of range.
    """

    max_attempts: int = 4
    budget: float = 600.0
    backoff: float = 0.05
    max_backoff: float = 1.0
    stop: Any = None
    wait: Any = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.budget <= 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise ConfigurationError("RetryPolicy needs budget > 0 and 0 <= backoff <= max_backoff")

    def retrying(self) -> Retrying:
        """A fresh tenacity controller (they keep per-call state, so one per request)."""
        return Retrying(
            stop=self.stop or (stop_after_attempt(self.max_attempts) | stop_after_delay(self.budget)),
            wait=self.wait or wait_exponential(multiplier=self.backoff, min=self.backoff, max=self.max_backoff),
            retry=retry_if_exception(is_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )
