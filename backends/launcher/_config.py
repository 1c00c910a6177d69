"""The user's description of a PD deployment, validated up front.

Why: a prefill/decode deployment is a handful of SGLang servers whose flags
must agree. :class:`SGLangPDConfig` holds the few choices a user makes and
rejects bad ones at construction with a message naming the field and the fix
(never mid-launch). How those choices become ``launch_server`` commands lives
in :mod:`backends.launcher._launch_plan`; :meth:`SGLangPDConfig.servers` hands over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from backends.errors import ConfigurationError
from backends.launcher import _cpu as cpu
from backends.launcher._tiny_model import PREFILL_BOUND_MODEL, is_tiny_model, random_model_kind

__all__ = ["PRESETS", "PORT_STRIDE", "ROLES", "SGLangPDConfig"]

ROLES = ("prefill", "decode", "colocated")
#: Ports each server owns from its base (see ``_launch_plan``); the config checks they fit below 65536.
PORT_STRIDE = 10

PRESETS: dict[str, dict] = {
    "small": dict(model_path="microsoft/phi-2", pd_ratio=(1, 2), tp_size=1,
                  mem_fraction_static=0.8),
    "medium": dict(model_path="meta-llama/Llama-2-7b-hf", pd_ratio=(2, 4), tp_size=2,
                   mem_fraction_static=0.9),
    "large": dict(model_path="meta-llama/Llama-2-70b-hf", pd_ratio=(4, 8), tp_size=8,
                  mem_fraction_static=0.95),
}


@dataclass(frozen=True)
class SGLangPDConfig:
    """A prefill/decode (plus optional colocated) SGLang deployment.

    Parameters
    ----------
    model_path : str, optional
        Hugging Face id or local folder; ``None`` (or ``TINY_MODEL``,
        ``"sglpd:tiny"``) builds and uses the tiny random model,
        ``PREFILL_BOUND_MODEL`` (``"sglpd:prefill-bound"``) the prefill-bound
        one: same tokenizer, but prefill costs ~0.7 s per 1,000 tokens on a
        CPU core, so prefix-cache hits show as latency. Either is built at
        cluster start, once per machine.
    pd_ratio : tuple of int or str
        Prefill and decode server counts, ``(P, D)`` or ``"P:D"``. ``(0, 0)``
        with ``colocated >= 1`` runs ordinary servers only (baselines).
    colocated : int
        Number of ordinary (non-PD) servers launched alongside.
    tp_size : int
        Tensor-parallel size of every server.
    mem_fraction_static : float, optional
        Passed as ``--mem-fraction-static``; ``None`` keeps SGLang's default.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` uses CUDA when a GPU is visible, else the CPU engine.
    transfer_backend : {"auto", "mooncake", "mooncake_tcp", "nixl"}
        KV transfer; ``"auto"`` is ``mooncake`` on GPU, ``mooncake_tcp`` on CPU.
    host : str
        Interface every server binds and is addressed by.
    base_port : int
        First port of the port plan (see :mod:`backends.launcher._launch_plan`).
    prefill_args, decode_args, colocated_args : sequence of str
        Extra ``launch_server`` arguments per role, appended last so they
        override the role defaults.
    decode_torch_compile : bool
        Add ``--enable-torch-compile`` to decode servers.
    kv_events : bool
        Prefill and colocated servers publish their radix cache's KV events
        and their load over ZeroMQ (``--kv-events-config``,
        ``--load-publish-endpoint``), so every client routes on what each cache
        really holds and on every client's load. On by default; ``False``
        leaves clients their approximate per-process prefix record.
    metrics : bool
        Every server exports Prometheus metrics on ``/metrics``
        (``--enable-metrics``): among them the KV transfer latency, speed and
        failures that ``PDClient.transfer_stats()`` reads. On by default.

    Raises
    ------
    ConfigurationError
        A field is invalid (the message names it and the fix); also a ``ValueError``.
    """

    model_path: str | None = None
    pd_ratio: tuple[int, int] | str = (1, 1)
    colocated: int = 0
    tp_size: int = 1
    mem_fraction_static: float | None = None
    device: str = "auto"
    transfer_backend: str = "auto"
    host: str = "127.0.0.1"
    base_port: int = 30000
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    colocated_args: tuple[str, ...] = ()
    decode_torch_compile: bool = False
    kv_events: bool = True
    metrics: bool = True

    def __post_init__(self) -> None:
        for name, value in _validated(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SGLangPDConfig":
        """Build a config from a named preset (``small``/``medium``/``large``).

        Raises
        ------
        ConfigurationError
            Unknown preset or override name.
        """
        if name not in PRESETS:
            raise ConfigurationError(
                f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigurationError(
                f"preset: unknown override(s) {unknown}; valid fields are {sorted(known)}."
            )
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_prefill(self) -> int:
        return self.pd_ratio[0]

    @property
    def num_decode(self) -> int:
        return self.pd_ratio[1]

    @property
    def num_servers(self) -> int:
        return self.num_prefill + self.num_decode + self.colocated

    def resolved_device(self) -> str:
        """``"cpu"`` or ``"cuda"``; ``"auto"`` probes for GPUs (no torch import)."""
        if self.device != "auto":
            return self.device
        return "cuda" if cpu.cuda_available() else "cpu"

    def resolved_transfer_backend(self, device: str | None = None) -> str:
        """The ``--disaggregation-transfer-backend`` value for ``device``."""
        if self.transfer_backend != "auto":
            return self.transfer_backend
        device = device or self.resolved_device()
        return cpu.CPU_TRANSFER_BACKEND if device == "cpu" else "mooncake"

    @property
    def is_tiny_model(self) -> bool:
        """True when the servers will run a random model (tiny or prefill-bound: nonsense text)."""
        return self.model_path is None or is_tiny_model(self.model_path)

    @property
    def random_model_kind(self) -> str | None:
        """``"tiny"`` or ``"prefill-bound"`` when the launcher builds that model; ``None`` otherwise."""
        return random_model_kind(self.model_path)


_DEVICES = ("auto", "cpu", "cuda")
_TRANSFER_BACKENDS = ("auto", "mooncake", "mooncake_tcp", "nixl")
#: Flags the launcher owns: setting them through *_args would break the plan.
_OWNED_FLAGS = {
    "--model-path": "model_path", "--host": "host", "--port": "base_port",
    "--nccl-port": "base_port", "--tp-size": "tp_size", "--tp": "tp_size",
    "--tensor-parallel-size": "tp_size",
    "--device": "device", "--disaggregation-mode": "pd_ratio",
    "--disaggregation-bootstrap-port": "base_port",
    "--disaggregation-transfer-backend": "transfer_backend",
    "--mem-fraction-static": "mem_fraction_static",
}


def _int_field(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _parse_ratio(value) -> tuple[int, int]:
    hint = 'give (prefill, decode) as a pair of integers, e.g. (1, 2) or "1:2"'
    if isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigurationError(f"pd_ratio {value!r} is not of the form 'P:D'; {hint}.")
        return int(parts[0]), int(parts[1])
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return tuple(_int_field("pd_ratio", v, 0) for v in value)  # type: ignore[return-value]
    raise ConfigurationError(f"pd_ratio {value!r} is invalid; {hint}.")


def _args_field(name: str, value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise ConfigurationError(
            f"{name} must be a list of separate strings such as ['--flag', 'value'], "
            f"got {value!r}."
        )
    for arg in value:
        flag = arg.split("=", 1)[0]
        if flag in _OWNED_FLAGS:
            raise ConfigurationError(
                f"{name} sets {flag}, which the launcher derives from the config field "
                f"{_OWNED_FLAGS[flag]!r}; set that field instead."
            )
    return tuple(value)


def _validated(cfg: SGLangPDConfig) -> dict:
    """Check every field; return the normalised values (ratio and args as tuples)."""
    ratio = _parse_ratio(cfg.pd_ratio)
    colocated = _int_field("colocated", cfg.colocated, 0)
    if (ratio[0] == 0) != (ratio[1] == 0):
        raise ConfigurationError(
            f"pd_ratio {ratio} has a zero side: PD needs at least one prefill AND one "
            f"decode server; use (0, 0) with colocated >= 1 for ordinary servers only."
        )
    if sum(ratio) + colocated == 0:
        raise ConfigurationError("pd_ratio is (0, 0) and colocated is 0: nothing to launch; "
                         "set pd_ratio (e.g. '1:1') or colocated >= 1.")
    _int_field("tp_size", cfg.tp_size, 1)
    mem = cfg.mem_fraction_static
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float))
                            or not 0.0 < mem < 1.0):
        raise ConfigurationError(f"mem_fraction_static must be None or a number in (0, 1), got {mem!r}.")
    if cfg.device not in _DEVICES:
        raise ConfigurationError(f"device must be one of {_DEVICES}, got {cfg.device!r}.")
    if cfg.transfer_backend not in _TRANSFER_BACKENDS:
        raise ConfigurationError(
            f"transfer_backend must be one of {_TRANSFER_BACKENDS}, got "
            f"{cfg.transfer_backend!r} ('fake' cannot serve real pairs)."
        )
    if not isinstance(cfg.host, str) or not cfg.host.strip():
        raise ConfigurationError(f"host must be a non-empty host name or IP, got {cfg.host!r}.")
    model = os.fspath(cfg.model_path) if isinstance(cfg.model_path, os.PathLike) \
        else cfg.model_path
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ConfigurationError(f"model_path must be None (tiny model), {PREFILL_BOUND_MODEL!r}, a path "
                         f"or a Hugging Face id, got {cfg.model_path!r}.")
    random_model_kind(model)  # an unknown "sglpd:<kind>" fails here, not at launch
    _int_field("base_port", cfg.base_port, 1024)
    last = cfg.base_port + PORT_STRIDE * (sum(ratio) + colocated) - 1
    if last > 65535:
        raise ConfigurationError(f"base_port {cfg.base_port} leaves too few ports: the plan needs up "
                         f"to {last} (> 65535); choose a lower base_port.")
    if not isinstance(cfg.decode_torch_compile, bool):
        raise ConfigurationError(f"decode_torch_compile must be True or False, "
                         f"got {cfg.decode_torch_compile!r}.")
    for flag in ("kv_events", "metrics"):
        if not isinstance(getattr(cfg, flag), bool):
            raise ConfigurationError(f"{flag} must be True or False, got {getattr(cfg, flag)!r}.")
    return dict(pd_ratio=ratio, model_path=model, **{f"{r}_args": _args_field(f"{r}_args", getattr(cfg, f"{r}_args"))
                                   for r in ROLES})
