"""Accuracy-vs-epsilon plots (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kit.io import atomic_write


def exact_curve(eps_star: Sequence[float | None], eps_max: float) -> tuple[list[float], list[float]]:
    """The accuracy curve as a step function with a step at every eps* (``None`` = never fooled)."""
    n = len(eps_star)
    found = sorted(e for e in eps_star if e is not None and e <= eps_max)
    xs, ys = [0.0], [1.0 - sum(e == 0 for e in found) / n]
    fooled = sum(e == 0 for e in found)
    for e in found:
        if e == 0:
            continue
        fooled += 1
        xs.append(e)
        ys.append(1.0 - fooled / n)
    xs.append(eps_max)
    ys.append(ys[-1])
    return xs, ys


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """One panel per norm; one line per record (``label``/``name``, ``eps_grid``, ``accuracy``, ``auac``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = sorted({r["norm"] for r in records})
    fig, axes = plt.subplots(1, max(len(norms), 1), figsize=(5.5 * max(len(norms), 1), 4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for r in (r for r in records if r["norm"] == norm):
            label = f"{r.get('label', r['name'])} (AUAC {r['auac']:.3f})"
            xs, ys = exact_curve(r["eps_star"], r["eps_max"]) if "eps_star" in r else (r["eps_grid"], r["accuracy"])
            ax.plot(xs, ys, drawstyle="steps-post", label=label, linestyle=r.get("style", "-"))
        ax.set_xlabel(f"epsilon ({'L-inf' if norm == 'linf' else norm.upper()})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
