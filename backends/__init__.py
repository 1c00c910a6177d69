"""Run SGLang frontend programs on prefill/decode-separated SGLang servers.

Two ideas, one subpackage each, with their public names re-exported here:

- :mod:`backends.adapter` (client side): :class:`PDClient` sends SGLang
  ``/generate`` bodies as PD pairs (or to colocated servers), routed by
  policies, retried and measured; :class:`PDBackend` runs SGLang's frontend
  language on one.
- :mod:`backends.launcher` (server side): :class:`SGLangPDConfig` describes a
  deployment, :class:`PDCluster` runs it (GPUs, or CPU with the tiny model or
  the prefill-bound one, :data:`PREFILL_BOUND_MODEL`).

:mod:`backends.errors` is the one exception tree of both; :mod:`backends.testing`
holds the in-memory transport and fake SGLang servers for tests.
"""

from backends.adapter import (
    CacheAware,
    Candidates,
    Choice,
    Delivered,
    HttpxTransport,
    LeastLoaded,
    LoadGuard,
    PrefillCost,
    Metrics,
    PDBackend,
    PDClient,
    Policy,
    RandomChoice,
    RequestRecord,
    Response,
    HedgePolicy,
    RetryPolicy,
    RoundRobin,
    Route,
    ServerInfo,
    SmallestCache,
    Timeouts,
    Transport,
    describe_server,
    parse_sse_line,
    sampling_body,
)
from backends.errors import (
    BadRequestError,
    ClusterStartError,
    ConfigurationError,
    DecodeFailedError,
    NoHealthyServerError,
    PDError,
    PoisonRequestError,
    PrefillFailedError,
    RequestTimeoutError,
    ServerUnavailableError,
    StreamInterruptedError,
)
from backends.launcher import (
    PREFILL_BOUND_MODEL,
    PRESETS,
    ROUTER_MODULE,
    ManagedProcess,
    PDCluster,
    RouterPortTaken,
    RouterProcess,
    ServerSpec,
    SGLangPDConfig,
    TINY_MODEL,
    ensure_tiny_model,
    is_tiny_model,
    plan_servers,
    router_argv,
)

__all__ = [
    # adapter
    "PDBackend", "PDClient", "Delivered", "Route", "Policy", "Candidates", "Choice", "CacheAware", "LoadGuard", "PrefillCost",
    "LeastLoaded", "SmallestCache", "RoundRobin", "RandomChoice", "RetryPolicy", "HedgePolicy", "Timeouts", "Transport",
    "HttpxTransport", "Response", "ServerInfo", "describe_server", "parse_sse_line", "sampling_body", "Metrics",
    "RequestRecord",
    # launcher
    "SGLangPDConfig", "PRESETS", "ServerSpec", "plan_servers", "PDCluster", "ManagedProcess", "RouterProcess",
    "RouterPortTaken", "router_argv", "ROUTER_MODULE", "ensure_tiny_model", "is_tiny_model",
    "PREFILL_BOUND_MODEL", "TINY_MODEL",
    # errors
    "PDError", "ConfigurationError", "BadRequestError", "PoisonRequestError", "ServerUnavailableError", "PrefillFailedError",
    "DecodeFailedError", "NoHealthyServerError", "RequestTimeoutError", "StreamInterruptedError", "ClusterStartError",
]
