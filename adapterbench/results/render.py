"""A report as text: Markdown, CSV or LaTeX tables with their legends, each row labelled with
its selection protocol, and the settings and extras tables (budgets, merge and attention)."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path

import numpy as np

from adapterbench.errors import UserError
from adapterbench.records import RunRecord
from adapterbench.results.report import (
    ALPHA,
    Report,
    Row,
    paired_p,
    selected_records,
    split_k,
)


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def table_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    header = ["method", *rep.tasks, "mean", *(f"Δ {b}" for b in rep.baselines), "params %", "train s",
              *(f">+0.3 vs {b}" for b in rep.baselines)]
    body = []
    for row in rep.rows:
        cells = []
        for t in rep.tasks:
            c = row.cells.get(t)
            spread = f" ± {c.std:.2f}" if c is not None and c.n > 1 else ""   # one seed has no std
            cells.append("–" if c is None else f"{c.mean:.2f}{spread} ({c.n}){rep.mark(row, t)}")
        body.append([row.label, *cells, _fmt(rep.row_mean(row)),
                     *(_fmt(rep.mean_delta(row, b), True) if rep.base_row(row, b) is not row else ""
                       for b in rep.baselines),
                     f"{np.mean(row.params_pct):.2f}", f"{np.mean(row.train_seconds):.0f}",
                     *(rep.improved(row, b) if rep.base_row(row, b) is not row else "" for b in rep.baselines)])
    if rep.majority:
        vals = [rep.majority.get(t) for t in rep.tasks]
        body.append(["majority class (baseline)", *(_fmt(v) for v in vals),
                     _fmt(float(np.mean(vals))) if all(v is not None for v in vals) else "–",
                     *("" for _ in rep.baselines), "0.00", "0", *("" for _ in rep.baselines)])
    if rep.reference:
        for label in rep.reference.get("columns", {}).values():
            vals = [rep.reference["table"].get(t, {}).get(label) for t in rep.tasks]
            if all(v is None for v in vals):
                continue
            known = [v for v in vals if v is not None]
            body.append([f"paper: {label}", *(_fmt(v) for v in vals),
                         _fmt(float(np.mean(known))) if len(known) == len(vals) else "–",
                         *("" for _ in rep.baselines), "", "", *("" for _ in rep.baselines)])
    return header, body


PROTOCOLS = {"heldout": "on a held-out slice of its training set (dev decides nothing)",
             "dev": "on dev, the reported set (the papers' protocol)", "last": "at its last epoch"}


def protocol_text(rows: list[Row]) -> str:
    """What selected each row's epochs (train.selection), in one sentence."""
    by = {}
    for r in rows:
        by.setdefault("/".join(sorted(r.protocols)) or "dev", []).append(r.label)
    if len(by) == 1:
        (p, _), = by.items()
        return f"Selection: every row picks its epoch {PROTOCOLS.get(p, p)}."
    return "Selection: " + "; ".join(f"{', '.join(labels)} {PROTOCOLS.get(p, p)}" for p, labels in by.items()) + "."


def legend(rep: Report) -> str:
    what = f"{rep.metric} where the task reports it, else the main metric" if rep.metric else "main metric"
    marks = (f" † = paired t-test over shared seeds (two-sided, scipy ttest_rel) p < {ALPHA} against the "
             f"'{rep.versus}' row, uncorrected." if rep.marks else "")
    text = (f"Cells: {what} (dev) mean ± std over seeds (n; one seed: the mean alone).{marks} Δ columns: mean over "
            "tasks of the difference to the baseline row; '>+0.3' counts tasks improved by more than 0.3 points "
            "(AdapterFusion Table 2). Rows ending in 'k=N' are few-shot (N examples per class) and are "
            "compared with the baseline at the same k. params %: trainable share of the model; "
            "train s: mean per run, on whichever machine each run had (settings: machine).")
    text += " " + protocol_text(rep.rows)
    if rep.majority:
        text += (" majority class: the training set's most frequent label (regression: its mean) predicted for "
                 "every dev example (" + ", ".join(f"{t}: {rep.metric_names[t]}" for t in rep.majority) + ").")
    if rep.reference:
        text += f" paper rows: {rep.reference.get('source')} ({rep.reference.get('metric')})."
    return text


def _lr(x: float) -> str:
    """A learning rate as papers write it: 1e-4, 2.5e-5 (0.01 and up as decimals)."""
    if x >= 0.01 or x <= 0:
        return f"{x:g}"
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _training_data(train: dict) -> str:
    """What a run trained on, in words: every example, a cap, or k per class."""
    if train.get("shots"):
        return f"{train['shots']}/class"
    return f"≤ {train['limit']:,}" if train.get("limit") else "all"


