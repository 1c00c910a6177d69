"""Turn a validated :class:`~backends.launcher._config.SGLangPDConfig` into server commands.

Why a module of its own: the config says *what* a user wants; this module says
*how* SGLang is told so. Every role default, port rule and PD environment
variable lives here (everything specific to running without a GPU lives in
:mod:`backends.launcher._cpu`), so a launch detail has exactly one home.

Port plan: server ``i`` (prefill servers first, then decode, then colocated)
owns ``base_port + 10*i`` .. ``+9``: ``+0`` HTTP, ``+1`` ``--nccl-port``
(torch.distributed rendezvous, bound on all interfaces), ``+2`` the prefill
bootstrap server, and on prefill and colocated servers with KV events on,
for ``N`` DP ranks: ``+3 .. +3+N-1`` events, ``+3+N ..`` event replay,
``+3+2N ..`` load (SGLang binds base + rank; so N <= 2 fits the stride). SGLang's other sockets are IPC files or random ports:
ZeroMQ/gloo sockets in the ephemeral range (32768+ on Linux) and, on PD
servers, Mooncake's RPC port in 15000-17000. So clusters on one machine only
need disjoint ``base_port`` ranges, best kept below 32768 and outside
15000-17000 so that no random port can take a planned one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from backends.errors import ConfigurationError
from backends.launcher import _cpu as cpu
from backends.launcher._config import PORT_STRIDE, ROLES, SGLangPDConfig
from backends.launcher._tiny_model import tiny_model_dir

__all__ = ["ServerSpec", "plan_servers", "dp_size_of", "DECODE_MAX_RUNNING_REQUESTS"]

_NCCL_OFFSET, _BOOTSTRAP_OFFSET, _EVENTS_OFFSET = 1, 2, 3
#: Topic of the KV-event stream (any string; clients read it from /server_info).
KV_EVENTS_TOPIC = "kv"
#: Decode servers batch many streams: a larger cap, CUDA graphs up to it.
DECODE_MAX_RUNNING_REQUESTS = 256
#: PD failure detection: decode pings each prefill's bootstrap server this
#: often (SGLang clamps it to >= 2 s), so a dead prefill fails in-flight
#: decode legs after ~2-3 s instead of ~10 s.
_PD_ENV = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "2"}


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to start and address one SGLang server.

    ``argv`` is the full command (``sys.executable -m sglang.launch_server ...``);
    ``env`` holds only the additions to the launching process's environment.
    ``bootstrap_port`` is set for prefill servers only; ``event_ports`` holds
    the KV-event, replay and load ports (prefill and colocated servers with
    ``kv_events``).
    """

    role: str
    index: int
    model_path: str
    host: str
    port: int
    url: str
    nccl_port: int | None  # None for a data-parallel server: its ranks pick their own
    bootstrap_port: int | None
    argv: list[str] = field(hash=False)
    env: dict[str, str] = field(hash=False)
    gpu_ids: tuple[int, ...] = ()
    event_ports: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """Short label such as ``prefill-0``, used for logs and messages."""
        return f"{self.role}-{self.index}"

    @property
    def ports(self) -> tuple[int, ...]:
        """Every fixed port this server binds (must be free before launch)."""
        fixed = (self.port, self.nccl_port, self.bootstrap_port, *self.event_ports)
        return tuple(p for p in fixed if p is not None)


