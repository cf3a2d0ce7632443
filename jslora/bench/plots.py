"""PNG plots of a bench sweep (matplotlib, headless)."""
from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(rows: list[dict], path) -> None:
    """Throughput (req/s) against the number of adapters: a line per system and rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict = {}
    for r in rows:
        if "throughput_req_s" in r:
            lines.setdefault((r["system"], r["rate"], r["cv"]), []).append((r["num_adapters"], r["throughput_req_s"]))
    for (system, rate, cv), points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{system} @ {rate:g} req/s, cv {cv:g}")
    ax.set_xlabel("number of adapters")
    ax.set_ylabel("throughput (req/s)")
    counts = sorted({p[0] for pts in lines.values() for p in pts})
    if any(c > 0 for c in counts):
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(counts, [str(c) for c in counts])  # every measured count labelled, nothing else
    ax.minorticks_off()
    ax.set_ylim(bottom=0)  # from zero: a 0.1% wobble must not look like a collapse
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_cdf(runs: dict, path) -> None:
    """CDF of first-token latency, a curve per run (dropped requests never reach 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (system, n, rate, cv), records in runs.items():
        ttft = np.sort([r.first_token - r.arrival for r in records if r.first_token is not None and r.error is None])
        if len(ttft):
            ax.step(ttft, np.arange(1, len(ttft) + 1) / len(records), where="post",
                    label=f"{system} n={n} {rate:g} req/s cv {cv:g}")
    ax.set_xlabel("first-token latency (s)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
