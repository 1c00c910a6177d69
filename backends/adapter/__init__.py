"""The adapter (client side): SGLang programs and native requests on PD server pools.

:class:`PDClient` sends SGLang ``/generate`` bodies as prefill/decode pairs
(or to colocated servers), routed, retried and measured; :class:`PDBackend`
adapts SGLang's frontend language (``gen``, ``select``, ``fork``,
``run_batch``, streaming) on top of one. Everything else here is what users
pass in (policies, timeouts, retry, a transport) or get back (records,
server descriptions). The modules behind it are private.
"""

from backends.adapter._backend import PDBackend
from backends.adapter._client import PDClient
from backends.adapter._engine import Delivered
from backends.adapter._metrics import Metrics, RequestRecord
from backends.adapter._payloads import sampling_body
from backends.adapter._policies import (
    CacheAware,
    Candidates,
    Choice,
    LeastLoaded,
    LoadGuard,
    PrefillCost,
    Policy,
    RandomChoice,
    RoundRobin,
    SmallestCache,
)
from backends.adapter._hedge import HedgePolicy
from backends.adapter._retry import RetryPolicy
from backends.adapter._route import Route
from backends.adapter._servers import ServerInfo, describe_server
from backends.adapter._transport import HttpxTransport, Response, Timeouts, Transport, parse_sse_line

__all__ = [
    "PDBackend",
    "PDClient",
    "Delivered",
    "Route",
    "Policy",
    "Candidates",
    "Choice",
    "CacheAware",
    "LoadGuard",
    "PrefillCost",
    "LeastLoaded",
    "SmallestCache",
    "RoundRobin",
    "RandomChoice",
    "RetryPolicy",
    "HedgePolicy",
    "Timeouts",
    "Transport",
    "HttpxTransport",
    "Response",
    "ServerInfo",
    "describe_server",
    "parse_sse_line",
    "sampling_body",
    "Metrics",
    "RequestRecord",
]
