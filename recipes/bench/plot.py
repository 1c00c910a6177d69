"""The PNG: latency distributions and cache hit ratios per route.

One row per workload; columns: end-to-end latency and TTFT distributions
(box plots, one box per topology and route) and the hit ratio next to the best
achievable. Matplotlib's Agg backend, so it runs without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['topology']}\n{entry['route']}"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Write the figure of every (topology, workload, route) entry of ``results`` to ``path``."""
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    width = max(12.0, 1.4 * max(sum(r["workload"] == w for r in results) for w in workloads))
    fig, axes = plt.subplots(len(workloads), 3, figsize=(width, 4.2 * len(workloads)), squeeze=False)
    for row, workload in enumerate(workloads):
        entries = [r for r in results if r["workload"] == workload]
        labels = [_label(e) for e in entries]
        for col, (key, title) in enumerate((("e2e", "end-to-end latency (s)"), ("ttft", "TTFT (s)"))):
            ax = axes[row][col]
            data = [e["latencies"][key] or [float("nan")] for e in entries]
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{workload}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        ax = axes[row][2]
        positions = range(len(entries))
        ax.bar([p - 0.2 for p in positions], [e["metrics"]["cache_hit_ratio"] for e in entries], width=0.4,
               label="hit ratio")
        ax.bar([p + 0.2 for p in positions], [e["metrics"]["best_hit_ratio"] for e in entries], width=0.4,
               label="best achievable", alpha=0.5)
        ax.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{workload}: cache hit ratio (cached / prompt tokens)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