def plan_servers(cfg: SGLangPDConfig, device: str | None = None, gpu_count: int | None = None) -> list[ServerSpec]:
    """Plan every server of ``cfg``: prefill first, then decode, then colocated.

    Parameters
    ----------
    cfg : SGLangPDConfig
        The deployment.
    device : {"cpu", "cuda"}, optional
        Override the config's resolved device (plan GPU layouts on a CPU machine).
    gpu_count : int, optional
        GPUs of the machine being planned, used as ids ``0..gpu_count-1``
        (e.g. another node). Default: this machine's GPUs, honouring its
        ``CUDA_VISIBLE_DEVICES``.

    Returns
    -------
    list of ServerSpec
        One per server; a random model's folder when ``cfg.model_path`` is
        ``None`` (tiny) or ``"sglpd:<kind>"`` (built by
        :class:`~backends.launcher.PDCluster` at start).

    Raises
    ------
    ConfigurationError
        Too few GPUs, a bad ``--dp-size``, or ``decode_torch_compile`` on CPU.
    """
    device = device or cfg.resolved_device()
    kind = cfg.random_model_kind
    model_path = str(tiny_model_dir(kind=kind)) if kind else cfg.model_path
    counts = (cfg.num_prefill, cfg.num_decode, cfg.colocated)
    order = [(role, i) for role, n in zip(ROLES, counts) for i in range(n)]
    gpu_ids = _gpu_plan(cfg, device, gpu_count, order)
    return [_spec(cfg, role, i, slot, model_path, device, gpu_ids[slot])
            for slot, (role, i) in enumerate(order)]


def dp_size_of(args: tuple[str, ...] | list[str]) -> int:
    """The ``--dp-size`` (alias ``--data-parallel-size``) given in a role's extra args; 1 if none."""
    size = 1
    for i, arg in enumerate(args):
        name, _, inline = arg.partition("=")
        if name in ("--dp-size", "--data-parallel-size"):
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigurationError(f"{name} needs a positive integer, got {value!r}.")
            size = int(value)
    return size


def _gpu_plan(cfg: SGLangPDConfig, device: str, gpu_count: int | None,
              order: list[tuple[str, int]]) -> list[tuple[int, ...]]:
    if device == "cpu":
        return [()] * cfg.num_servers
    widths = [cfg.tp_size * dp_size_of(getattr(cfg, f"{role}_args")) for role, _ in order]
    needed = sum(widths)
    available = cpu.gpu_count() if gpu_count is None else gpu_count
    if needed > available:
        raise ConfigurationError(
            f"{cfg.num_servers} servers (tp_size {cfg.tp_size} x each role's --dp-size) need {needed} "
            f"GPUs but {available} are visible; lower pd_ratio/colocated/tp_size/--dp-size or use "
            f"device='cpu' (this launcher starts servers on one machine only)."
        )
    if gpu_count is not None:
        # Planning for a machine given by its GPU count (maybe not this one):
        # this process's CUDA_VISIBLE_DEVICES says nothing about it.
        physical = list(range(gpu_count))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        physical = [int(v) for v in visible.split(",") if v.strip().isdigit()] or list(range(available))
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [tuple(physical[start:start + width]) for start, width in zip(starts, widths)]


def _spec(cfg: SGLangPDConfig, role: str, index: int, slot: int, model: str,
          device: str, gpu_ids: tuple[int, ...]) -> ServerSpec:
    port = cfg.base_port + PORT_STRIDE * slot
    dp_size = dp_size_of(getattr(cfg, f"{role}_args"))
    # SGLang 0.5.23 gives every plain-DP rank the one --nccl-port (EADDRINUSE);
    # without it each rank picks a free port of its own.
    nccl_port = port + _NCCL_OFFSET if dp_size == 1 else None
    bootstrap = port + _BOOTSTRAP_OFFSET if role == "prefill" else None
    argv = [sys.executable, "-m", "sglang.launch_server",
            "--model-path", model, "--host", cfg.host, "--port", str(port)]
    if nccl_port is not None:
        argv += ["--nccl-port", str(nccl_port)]
    argv += ["--tp-size", str(cfg.tp_size)]
    if cfg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    env: dict[str, str] = {}
    if role != "colocated":
        argv += ["--disaggregation-mode", role,
                 "--disaggregation-transfer-backend", cfg.resolved_transfer_backend(device)]
        env.update(_PD_ENV)
    if bootstrap is not None:
        argv += ["--disaggregation-bootstrap-port", str(bootstrap)]
    argv += _role_defaults(cfg, role, device)
    event_flags, event_ports = _kv_event_flags(cfg, role, port, dp_size)
    argv += event_flags
    if cfg.metrics:
        argv += ["--enable-metrics"]
    if cfg.is_tiny_model:
        # The random model would fill JSON-constrained output with whitespace
        # until max_tokens; compact JSON keeps it finite and parseable.
        argv += ["--constrained-json-disable-any-whitespace"]
    if device == "cpu":
        argv += cpu.cpu_server_flags(role)
        env.update(cpu.cpu_server_env(role, ranks=cfg.tp_size * dp_size))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    argv += list(getattr(cfg, f"{role}_args"))  # last, so they override defaults
    url_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return ServerSpec(role=role, index=index, model_path=model, host=cfg.host, port=port,
                      url=f"http://{url_host}:{port}", nccl_port=nccl_port,
                      bootstrap_port=bootstrap, argv=argv, env=env, gpu_ids=gpu_ids,
                      event_ports=event_ports)