def _epochs(train: dict) -> str:
    """The epoch budget: a fixed count, or a cap when early stopping (patience) may end it sooner."""
    if train.get("max_steps"):
        return f"{train['max_steps']} steps"
    n = train.get("epochs", "?")
    return f"≤ {n} (patience {train['patience']})" if train.get("patience") else str(n)


SETTINGS_HEADER = ["row", "method", "lr", "epochs", "selection", "epochs run", "best epoch", "warm-up", "batch",
                   "training data", "precision", "pooling", "machine", "runs"]


def _gemm_note(records: list[RunRecord]) -> str:
    """How many of a row's bf16 runs computed their products as fp32 GEMMs of bf16-rounded
    operands (a CPU without native bf16; `precision.bf16_matmul`), when any did."""
    n = sum(1 for r in records if r.extras.get("bf16_matmul", "native") != "native")
    return f" ({n} of {len(records)} runs: fp32 GEMMs)" if n else ""


def _machines(records: list[RunRecord]) -> str:
    """Where a row's runs trained (`runs.machine_name`, from each run's `machine_seconds`): one
    machine, or each with its number of runs; a run resumed on another machine names both ('A +
    B'); 'not recorded' for runs from before runs recorded it."""
    each = Counter(" + ".join(sorted(r.extras.get("machine_seconds") or {})) or "not recorded" for r in records)
    if len(each) == 1:
        return next(iter(each))
    return " / ".join(f"{k} ({n})" for k, n in sorted(each.items()))


def settings_rows(root: Path, only: list[str] | None = None,
                  seeds: list[int] | None = None) -> tuple[list[str], list[list[str]]]:
    """The budget and settings of every row (the paper-table footnote): learning rate, epoch
    budget, the selection protocol, epochs actually run and the chosen epoch, 1-based means over the row's
    runs, warm-up, batch size, training data, precision and pooling, from each run's resolved
    config. A setting that differs between a row's runs shows every value."""
    by_label: dict[str, list[RunRecord]] = {}
    for label, r in selected_records(root, only, seeds):
        by_label.setdefault(label, []).append(r)
    body = []
    for label in sorted(by_label, key=lambda x: (split_k(x)[1], x)):
        runs = by_label[label]
        trains = [r.config.get("train", {}) for r in runs]

        def each(values) -> str:
            return " / ".join(sorted({str(v) for v in values}))
        run_epochs = [r.epochs_run for r in runs if r.epochs_run is not None]
        best = [r.best_epoch + 1 for r in runs if r.best_epoch is not None]
        body.append([label, each(r.method for r in runs),
                     each(_lr(t["lr"]) for t in trains if "lr" in t),
                     each(map(_epochs, trains)), each(r.selection for r in runs),
                     f"{np.mean(run_epochs):.1f}" if run_epochs else "–",
                     f"{np.mean(best):.1f}" if best else "–",
                     each(f"{t.get('warmup_ratio', 0):.0%}" for t in trains),
                     each(t.get("batch_size", "?") for t in trains),
                     each(map(_training_data, trains)),
                     each(t.get("precision", "?") for t in trains) + _gemm_note(runs),
                     each(r.extras.get("pooling") or r.config.get("model", {}).get("pooling", "?") for r in runs),
                     _machines(runs), str(len(runs))])
    return SETTINGS_HEADER, body


def extras_rows(root: Path, only: list[str] | None = None,
                seeds: list[int] | None = None) -> tuple[list[str], list[list[str]]]:
    """What runs record beyond their scores, one line per run: a multi-task run's share of the
    training examples per task (MT-Uncertainty's choices, Pilault et al. 2021 Sec. 3.2) and the
    share of each task's training set it used; a run started from a merge (He et al. 2023), its
    strategy and per source the share of bottleneck units the alignment moved (mean over sites)
    and how far the source moved from its initialisation, ||theta - theta_0|| / ||theta_0||; a
    fusion run, its attention over the source adapters (what the heatmaps of Pfeiffer et al. 2021 show)."""
    body = []
    for label, r in selected_records(root, only, seeds):
        x, what = r.extras, []
        if x.get("share_of_examples"):
            what.append("share of examples: " + ", ".join(f"{t} {v:.1%}" for t, v in sorted(x["share_of_examples"].items())))
        if x.get("fraction_used_per_task"):
            what.append("of each training set used: " + ", ".join(
                f"{t} {v:.0%}" for t, v in sorted(x["fraction_used_per_task"].items())))
        if x.get("merge"):
            what.append(_merge_words(x["merge"]))
        if x.get("fusion_attention"):
            what.append(_attention_words(x["fusion_attention"], r.task))
        if what:
            task = ",".join(sorted(r.tasks)) if len(r.tasks) > 1 else r.task
            body.append([label, task, str(r.seed), "; ".join(what)])
    body.sort(key=lambda r: (r[0], r[1], int(r[2]) if r[2].isdigit() else 0))
    return ["row", "task", "seed", "recorded"], body


