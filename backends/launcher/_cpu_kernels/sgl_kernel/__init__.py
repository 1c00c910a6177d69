"""A pure-PyTorch stand-in for the CPU build of ``sgl_kernel``.

Why this exists: with ``SGLANG_USE_CPU_ENGINE=1`` SGLang imports ``*_cpu`` ops
from ``sgl_kernel`` at module import time. Those ops exist only in the CPU
(Intel AMX) build of sgl-kernel, which PyPI does not ship; the PyPI wheel is
CUDA-only and cannot even be loaded without ``libcuda.so.1``. This package is
placed first on ``PYTHONPATH`` of CPU server processes only (see
``backends.launcher._cpu``) so that those imports succeed.

What it provides:

- ``assign_req_to_token_pool_cpu``: the one op a non-AMX CPU server can reach,
  implemented with the semantics of the Triton kernel
  ``assign_req_to_token_pool`` in ``sglang/srt/mem_cache/allocation.py``.
- any other ``*_cpu`` name resolves to a function that raises a
  ``NotImplementedError`` naming the op, so an unexpected call fails loudly
  instead of computing garbage.
- any other name raises ``AttributeError`` (so ``from sgl_kernel import X``
  raises ``ImportError`` and SGLang's own fallbacks take over).

It must never be on the path of a GPU server: it would hide the real kernels.
"""

from __future__ import annotations

__version__ = "0.0.0+sgl-pd-cpu-standin"

#: Marker callers can check to tell the stand-in from the real package.
IS_SGLPD_CPU_STANDIN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices,
    req_to_token,
    start_offset,
    end_offset,
    out_cache_loc,
    pool_len: int,
) -> None:
    """Write freshly allocated KV slots into each request's row of the pool.

    For request ``i`` with row ``r = req_pool_indices[i]`` and range
    ``[start_offset[i], end_offset[i])``, set
    ``req_to_token[r, start:end] = out_cache_loc[off:off + (end - start)]``
    where ``off`` is the sum of the lengths of the requests before ``i``.
    This is exactly what the Triton kernel does, one program per request.

    Parameters
    ----------
    req_pool_indices : torch.Tensor
        Row of ``req_to_token`` for each request, shape ``(bs,)``.
    req_to_token : torch.Tensor
        The request-to-token table, shape ``(rows, pool_len)``; written in place.
    start_offset, end_offset : torch.Tensor
        Per-request half-open ranges of token positions, shape ``(bs,)``.
    out_cache_loc : torch.Tensor
        Concatenated KV slot indices of all requests, in request order.
    pool_len : int
        Row length of ``req_to_token`` (kept for signature parity).
    """
    rows = req_pool_indices.tolist()
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        length = end - start
        if length <= 0:
            continue
        if end > pool_len:
            raise ValueError(
                f"assign_req_to_token_pool_cpu: range [{start}, {end}) exceeds "
                f"the row length {pool_len} of req_to_token"
            )
        req_to_token[row, start:end] = out_cache_loc[offset : offset + length].to(
            req_to_token.dtype
        )
        offset += length


def _missing_cpu_op(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by the pure-PyTorch CPU stand-in "
            f"(backends/_cpu_kernels/sgl_kernel). This SGLang code path needs the "
            f"CPU build of sgl-kernel; use a GPU server or a configuration that "
            f"avoids it (e.g. no speculative decoding, no torch.compile)."
        )

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str):
    """Resolve unknown ``*_cpu`` ops to loud placeholders; refuse anything else."""
    if name.endswith("_cpu"):
        return _missing_cpu_op(name)
    raise AttributeError(
        f"module 'sgl_kernel' (pure-PyTorch CPU stand-in) has no attribute {name!r}"
    )