def _kv_event_flags(cfg: SGLangPDConfig, role: str, port: int, dp_size: int) -> tuple[list[str], tuple[int, ...]]:
    """``--kv-events-config`` and ``--load-publish-endpoint`` for a server whose cache clients route on.

    Decode servers hold no prompt worth routing to (their KV arrives by
    transfer and is not reused across requests), so only prefill and
    colocated servers publish. Endpoints bind every interface (``*``): SGLang
    advertises the wildcard in ``/server_info`` and clients dial the host of
    the server's URL (``describe_kv_events_publisher``, ``sglang/srt/runtime_context.py``).
    """
    if not cfg.kv_events or role == "decode":
        return [], ()
    if _EVENTS_OFFSET + 3 * dp_size > PORT_STRIDE:
        raise ConfigurationError(
            f"kv_events with --dp-size {dp_size} on {role} servers needs {3 * dp_size} event ports per "
            f"server, more than the {PORT_STRIDE - _EVENTS_OFFSET} free in its port range; use --dp-size <= 2 "
            f"or kv_events=False (clients then route on their approximate prefix record).")
    events, replay, load = (port + _EVENTS_OFFSET + k * dp_size for k in range(3))
    config = {"publisher": "zmq", "endpoint": f"tcp://*:{events}", "replay_endpoint": f"tcp://*:{replay}",
              "topic": KV_EVENTS_TOPIC}
    flags = ["--kv-events-config", json.dumps(config, separators=(",", ":")),
             "--load-publish-endpoint", f"tcp://*:{load}"]
    return flags, tuple(range(events, events + 3 * dp_size))


def _role_defaults(cfg: SGLangPDConfig, role: str, device: str) -> list[str]:
    """Role tuning as SGLang users do it; CUDA-graph flags on GPU only.

    On CPU SGLang ignores CUDA-graph settings (it captures CPU graphs only with
    ``--enable-torch-compile``), so none are passed there.
    """
    flags: list[str] = []
    if role == "prefill" and device == "cuda":
        # The non-deprecated spelling of --disable-cuda-graph: prefill batches
        # are large and varied, graphs buy little there.
        flags += ["--disable-prefill-cuda-graph", "--disable-decode-cuda-graph"]
    if role == "decode":
        flags += ["--max-running-requests", str(DECODE_MAX_RUNNING_REQUESTS)]
        if device == "cuda":
            flags += ["--cuda-graph-max-bs-decode", str(DECODE_MAX_RUNNING_REQUESTS)]
        if cfg.decode_torch_compile:
            if device == "cpu":
                raise ConfigurationError(
                    "decode_torch_compile=True needs a GPU: on CPU, SGLang's compiled "
                    "graph path needs the intel_amx attention backend (torch_native has "
                    "no init_cpu_graph_state). Set decode_torch_compile=False on CPU."
                )
            flags += ["--enable-torch-compile"]
    return flags