def _attention_words(attention: dict[str, list[float]], target: str | None) -> str:
    """A fusion run's attention over its source adapters, mean over layers, largest first; the
    target's own adapter is starred and the largest single-layer weight named."""
    means = {src: float(np.mean(w)) for src, w in attention.items() if w}
    peak_src, peak = max(((s, max(w)) for s, w in attention.items() if w), key=lambda x: x[1])
    layer = attention[peak_src].index(peak)
    words = ", ".join(f"{s}{'*' if s == target else ''} {v:.0%}" for s, v in
                      sorted(means.items(), key=lambda x: (-x[1], x[0])))
    return f"attention (mean over layers): {words}; peak {peak_src} {peak:.0%} at layer {layer}"


def _merge_words(merge: dict) -> str:
    parts = []
    for src in merge.get("sources", []):
        moved = src.get("units_moved")
        bits = [f"units moved {float(np.mean(list(moved.values()))):.0%}"] if moved else []
        if src.get("relative_change") is not None:
            bits.append(f"‖θ−θ₀‖/‖θ₀‖ {src['relative_change']:.2f}")
        parts.append(f"{src.get('task')}" + (f" ({', '.join(bits)})" if bits else ""))
    return f"{merge.get('strategy')} of " + ", ".join(parts) + (f" [{merge['kind']}]" if merge.get("kind") else "")


def md_cell(text: str) -> str:
    """A table cell as Markdown shows it, whatever a label holds: a `|` does not end the cell and
    HTML is text, not markup."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def latex_text(text: str) -> str:
    """Text for a LaTeX table: TeX's special characters escaped (a label cannot \\input a file
    or break the table), then the symbols our cells use as math."""
    out = "".join({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}.get(c, c)
                  for c in str(text))
    return (out.replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("Δ", r"$\Delta$")
            .replace(">", r"$>$").replace("<", r"$<$"))


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(md_cell, r)) + " |" for r in body]) + "\n"


SETTINGS_LEGEND = ("Settings: each row's learning rate, epoch budget (≤ N: stopped after `patience` epochs without "
                   "a better score on the selection set), selection (what chose the epoch: heldout, a held-out slice "
                   "of train; dev, the dev set the table reports, as the papers did; last, the last epoch), epochs run "
                   "and best epoch (means over the row's runs, "
                   "1-based), warm-up share of the steps, batch size, training examples per task (all, a seeded "
                   "cap, or k per class), precision (bf16: autocast; \"fp32 GEMMs\": runs whose bf16 products ran as fp32 GEMMs "
                   "of bf16-rounded operands, on a CPU without native bf16), the pooling the head reads and the machine "
                   "the runs trained on (a GPU, or a CPU's model, instruction set and threads; \"not recorded\": runs from "
                   "before adapterbench recorded it): training times compare only between runs on one machine.")


def render(rep: Report, fmt: str) -> str:
    header, body = table_rows(rep)
    if fmt == "md":
        return markdown_table(header, body) + "\n" + legend(rep) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "task", "mean", "std", "n", *(f"delta_{b}" for b in rep.baselines),
                    *(f"p_{b}" for b in rep.baselines)])
        for row in rep.rows:
            for t, c in row.cells.items():
                deltas = [rep.delta(row, b, t) for b in rep.baselines]
                bases = [rep.base_row(row, b) for b in rep.baselines]
                ps = [paired_p(c, b.cells[t]) if b is not None and b is not row and t in b.cells else None
                      for b in bases]
                w.writerow([row.label, t, f"{c.mean:.4f}", f"{c.std:.4f}" if c.n > 1 else "", c.n,
                            *("" if d is None else f"{d:.4f}" for d in deltas),
                            *("" if p is None else f"{p:.4g}" for p in ps)])
        return buf.getvalue()
    if fmt == "latex":
        esc = latex_text
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in r) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}", "% " + legend(rep)]
        return "\n".join(lines) + "\n"
    raise UserError(f"--format '{fmt}' must be md, csv or latex")
