"""Run SGLang frontend programs on prefill/decode-separated SGLang servers.

Client side: :class:`PDBackend` is an SGLang frontend backend that sends each
generation to a prefill and a decode server as a PD pair (or to a colocated
server), chosen by routing policies, retried on failure and measured.

Server side: :class:`SGLangPDConfig` describes a deployment, :class:`PDCluster`
runs it (on GPUs, or on CPU with :func:`ensure_tiny_model`).

Errors: every adapter error is a :class:`PDError` (see :mod:`backends.errors`).
"""

from backends.cluster import ClusterStartError, PDCluster
from backends.config import SGLangPDConfig, ServerSpec
from backends.errors import (
    BadRequestError,
    ConfigurationError,
    DecodeFailedError,
    NoHealthyServerError,
    PDError,
    PrefillFailedError,
    RequestTimeoutError,
    ServerUnavailableError,
    StreamInterruptedError,
)
from backends.memory_transport import InMemoryTransport
from backends.metrics import Metrics, RequestRecord
from backends.pd_backend import PDBackend
from backends.retry import RetryPolicy
from backends.routing import CacheAware, Candidates, Choice, LeastLoaded, Policy, RandomChoice, RoundRobin, SmallestCache
from backends.tiny_model import ensure_tiny_model, is_tiny_model
from backends.transport import HttpxTransport, Timeouts

__all__ = [
    "PDBackend",
    "Timeouts",
    "RetryPolicy",
    "CacheAware",
    "Candidates",
    "Choice",
    "Policy",
    "LeastLoaded",
    "SmallestCache",
    "RoundRobin",
    "RandomChoice",
    "Metrics",
    "RequestRecord",
    "HttpxTransport",
    "InMemoryTransport",
    "SGLangPDConfig",
    "ServerSpec",
    "PDCluster",
    "ClusterStartError",
    "ensure_tiny_model",
    "is_tiny_model",
    "PDError",
    "ConfigurationError",
    "BadRequestError",
    "ServerUnavailableError",
    "PrefillFailedError",
    "DecodeFailedError",
    "NoHealthyServerError",
    "RequestTimeoutError",
    "StreamInterruptedError",
]
