"""Run SGLang frontend programs on prefill/decode-separated SGLang servers.

Public surface (server side so far): :class:`SGLangPDConfig` describes a
deployment, :class:`PDCluster` runs it, :class:`ServerSpec` describes one
planned server, :func:`ensure_tiny_model` builds the no-download test model.
"""

from backends.cluster import ClusterStartError, PDCluster
from backends.config import SGLangPDConfig, ServerSpec
from backends.tiny_model import ensure_tiny_model, is_tiny_model

__all__ = [
    "ClusterStartError",
    "PDCluster",
    "SGLangPDConfig",
    "ServerSpec",
    "ensure_tiny_model",
    "is_tiny_model",
]
