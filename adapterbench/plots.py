"""PNG plots: fusion attention heatmaps (Pfeiffer et al. 2021, Fig. 4/6 style)."""

from __future__ import annotations

from pathlib import Path

from .runs import atomic_write


def attention_heatmap(rows: list[list[float]], names: list[str], path: Path, title: str = "",
                      row_names: list[str] | None = None) -> None:
    """Layers (rows; or `row_names`, e.g. target tasks) x source adapters (columns), mean attention in each cell."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(len(names), 1), 1.2 + 0.45 * max(len(rows), 1)))
    im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=float(np.nanmax(rows)) if rows else 1.0, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), row_names or [f"layer {i}" for i in range(len(rows))])
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def metric_bars(rep, path: Path) -> None:
    """Per-task bars, one per method, with std error bars over seeds."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    tasks, rows = rep.tasks, rep.rows
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(tasks), 4.0))
    x = np.arange(len(tasks))
    for i, row in enumerate(rows):
        means = [row.cells[t].mean if t in row.cells else np.nan for t in tasks]
        stds = [row.cells[t].std if t in row.cells else 0.0 for t in tasks]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=row.label)
    names = getattr(rep, "metric_names", {})
    ax.set_xticks(x, [f"{t}\n({names[t]})" if t in names else t for t in tasks])
    for i, t in enumerate(tasks):   # each task's majority-class baseline, as a dashed line over its group
        if t in getattr(rep, "majority", {}):
            ax.hlines(rep.majority[t], i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                      label="majority class" if i == 0 or not any(u in rep.majority for u in tasks[:i]) else None)
    metric = getattr(rep, "metric", None)
    ax.set_ylabel(f"{metric} or main metric (dev)" if metric else "main metric (dev)")
    lo = min([c.mean - c.std for r in rows for c in r.cells.values()] + list(getattr(rep, "majority", {}).values()),
             default=0.0)
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.legend(fontsize=8, ncol=min(len(rows), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
