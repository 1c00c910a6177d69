"""Running real SGLang servers on a machine with no GPU.

Why a module of its own: everything a CPU server needs beyond the flags a GPU
server gets lives here, and only here (see ``/work/shared/docs/sglang-on-cpu.md``
for how each item was found):

- ``SGLANG_USE_CPU_ENGINE=1``: without it ``--device cpu`` still runs
  GPU-oriented code;
- the pure-PyTorch ``sgl_kernel`` stand-in first on ``PYTHONPATH`` (the CPU
  build of sgl-kernel is not on PyPI, the CUDA wheel cannot load here);
- ``OMP_NUM_THREADS=1`` and ``--sleep-on-idle``: idle schedulers busy-poll and
  torch threads oversubscribe the cores; these two keep several servers usable
  on a 2-core machine;
- two PD switches that steer around ``torch.cuda.Event`` / pinned-memory code;
- no crash diagnostics (a 5 s sleep and py-spy dump meant for GPUs);
- ``--max-total-tokens``: without a cap the KV pool is sized from free RAM
  (15 GB, 35 s of start-up);
- ``--disaggregation-decode-retraction-backup cpu_tensor`` on decode servers
  (the default host pool pins memory and needs an NVIDIA driver).

Detection avoids importing torch: the client process should stay light.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["sgl_kernel_standin_path", "gpu_count", "cuda_available", "cpu_server_env", "cpu_server_flags", "CPU_TRANSFER_BACKEND", "CPU_MAX_TOTAL_TOKENS"]

#: KV transfer backend that works without RDMA hardware.
CPU_TRANSFER_BACKEND = "mooncake_tcp"
#: KV pool cap per CPU server, in tokens (16 x 4096-token prompts).
CPU_MAX_TOTAL_TOKENS = 65536

_STANDIN_DIR = Path(__file__).resolve().parent / "_cpu_kernels"
_NVIDIA_DEVICE = re.compile(r"^nvidia\d+$")


def sgl_kernel_standin_path() -> Path:
    """Return the folder to put first on ``PYTHONPATH`` of CPU servers.

    It contains the package ``sgl_kernel`` (the pure-PyTorch stand-in).
    """
    return _STANDIN_DIR


def _visible_devices_hidden() -> bool:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1", "none", "NoDevFiles")


def gpu_count(timeout: float = 10.0) -> int:
    """Count NVIDIA GPUs visible to new processes, without importing torch.

    Honours ``CUDA_VISIBLE_DEVICES`` (an empty value or ``-1`` hides all GPUs,
    a list limits the count), then looks at ``/dev/nvidia<N>`` device nodes,
    then at ``nvidia-smi -L`` (bounded by ``timeout`` seconds).
    """
    if _visible_devices_hidden():
        return 0
    found = 0
    dev = Path("/dev")
    if dev.is_dir():
        found = sum(1 for p in dev.iterdir() if _NVIDIA_DEVICE.match(p.name))
    if found == 0 and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True,
                timeout=timeout, check=False,
            )
            if out.returncode == 0:
                found = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            found = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and found:
        found = min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def cuda_available() -> bool:
    """Tell whether SGLang servers here can run on NVIDIA GPUs."""
    return gpu_count() > 0


def cpu_server_env(role: str, ranks: int = 1) -> dict[str, str]:
    """Environment additions for one CPU server process.

    Parameters
    ----------
    role : str
        ``"prefill"``, ``"decode"`` or ``"colocated"`` (all get the same today).
    ranks : int
        Scheduler ranks of the server (``tp_size * dp_size``). SGLang on CPU
        refuses more ranks than NUMA nodes unless ``SGLANG_CPU_OMP_THREADS_BIND``
        gives each rank its cores: here one core each, round robin.

    Returns
    -------
    dict
        Variables to add to the launching process's environment.
        ``PYTHONPATH`` already includes the caller's current value, after the
        stand-in.
    """
    del role  # same for every role; the parameter keeps call sites uniform
    pythonpath = [str(sgl_kernel_standin_path())]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {}
    if ranks > 1:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    return {
        **env,
        "SGLANG_USE_CPU_ENGINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(pythonpath),
        # Avoid pin_memory + torch.cuda.Event in the prefill send path.
        "SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER": "1",
        # Avoid torch.cuda.Event in maybe_send_cached_prefix_chunk.
        "SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX": "0",
        # No GPU to "let settle": skip the 5 s sleep + py-spy/CUDA dumps a server
        # makes when a child dies, so stop, restart and crash detection are quick.
        "SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0",
        "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
    }


def cpu_server_flags(role: str) -> list[str]:
    """Extra ``launch_server`` arguments for one CPU server of ``role``.

    No CUDA-graph flags: on CPU SGLang captures graphs only with
    ``--enable-torch-compile`` and ignores the CUDA-graph settings.
    """
    flags = [
        "--device", "cpu",
        "--attention-backend", "torch_native",
        "--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS),
        "--sleep-on-idle",
    ]
    if role == "decode":
        flags += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
    return flags
