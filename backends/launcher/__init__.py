"""The launcher (server side): real SGLang servers from one config, on GPUs or on CPU.

:class:`SGLangPDConfig` describes a deployment (plain data, validated at
construction); :func:`plan_servers` turns it into one command line per server;
:class:`PDCluster` runs them, restarts the ones that die (each restart a
:class:`RestartEvent`) and always stops them. It knows nothing of the
adapter: ``PDBackend(**cluster.urls())`` connects the two.
"""

from backends.launcher._cluster import PDCluster
from backends.launcher._config import PRESETS, SGLangPDConfig
from backends.launcher._launch_plan import ServerSpec, plan_servers
from backends.launcher._process import ManagedProcess
from backends.launcher._router import LAUNCH_MODULE as ROUTER_MODULE
from backends.launcher._router import RouterPortTaken, RouterProcess, router_argv
from backends.launcher._supervisor import RestartEvent
from backends.launcher._tiny_model import PREFILL_BOUND_MODEL, TINY_MODEL, ensure_tiny_model, is_tiny_model

__all__ = [
    "SGLangPDConfig", "PRESETS", "ServerSpec", "plan_servers", "PDCluster", "RestartEvent", "ManagedProcess",
    "RouterProcess", "RouterPortTaken", "router_argv", "ROUTER_MODULE", "ensure_tiny_model", "is_tiny_model",
    "PREFILL_BOUND_MODEL", "TINY_MODEL",
]
