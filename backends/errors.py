"""The one exception tree of the adapter.

Every error a user of the adapter (:class:`~backends.PDBackend`,
:class:`~backends.PDClient`) or the launcher (:class:`~backends.SGLangPDConfig`,
:class:`~backends.PDCluster`) sees is a :class:`PDError`. Each names the
server involved (``server``, a URL or ``None``) and says what to do next in
its message.

::

    PDError
    ├── ConfigurationError        wrong role, mixed models, bad setting (also ValueError)
    ├── BadRequestError           the server refused the request (4xx); never retried (also ValueError)
    │   └── PoisonRequestError    two servers died during the request's attempts: not sent again
    ├── ServerUnavailableError    a failure another server may not have; retried on another pair
    │   ├── PrefillFailedError    the prefill leg failed (connection, 5xx, lost peer)
    │   ├── DecodeFailedError     the decode leg failed
    │   └── NoHealthyServerError  every server of a role is out of rotation
    ├── RequestTimeoutError       a leg outlived its timeout (also TimeoutError)
    ├── StreamInterruptedError    a stream broke after text was already delivered
    └── ClusterStartError         a launched server died or stayed unhealthy (also RuntimeError)

Retry decisions look only at the class: :class:`ServerUnavailableError` and
:class:`RequestTimeoutError` are retryable, everything else raises at once.
"""

from __future__ import annotations


class PDError(Exception):
    """Base of every adapter error.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    server
        URL of the server involved, when one is.
    status
        HTTP status the server answered with, when it answered.
    unreachable
        The connection itself failed (refused, reset, broken): the server is
        taken out of rotation at once instead of after repeated errors.
    """

    def __init__(
        self, message: str, *, server: str | None = None, status: int | None = None, unreachable: bool = False
    ):
        super().__init__(message)
        self.server = server
        self.status = status
        self.unreachable = unreachable


class ConfigurationError(PDError, ValueError):
    """The adapter was set up wrongly (wrong server role, mixed models, bad option)."""


class BadRequestError(PDError, ValueError):
    """The server rejected the request itself; sending it elsewhere cannot help."""


class PoisonRequestError(BadRequestError):
    """Servers died while this request was on them, twice: it is likely an input they cannot survive.

    Raised instead of a third attempt, so an unknown poison input costs at most
    two servers rather than every server of the pool. ``servers`` lists the ones lost.
    """

    def __init__(self, message: str, *, servers: list[str]):
        super().__init__(message, server=servers[-1] if servers else None)
        self.servers = list(servers)


class ServerUnavailableError(PDError):
    """A server failed in a way another server may not; the request is retried."""


class PrefillFailedError(ServerUnavailableError):
    """The prefill leg of a pair failed."""


class DecodeFailedError(ServerUnavailableError):
    """The decode leg of a pair failed."""


class NoHealthyServerError(ServerUnavailableError):
    """All servers of a role are out of rotation (failed health checks or open breaker)."""


class RequestTimeoutError(PDError, TimeoutError):
    """A request leg exceeded its connect, first-byte or total timeout."""


class StreamInterruptedError(PDError):
    """A streamed generation broke after some text was already yielded.

    It is not retried: the caller has already consumed part of the answer.
    """


class ClusterStartError(PDError, RuntimeError):
    """A server of a :class:`~backends.PDCluster` could not start: port taken, exited, or unhealthy in time."""


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt may succeed on another server pair."""
    return isinstance(error, (ServerUnavailableError, RequestTimeoutError))


__all__ = [
    "PDError",
    "ConfigurationError",
    "BadRequestError",
    "ServerUnavailableError",
    "PrefillFailedError",
    "DecodeFailedError",
    "NoHealthyServerError",
    "RequestTimeoutError",
    "StreamInterruptedError",
    "ClusterStartError",
    "is_retryable",
]
