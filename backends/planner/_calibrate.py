"""Fit a :class:`CostModel` to what a short profiling run measured.

Inputs are the adapter's per-request records (``backend.metrics.records()``, as objects or
dicts) and, optionally, SGLang's own counters from ``GET /v1/loads`` taken before and after
the run. The fits are least squares on relative error (numpy), coefficients kept >= 0, in
the spirit of Dynamo's SLA-planner profiler (time per phase against tokens and batch):

- prefill leg (``prefill_latency``, else ``ttft``) of requests whose leg overlapped no other's:
  ``intercept + prefill_token_s * u + prefill_attn_s * u * (c + u/2) + transfer_token_s * L``,
  with ``u`` uncached, ``c`` cached, ``L = u + c`` prompt tokens. The transfer term is told
  apart from the prefill term only when cached prefixes vary (otherwise it is folded in);
- decode (``decode_time``, over ``completion_tokens - 1`` steps):
  ``decode_overhead_s + steps * (decode_base_s + decode_seq_s * B + decode_ctx_s * K)``, where ``B`` and ``K``
  are the mean running batch and its KV tokens while the request decoded, from the overlap
  of requests' decode windows when records carry ``start`` (send time, s; same clock), else 1
  and its own context.

The prefill intercept is request overhead + prefill base + transfer base. With ``/v1/loads``
snapshots, the prefill server's busy-time counter sets the base, its last KV-transfer latency
the transfer base, and the rest is per-request overhead; without them all of it goes to
``prefill_base_s`` (exact for unbatched prefills, pessimistic for batched ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from backends.planner._costs import CostModel, _nnls

__all__ = ["Calibration", "calibrate"]


@dataclass(frozen=True)
class Calibration:
    """A fitted :class:`CostModel` and how well it fits (``report``: records used, RMS relative error, notes)."""

    costs: CostModel
    report: dict[str, Any] = field(default_factory=dict)


def _get(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def _loads(snapshots: Sequence[Mapping] | None) -> list[dict]:
    """Rank-0 load dicts of each ``/v1/loads`` answer (or of bare load dicts)."""
    out = []
    for snap in snapshots or ():
        loads = snap.get("loads", [snap])
        out.append(next((l for l in loads if l.get("dp_rank", 0) == 0), loads[0]))
    return out


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """Non-negative least squares on relative error; once refitted without outliers (beyond 3 robust sigmas, min 10%)."""
    coef = _nnls(x / y[:, None], np.ones_like(y))
    res = x @ coef / y - 1
    keep = np.abs(res) <= max(3 * 1.4826 * np.median(np.abs(res - np.median(res))), 0.1)
    if not keep.all() and keep.sum() >= x.shape[1] + 2:
        coef = _nnls(x[keep] / y[keep, None], np.ones(int(keep.sum())))
        res = x[keep] @ coef / y[keep] - 1
    return coef, {"records": int(keep.sum()) if keep.sum() >= x.shape[1] + 2 else len(y), "outliers_dropped":
                  int((~keep).sum()) if keep.sum() >= x.shape[1] + 2 else 0, "rms_rel_err": float(np.sqrt(np.mean(res ** 2)))}


def calibrate(records: Iterable[Any], *, loads: Mapping[str, Sequence[Mapping]] | None = None,
              base: CostModel | None = None, source: str = "calibrated") -> Calibration:
    """Fit prefill, transfer and decode costs; other fields come from ``base`` (or the defaults).

    Parameters
    ----------
    records
        Successful requests: ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``,
        ``prefill_latency`` or ``ttft``, ``decode_time`` (s), optional ``start`` (s) and ``decode``
        (server, to group decode overlap).
    loads
        ``{"prefill": [first, last], "decode": [first, last]}`` answers of ``/v1/loads``.
        Used: ``total_prefill_busy_us``, ``disaggregation.kv_transfer_latency_ms``,
        ``max_total_num_tokens`` (prefill), ``max_running_requests`` and ``decode_moments`` (decode).
    """
    rows = [r for r in records if _get(r, "error") is None]
    base, notes, report = base or CostModel(), [], {}
    start = np.array([_get(r, "start") or 0.0 for r in rows])
    has_start = all(_get(r, "start") is not None for r in rows)
    L = np.array([_get(r, "prompt_tokens") for r in rows], dtype=float)
    c = np.array([_get(r, "cached_tokens") or 0 for r in rows], dtype=float)
    u = L - c
    n = np.array([_get(r, "completion_tokens") for r in rows], dtype=float)
    leg = np.array([_get(r, "prefill_latency") or _get(r, "ttft") or np.nan for r in rows], dtype=float)
    dec = np.array([_get(r, "decode_time") if _get(r, "decode_time") is not None else np.nan for r in rows], dtype=float)

    # ----- prefill + transfer -----
    use = np.isfinite(leg) & (leg > 0)
    if has_start:  # only legs that had the prefill server to themselves
        a, b = start, start + np.nan_to_num(leg)
        overlaps = (a[:, None] < b[None, :]) & (a[None, :] < b[:, None])
        use &= overlaps.sum(axis=1) == 1
    if use.sum() < 3:
        raise ValueError(f"calibration needs >= 3 isolated prefill legs, got {int(use.sum())}: "
                         "send some requests one at a time")
    cols = [np.ones_like(u), u, u * (c + u / 2)]
    split = np.ptp(c[use]) > 0.1 * max(np.ptp(L[use]), 1)
    if split:
        cols.append(L)
    else:
        notes.append("cached tokens did not vary: KV transfer per token folded into prefill_token_s")
    coef, report["prefill"] = _fit(np.column_stack(cols)[use], leg[use])
    intercept, token_s, attn_s = coef[:3]
    transfer_token_s = coef[3] if split else 0.0
    report["prefill"]["intercept_s"] = float(intercept)

    p_loads, d_loads = (_loads((loads or {}).get(role)) for role in ("prefill", "decode"))
    prefill_base, transfer_base = float(intercept), 0.0
    if len(p_loads) >= 2:
        busy = (p_loads[-1]["total_prefill_busy_us"] - p_loads[0]["total_prefill_busy_us"]) / 1e6
        compute = token_s * u.sum() + attn_s * (u * (c + u / 2)).sum()
        prefill_base = float(np.clip((busy - compute) / len(rows), 0.0, intercept))
        latency_ms = (p_loads[-1].get("disaggregation") or {}).get("kv_transfer_latency_ms", 0.0)
        transfer_base = float(np.clip(latency_ms / 1e3 - transfer_token_s * L[-1], 0.0, intercept - prefill_base))
        report["prefill"]["server_busy_s"] = busy
    else:
        notes.append("no /v1/loads: request overhead and transfer base are counted in prefill_base_s")
    limits = {}
    if p_loads and p_loads[-1].get("max_total_num_tokens"):
        limits["kv_capacity_tokens"] = int(p_loads[-1]["max_total_num_tokens"])
    if d_loads and d_loads[-1].get("max_running_requests"):
        limits["max_running_requests"] = int(d_loads[-1]["max_running_requests"])

    # ----- decode -----
    ok = np.isfinite(dec) & (n >= 2) & (dec > 0)
    if ok.sum() < 3:
        raise ValueError(f"calibration needs >= 3 requests with >= 2 completion tokens, got {int(ok.sum())}")
    ctx = L + n / 2
    batch, kv = np.ones_like(L), ctx.copy()
    if has_start:
        server = np.unique([str(_get(r, "decode")) for r in rows], return_inverse=True)[1]
        a = start + np.nan_to_num(leg)
        b = a + np.nan_to_num(dec)
        same = (server[:, None] == server[None, :]) & ok[None, :]
        share = np.clip(np.minimum(b[:, None], b[None, :]) - np.maximum(a[:, None], a[None, :]), 0, None) * same
        dur = np.maximum(b - a, 1e-12)
        batch, kv = share.sum(axis=1) / dur, share @ ctx / dur
    steps = n - 1
    vary = np.ptp(batch[ok]) > 0.05
    if not vary:
        notes.append("decode batch did not vary: decode_seq_s folded into decode_base_s (run requests concurrently)")
    dcols = [np.ones_like(steps), steps, steps * batch, steps * kv]
    dcoef, report["decode"] = _fit(np.column_stack(dcols if vary else dcols[:2] + dcols[3:])[ok], dec[ok])
    d_over, d_base, d_seq, d_ctx = dcoef if vary else (dcoef[0], dcoef[1], 0.0, dcoef[2])
    report["decode"]["mean_batch"] = float(batch[ok].mean())
    if len(d_loads) >= 2 and d_loads[-1].get("decode_moments") and d_loads[0].get("decode_moments") is not None:
        m = np.subtract(d_loads[-1]["decode_moments"], d_loads[0]["decode_moments"] or 0)
        if m[0] > 0:  # server-side check: mean step time and batch over the run
            report["decode"]["server_mean_step_s"] = m[2] / m[0] / 1e6
            report["decode"]["server_mean_batch"] = m[1] / m[0]

    costs = replace(base, prefill_base_s=prefill_base, prefill_token_s=float(token_s), prefill_attn_s=float(attn_s),
                    transfer_base_s=transfer_base, transfer_token_s=float(transfer_token_s),
                    request_overhead_s=float(intercept) - prefill_base - transfer_base,
                    decode_base_s=float(d_base), decode_seq_s=float(d_seq), decode_ctx_s=float(d_ctx),
                    decode_overhead_s=float(d_over),
                    source=source, **limits)
    report["notes"] = notes
    return Calibration(costs, report)
