"""What one server spends on each phase of a request: the planner's cost model.

The shape follows the per-phase latency models of DistServe (Zhong et al.,
OSDI'24, section 4: prefill time linear in tokens plus a quadratic attention
term, decode step time linear in batch and context) and the profiles of
Dynamo's SLA planner (prefill time by input length, decode step time by
batch and context). All times in seconds, sizes in tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CostModel", "H200_LLAMA8B_EAGER"]

#: Measured points copied from ``h200-llama8b-eager-costs.json`` (the project's shared reference data,
#: produced by ``h200_calibrate.py``, 2026-11-30): one NVIDIA H200, Llama-3.1-8B shape, random bf16
#: weights, PyTorch 2.11 eager + SDPA. Prefill: (prompt_tokens, cached_tokens, seconds); decode:
#: (batch, context, eager seconds per step). Physical constants of the same run beside them.
H200_LLAMA8B_EAGER: dict[str, Any] = {
    "prefill": [(256, 0, .07687), (256, 128, .02392), (256, 230, .02345), (256, 253, .02364),
                (512, 0, .06655), (512, 256, .02263), (512, 460, .02328), (512, 506, .0226),
                (1024, 0, .08523), (1024, 512, .03827), (1024, 921, .02208), (1024, 1013, .02289),
                (2048, 0, .13913), (2048, 1024, .03584), (2048, 1843, .02328), (2048, 2027, .0229),
                (4096, 0, .30154), (4096, 2048, .07551), (4096, 3686, .02399), (4096, 4055, .02237),
                (8192, 0, .75015), (8192, 4096, .1736), (8192, 7372, .0466), (8192, 8110, .02461),
                (16384, 0, 2.50853), (16384, 8192, .46228), (16384, 14745, .1132), (16384, 16220, .04017)],
    "decode": [(1, 1024, .01922), (8, 1024, .02202), (32, 1024, .02398), (64, 1024, .0387),
               (128, 1024, .06714), (256, 1024, .12398), (1, 4096, .02011), (8, 4096, .02429),
               (32, 4096, .06587), (64, 4096, .12119)],
    "params": 8_030_261_248, "kv_bytes_per_token": 131_072, "copy_bandwidth_Bps": 4245e9,
    "gemm_flops": 790e12, "hbm_bytes": 141e9,
}


@dataclass(frozen=True)
class CostModel:
    """Per-phase costs of one server (at its TP size), and its scheduling limits.

    Parameters
    ----------
    prefill_base_s : float
        Fixed time of one prefill forward (kernel launches, scheduling), s.
    prefill_token_s : float
        Time per uncached prompt token in a forward (GEMMs), s/token.
    prefill_attn_s : float
        Attention time per (uncached token, context token) pair, s. A request
        with ``u`` uncached tokens after ``c`` cached ones has ``u * (c + u/2)`` pairs.
    decode_base_s : float
        Fixed time of one decode step (weights read, launches), s.
    decode_seq_s : float
        Time per running request per decode step, s.
    decode_ctx_s : float
        Time per KV token of the whole running batch per decode step, s/token.
    transfer_base_s, transfer_token_s : float
        KV hand-off from prefill to decode: fixed s per request, s per prompt token moved.
    request_overhead_s : float
        Per request outside the engines (HTTP, tokenizing, routing), s; added before the prefill queue.
    decode_overhead_s : float
        Per request on the decode side outside its steps (joining the batch, detokenizing, the
        answer), s; added to the end-to-end time, so it shows in TPOT as ``/ (output - 1)``.
    kv_capacity_tokens : int
        KV pool of one server in tokens (SGLang's ``max_total_num_tokens``): the radix cache
        size of a prefill server, the running context limit of a decode server.
    max_prefill_tokens : int
        Uncached tokens per prefill forward (SGLang's ``chunked_prefill_size``); longer prompts are chunked.
    max_running_requests : int
        Running requests per decode server.
    source : str
        Where the numbers come from.
    """

    prefill_base_s: float = 0.0
    prefill_token_s: float = 0.0
    prefill_attn_s: float = 0.0
    decode_base_s: float = 0.0
    decode_seq_s: float = 0.0
    decode_ctx_s: float = 0.0
    transfer_base_s: float = 0.0
    transfer_token_s: float = 0.0
    request_overhead_s: float = 0.0
    decode_overhead_s: float = 0.0
    kv_capacity_tokens: int = 1_000_000
    max_prefill_tokens: int = 8192
    max_running_requests: int = 256
    source: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "source" and (not np.isfinite(value) or value < 0):
                raise ValueError(f"CostModel.{f.name} must be a finite number >= 0, got {value!r}")
        for name in ("kv_capacity_tokens", "max_prefill_tokens", "max_running_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"CostModel.{name} must be >= 1, got {getattr(self, name)!r}")

    # ----- the costs -----------------------------------------------------------------
    def prefill_time(self, uncached, cached=0) -> float:
        """Seconds of one prefill forward over a batch.

        Parameters
        ----------
        uncached, cached : int or sequence of int
            Per request of the batch: prompt tokens computed, and tokens found in the radix cache.
        """
        u = np.atleast_1d(np.asarray(uncached, dtype=float))
        c = np.broadcast_to(np.asarray(cached, dtype=float), u.shape)
        return float(self.prefill_base_s + self.prefill_token_s * u.sum() + self.prefill_attn_s * (u * (c + u / 2)).sum())

    def decode_step_time(self, batch: int, context_tokens: float) -> float:
        """Seconds of one decode step for ``batch`` running requests holding ``context_tokens`` KV tokens in all."""
        return self.decode_base_s + self.decode_seq_s * batch + self.decode_ctx_s * context_tokens

    def transfer_time(self, tokens: int) -> float:
        """Seconds to move the KV of ``tokens`` prompt tokens from a prefill to a decode server."""
        return self.transfer_base_s + self.transfer_token_s * tokens

    # ----- variants and persistence ----------------------------------------------------
    def with_tp(self, tp: int, efficiency: float = 0.85) -> "CostModel":
        """The same model at tensor-parallel size ``tp`` (an ASSUMPTION, not a measurement).

        Per-token, per-step and transfer terms shrink by ``1 + (tp - 1) * efficiency``; per-request
        overheads and the prefill base stay; the KV pool grows ``tp``-fold (weights are sharded).
        """
        if tp == 1:
            return self
        speedup = 1 + (tp - 1) * efficiency
        scaled = {k: getattr(self, k) / speedup for k in ("prefill_token_s", "prefill_attn_s", "decode_base_s",
                                                          "decode_seq_s", "decode_ctx_s", "transfer_token_s")}
        return replace(self, **scaled, kv_capacity_tokens=self.kv_capacity_tokens * tp,
                       source=f"{self.source} [scaled to TP={tp}, assumed efficiency {efficiency}]")

    def to_json(self, path: str | Path | None = None) -> str:
        """The model as JSON text; also written to ``path`` when given."""
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CostModel":
        """Read a model from JSON text or from a file path; unknown keys are refused."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown CostModel field(s) {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**data)

    @classmethod
    def h200_llama8b(cls, kind: str = "eager") -> "CostModel":
        """One H200 serving a Llama-3.1-8B-shaped model (TP=1), from the project's reference data.

        Source: ``h200-llama8b-eager-costs.json`` (plain PyTorch 2.11 eager + SDPA, random bf16
        weights, 2026-11-30); its points are copied in :data:`H200_LLAMA8B_EAGER`.

        ``kind="eager"`` (an UPPER bound on SGLang): decode = non-negative least squares of the 10
        eager step times (within 20%; ~17 ms of it is eager launch overhead that SGLang's CUDA
        graphs remove); prefill per-token term = the GEMM bound (16 GFLOP/token at 790 TFLOP/s),
        base and attention fitted (relative error) on the 21 points with a cached prefix (17 of
        them within 15%, worst -25% / +36%). The 7 points without a cache are left out: eager
        transformers pays ~45 ms and ~5x attention extra on that path (16k tokens: 2.51 s measured,
        0.66 s modelled), which SGLang does not.

        ``kind="bound"`` (a LOWER bound): prefill at the GEMM rate plus attention at 4 FLOP x 4096 x
        32 layers per pair, no base; decode reads weights + KV once per step at the measured 4.2 TB/s.

        Not measured, assumed for both: KV transfer at 50 GB/s (one 400 Gb/s RDMA NIC per GPU) +
        1 ms, 2 ms per request outside the engine, KV pool = 0.9 x 141 GB minus weights, SGLang's
        H200 defaults (``chunked_prefill_size`` 8192, CUDA-graph batch 256). Real SGLang lies
        between the two kinds: read a plan as robust only when both kinds agree.
        """
        ref = H200_LLAMA8B_EAGER
        kv, bw = ref["kv_bytes_per_token"], ref["copy_bandwidth_Bps"]
        token_s = 2 * ref["params"] / ref["gemm_flops"]
        common = dict(transfer_base_s=1e-3, transfer_token_s=kv / 50e9, request_overhead_s=2e-3,
                      kv_capacity_tokens=int((0.9 * ref["hbm_bytes"] - 2 * ref["params"]) / kv),
                      max_prefill_tokens=8192, max_running_requests=256)
        if kind == "bound":
            return cls(prefill_token_s=token_s, prefill_attn_s=4 * 4096 * 32 / ref["gemm_flops"],
                       decode_base_s=2 * ref["params"] / bw, decode_ctx_s=kv / bw,
                       source="H200 Llama-3.1-8B physical lower bound (GEMM rate, HBM bandwidth)", **common)
        if kind != "eager":
            raise ValueError(f"kind must be 'eager' or 'bound', got {kind!r}")
        warm = np.array([p for p in ref["prefill"] if p[1] > 0], dtype=float)
        u, c, t = warm[:, 0] - warm[:, 1], warm[:, 1], warm[:, 2]
        base, attn = _nnls(np.column_stack([np.ones_like(u), u * (c + u / 2)]) / t[:, None], 1 - token_s * u / t)
        dec = np.array(ref["decode"], dtype=float)
        b, ctx, step = dec[:, 0], dec[:, 1], dec[:, 2]
        d_base, d_seq, d_ctx = _nnls(np.column_stack([np.ones_like(b), b, b * ctx]) / step[:, None], np.ones_like(b))
        return cls(prefill_base_s=float(base), prefill_token_s=token_s, prefill_attn_s=float(attn),
                   decode_base_s=float(d_base), decode_seq_s=float(d_seq), decode_ctx_s=float(d_ctx),
                   source="H200 Llama-3.1-8B eager PyTorch fit (upper bound), h200-llama8b-eager-costs.json", **common)


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (drop the most negative, refit; for a handful of columns)."""
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        if active:
            x[active] = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        if not active or x[active].min() >= 0:
            return x
        active.remove(active[int(np.argmin(x[active]))])
