"""PNG plots of reports: bars with error bars per row and task, and the claims' forest plot. (A
fusion run's attention heatmap is drawn by the run itself: recipe.runmodel.attention_heatmap.)"""

from __future__ import annotations

from pathlib import Path

from adapterbench.fileio import atomic_write


def metric_bars(rep, path: Path) -> None:
    """Per-task bars, one per method, with std error bars over seeds."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False      # a label with "$" is text, not TeX math
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside the bars,
    ax.grid(axis="y", alpha=0.3)                                                            # never over them
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def forest_plot(claims: list[tuple], path: Path) -> None:
    """One line per claim (label, Δ, (ci lo, hi), paper Δ or None, [(task, Δ, ci or None)]): our
    stratified Δ with its 95% CI (thick), each task's Δ and CI below it (thin, grey), the paper's
    Δ as a red diamond, and 0 as a vertical line; the legend sits below the axes."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False      # a label with "$" is text, not TeX math
    import matplotlib.pyplot as plt
    lines = []   # (y label, delta, ci, paper, bold)
    for label, delta, ci, paper, tasks in claims:
        lines.append((label if len(label) <= 60 else label[:57] + "...", delta, ci, paper, True))
        lines += [(f"    {t}", d, tci, None, False) for t, d, tci in tasks]
    fig, ax = plt.subplots(figsize=(9.0, 1.0 + 0.32 * len(lines)))
    for y, (label, delta, ci, paper, bold) in enumerate(reversed(lines)):
        color, width = ("black", 2.4) if bold else ("grey", 1.2)
        if ci is not None:
            ax.hlines(y, ci[0], ci[1], colors=color, linewidth=width)
        ax.plot([delta], [y], "s" if bold else "o", color=color, markersize=6 if bold else 4,
                label="our Δ, 95% CI" if bold and y == len(lines) - 1 else None)
        if paper is not None:
            ax.plot([paper], [y], "D", color="tab:red", markersize=6, label="paper's Δ" if not any(
                h.get_label() == "paper's Δ" for h in ax.lines) else None)
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle="dashed")
    ax.set_yticks(range(len(lines)), [x[0] for x in reversed(lines)], fontsize=8)
    ax.set_xlabel("Δ (points of the main metric, dev)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.6 / (1.0 + 0.32 * len(lines)), 1, 1))   # room for the legend below the axes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
