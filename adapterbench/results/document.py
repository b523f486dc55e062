"""The claims document (`report --claims`): verdicts with their forest plot, the protocol
sensitivity and selection-optimism tables, one section per table, one per claim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adapterbench.config import split_labels
from adapterbench.errors import UserError
from adapterbench.fileio import atomic_write
from adapterbench.results.claims import Claim, Verdict, decide, judge, load_claims
from adapterbench.results.plots import forest_plot, metric_bars
from adapterbench.results.render import (
    SETTINGS_LEGEND,
    extras_rows,
    markdown_table,
    render,
    settings_rows,
)
from adapterbench.results.report import Report, build_report, collect


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _ci(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _num(x, fmt="+.2f") -> str:
    return "–" if x is None else format(x, fmt)


def claim_section(i: int, claim: Claim, v: Verdict) -> str:
    from adapterbench.results import stats
    out = [f"### {i}. {claim.title}", ""]
    if claim.claim:
        out += [f"**Paper** ({claim.paper}): {claim.claim}" if claim.paper else f"**Paper**: {claim.claim}", ""]
    what = f"{claim.metric} where a task reports it, else its main metric" if claim.metric else "main metric"
    sel = f"; epochs selected {PROTOCOL_WORDS.get(v.protocol, v.protocol)}" if v.protocol else ""
    out += [f"**Here**: `{claim.a}` against `{claim.b}` ({what}, dev{sel}; means over the seeds both rows have), "
            f"Δ = {claim.a} − {claim.b}.", ""]
    if v.per_task:
        ref = claim.paper_delta if isinstance(claim.paper_delta, dict) else {}
        out += ["| task | " + claim.a + " | " + claim.b + " | Δ | 95% CI | seeds | paper Δ |",
                "|---|---|---|---|---|---|---|"]
        for t, am, bm, d, ci, n in v.per_task:
            pd = ref.get(t)
            out.append(f"| {t} | {am:.2f} | {bm:.2f} | {d:+.2f} | {_ci(ci)} | {n} | {_num(pd)} |")
        if v.delta is not None:
            out.append(f"| **stratified Δ** | | | **{v.delta:+.2f}** | {_ci(v.ci)} | n = {v.n} | {_num(v.paper)} |")
        out.append("")
    line = f"**Verdict: {v.word}.**"
    if v.delta is not None:
        p = _fmt_p(v.p)
        adj = ", Holm-adjusted over the gain claims" if claim.kind == "gain" else ""
        line += (f" Stratified Δ {v.delta:+.2f} points, 95% CI {_ci(v.ci)}; {v.test}: p{adj} "
                 f"{p if p.startswith('<') else f'= {p}'} (α {stats.ALPHA}, one-sided).")
        if v.power is not None:
            line += (f" Power at the paper's Δ ({v.paper:+.2f}) with these seeds: {100 * v.power:.0f}%; "
                     f"80% needs {v.seeds_needed or 'more than 100'} seeds per task.")
    if v.note:
        line += f" {v.note}."
    out += [line, ""]
    if claim.discussion:
        out += [claim.discussion.strip(), ""]
    return "\n".join(out)


PROTOCOL_WORDS = {"heldout": "on a held-out slice of train", "dev": "on dev (the papers' protocol)",
                  "last": "at the last epoch"}


def verdict_table(judged: list[tuple[Claim, Verdict]]) -> list[str]:
    """The verdicts at a glance: one row per claim with its Δ, CI, p, power and verdict."""
    out = ["| # | claim | verdict | stratified Δ | 95% CI | paper Δ | p | power at paper Δ | seeds for 80% |",
           "|---|---|---|---|---|---|---|---|---|"]
    for i, (c, v) in enumerate(judged, 1):
        power = "–" if v.power is None else f"{100 * v.power:.0f}%"
        out.append(f"| {i} | {c.title} | {v.word} | {_num(v.delta)} | {_ci(v.ci)} | {_num(v.paper)} | "
                   f"{_fmt_p(v.p)} | {power} | {v.seeds_needed or '–'} |")
    return out + [""]


def rows_or_none(runs_dir: Path, metric: str | None) -> dict:
    """The report rows, or none while a study has finished no run yet (every claim is then not
    testable); a runs folder or archive that does not exist is still an error."""
    from adapterbench.results.report import records
    if next(records(runs_dir), None) is None:   # stops at the first record
        return {}
    return collect(runs_dir, metric)


def still_to_come(rep: Report, rows: list[str], tasks: list[str] | None, seeds: list[int] | None,
                  by_row: dict[str, list[int]] | None = None) -> str | None:
    """One line naming what a table with `seeds` still lacks, so a partial table does not pass for
    a finished one: each row it names (patterns left out) with no run, or with a (task, seed) it
    has no run for; a row in `by_row` (`seeds_by_row`) waits only for its own seeds. None when
    every named row has its seeds on every task."""
    if not seeds:
        return None
    by_row = by_row or {}
    have, tasks = {r.label: r for r in rep.rows}, tasks or rep.tasks
    parts = []
    for label in (x for x in rows if not any(c in x for c in "*?[")):
        if label not in have:
            parts.append(f"{label} (no run yet)")
            continue
        gaps = {t: [s for s in by_row.get(label, seeds) if s not in (have[label].cells[t].by_seed if t in have[label].cells else {})]
                for t in tasks}
        gaps = {t: g for t, g in gaps.items() if g}
        seed_list = lambda g: ("seed " if len(g) == 1 else "seeds ") + ", ".join(map(str, g))  # noqa: E731
        if gaps and len(gaps) == len(tasks) and len({tuple(g) for g in gaps.values()}) == 1:
            parts.append(f"{label} ({seed_list(next(iter(gaps.values())))})")
        elif gaps:
            parts.append(f"{label} ({'; '.join(f'{t}: {seed_list(g)}' for t, g in gaps.items())})")
    return f"_Still to come (runs this table names that have not finished): {', '.join(parts)}._" if parts else None


UNFINISHED_LEGEND = ("Runs not finished when the study was last archived (`adapterbench archive --unfinished`; "
                     "{path}): snapshots, not results. One line per attempt; an attempt marked lost was replaced "
                     "by a later one (its folder was lost and the run started again from step 0; marked so too "
                     "once the later attempt finished and the run is in the table's results), one marked "
                     "failed stopped with an error. dev by epoch: "
                     "the value that picks the best epoch (a multi-task run's mean over its tasks); shares: each "
                     "task's share of the examples in the last epoch logged, so far.")


def unfinished_table(path: Path, rows: list[str], seeds: list[int] | None,
                     finished: frozenset = frozenset()) -> list[str]:
    """A claims table's `unfinished:` block: its rows' unfinished attempts from an `archive
    --unfinished` file (`progress.write_unfinished`), as Markdown lines; [] when it holds none.
    `finished`: (row label, run folder name) of the finished runs: an attempt of one of them was
    replaced by the attempt that finished (the file keeps a lost attempt's line as history)."""
    from adapterbench.archive import read_archive_lines, unfinished_key
    if not path.is_file():
        raise UserError(f"unfinished: {path} does not exist: write it with `adapterbench archive RUNS_DIR --out "
                        f"ARCHIVE --unfinished {path}`, or drop the key")
    records = [json.loads(line) for line in read_archive_lines(path, unfinished_key, f"delete {path}").values()]
    mine = sorted((r for r in records if r.get("label") in rows and (seeds is None or r.get("seed") in seeds)),
                  key=lambda r: (rows.index(r["label"]), r.get("seed") or 0, str(r.get("attempt"))))
    if not mine:
        return []
    latest = {(r["label"], r.get("run")): r.get("attempt") for r in mine}   # sorted by attempt: the last wins
    body = []
    for r in mine:
        mark = (" (failed)" if r.get("status") == "failed" else
                " (lost)" if latest[(r["label"], r.get("run"))] != r.get("attempt")
                or (r["label"], r.get("run")) in finished else "")
        dev = ", ".join(f"{h['main']:.2f}" for h in r.get("history") or []) or "–"
        last = (r.get("epochs") or [{}])[-1]
        share = last.get("sampling_share")
        order = str(r.get("task") or "").split(",")               # the run's task order, not the file's
        rank = lambda t: (order.index(t) if t in order else len(order), t)   # noqa: E731
        fed = (f"epoch {int(last['epoch']) + 1}: " + ", ".join(f"{t} {100 * share[t]:.1f}%" for t in sorted(share, key=rank))
               if isinstance(share, dict) else "")
        started, seen = (str(r.get(k) or "?")[:16] for k in ("attempt", "snapshot"))   # to the minute
        body.append([r["label"], str(r.get("seed")), started, seen,
                     f"{r.get('step')} of {r.get('steps_total') or '?'}{mark}", dev, fed])
    header = ["row", "seed", "started", "as of", "step", "dev by epoch", "shares"]
    return [markdown_table(header, body), UNFINISHED_LEGEND.format(path=path), ""]


def finished_runs(source: Path, rows: list[str]) -> frozenset:
    """(row label, run folder name) of the finished runs of `rows` in `source` (none if it has none yet)."""
    from adapterbench.results.report import selected_records
    try:
        return frozenset((label, r.run) for label, r in selected_records(source, rows))
    except UserError:
        return frozenset()


def attention_plots(table: dict, source: Path, rows: list[str], assets: Path) -> list[str]:
    """`plot: attention`: per fusion row of the table, a target x source heatmap of the attention
    (mean over layers and the table's seeds), as the paper draws it; Markdown image lines."""
    from adapterbench.fileio import slug
    from adapterbench.recipe.runmodel import attention_heatmap
    from adapterbench.results.report import attention_matrix, selected_records
    found = list(selected_records(source, rows, table.get("seeds")))     # read once, used per row
    labels = sorted({lab for lab, r in found if r.extras.get("fusion_attention")})
    lines = []
    for label in labels:
        targets, sources, matrix = attention_matrix(found, label, table.get("tasks"))
        png = assets / f"{table['id']}-{slug(label)}.png"
        attention_heatmap(matrix, sources, png, title=f"{label}: attention per target (mean over layers and seeds)",
                          row_names=targets)
        lines += [f"![{label}: attention per target]({assets.name}/{png.name})", ""]
    return lines


SENSITIVITY = {   # claims-file key -> (heading, what the other archive changes)
    "compare_protocols": ("Protocol sensitivity", "the other selection protocol"),
    "compare_encoders": ("Encoder sensitivity", "the same claims on another encoder"),
}


def sensitivity_section(claims: list[Claim], verdicts: list[Verdict], other: Path,
                        key: str = "compare_protocols") -> list[str]:
    """Each claim judged again on another archive (the same study under the other selection
    protocol, or on another encoder): both verdicts side by side and whether they differ."""
    heading, differs = SENSITIVITY[key]
    others = [judge(c, rows_or_none(other, c.metric)) for c in claims]
    decide(claims, others)
    out = [f"## {heading}", "",
           f"Each claim under this document's runs and under `{other}` ({differs}).", "",
           "| # | claim | verdict | Δ [95% CI] | protocol | verdict there | Δ [95% CI] there | protocol there | changed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for i, (c, v, w) in enumerate(zip(claims, verdicts, others), 1):
        cell = lambda x: "–" if x.delta is None else f"{x.delta:+.2f} {_ci(x.ci)}"   # noqa: E731
        waiting = c.testable and (v.delta is None or w.delta is None)   # runs missing: no comparison yet
        changed = "– (runs missing)" if waiting else "yes" if v.word != w.word else "no"
        out.append(f"| {i} | {c.title} | {v.word} | {cell(v)} | {v.protocol or '–'} | {w.word} | {cell(w)} | "
                   f"{w.protocol or '–'} | {changed} |")
    return out + [""]


def optimism_rows(source: Path) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): per row label, over its held-out-selected runs, the mean of dev at the
    dev-best scored epoch minus dev at the held-out-chosen epoch (None: no such runs)."""
    from adapterbench.results.report import records
    gaps: dict[str, list[float]] = {}
    try:
        found = list(records(source))
    except UserError:
        return None
    for r in found:
        if r.selection != "heldout" or not r.history or r.status != "ok":
            continue
        chosen = next((h for h in r.history if h["epoch"] == r.best_epoch), None)
        if chosen is None:
            continue
        gaps.setdefault(r.label, []).append(max(h["main"] for h in r.history) - chosen["main"])
    if not gaps:
        return None
    return (["row", "runs", "mean gap (points)", "largest"],
            [[k, str(len(v)), f"{np.mean(v):+.2f}", f"{max(v):+.2f}"] for k, v in sorted(gaps.items())])


VERDICT_RULES = (
    "Each claim's effect is the stratified Δ (the mean over its tasks of each task's mean paired "
    "difference over the seeds both rows have; tasks are strata, not replicates) with a 95% CI "
    "(Student's t, Welch–Satterthwaite df). Gain claims: one-sided test of Δ > 0 at α = 0.05, "
    "Holm-adjusted across the file's gain claims; parity claims: non-inferiority, Δ > −margin, "
    "at the same α. **confirmed**: the test rejects; **contradicted**: the CI excludes the paper's "
    "Δ (parity: lies below −margin); **inconclusive**: neither (the seeds that would give 80% power "
    "at the paper's Δ are given); **not testable here**: runs missing, or both rows at or below "
    "the majority-class baseline on every task of the claim.")


def write_claims_report(runs_dir: Path, claims_file: Path, out: Path, plot: bool = True) -> list[tuple[str, str]]:
    """Write the document (and its plots in a folder named after it); returns (claim id, verdict)."""
    spec = load_claims(claims_file)
    out = Path(out)
    assets = out.with_suffix("")        # docs/results.md -> docs/results/
    parts = [f"# {spec.get('title', 'Results')}", ""]
    if spec.get("intro"):
        parts += [spec["intro"].strip(), ""]
    rows_by_metric = {m: rows_or_none(runs_dir, m) for m in {c.metric for c in spec["claims"]}}
    judged = [(c, judge(c, rows_by_metric[c.metric])) for c in spec["claims"]]
    decide([c for c, _ in judged], [v for _, v in judged])
    if judged:
        parts += verdicts_section(judged, assets, plot)
    for key in SENSITIVITY:
        if judged and spec.get(key):
            parts += sensitivity_section(spec["claims"], [v for _, v in judged], Path(spec[key]), key)
    if optimism := optimism_rows(runs_dir):
        parts += ["## What dev selection would have added", "",
                  "Per row, the mean over its runs of dev at the epoch dev would have chosen minus dev at the "
                  "epoch the held-out slice chose (from each run's per-epoch scores): the optimism the "
                  "papers' protocol carries here.", "", *markdown_table(*optimism).splitlines(), ""]
    for t in spec.get("tables", []):
        parts += table_section(t, runs_dir, assets, plot)
    if judged:
        parts += ["## The claims", ""]
        for i, (c, v) in enumerate(judged, 1):
            parts.append(claim_section(i, c, v))
    if spec.get("closing"):
        parts += [spec["closing"].strip(), ""]
    parts += [f"---\nGenerated by `adapterbench report {runs_dir} --claims {claims_file} --out {out}` "
              "from the runs' metrics.json files; edit the claims file, not this document.", ""]
    atomic_write(out, "\n".join(parts))
    return [(c.id, v.word) for c, v in judged]


def verdicts_section(judged: list[tuple[Claim, Verdict]], assets: Path, plot: bool) -> list[str]:
    """The verdict table and, with `plot`, the forest plot of every claim's Δ and CI."""
    parts = ["## Verdicts at a glance", "", VERDICT_RULES, "", *verdict_table(judged)]
    if plot and any(v.ci for _, v in judged):
        png = assets / "forest.png"
        forest_plot([(f"{i}. {c.title}", v.delta, v.ci, v.paper, [(t, d, ci) for t, _, _, d, ci, _ in v.per_task])
                     for i, (c, v) in enumerate(judged, 1) if v.ci], png)
        parts += [f"![Every claim: our Δ with its 95% CI, the paper's Δ and 0]({assets.name}/{png.name})", ""]
    return parts


def table_section(t: dict, runs_dir: Path, assets: Path, plot: bool) -> list[str]:
    """One `tables:` entry: its text, the report table, what is still to come, settings, extras,
    unfinished runs and its plot."""
    rows = split_labels(t["rows"])
    parts = [f"## {t.get('title', t['id'])}", ""]
    if t.get("text"):
        parts += [t["text"].strip(), ""]
    source = Path(t["runs"]) if t.get("runs") else runs_dir
    going = unfinished_table(Path(t["unfinished"]), rows, t.get("seeds"), finished_runs(source, rows)) \
        if t.get("unfinished") else []
    try:
        rep: Report = build_report(source, t.get("reference"), t.get("versus", "full"), rows,
                                   t.get("metric"), t.get("tasks"), seeds=t.get("seeds"))
    except UserError:   # a study still running: say so instead of failing the whole document
        return parts + [f"_No finished runs yet for rows {', '.join(rows)}._", "", *going]
    rep.marks = False   # per-cell † on 2-6 seeds, uncorrected: the claims carry CIs and Holm instead
    parts += [render(rep, "md").rstrip(), ""]
    if todo := still_to_come(rep, rows, t.get("tasks"), t.get("seeds"), t.get("seeds_by_row")):
        parts += [todo, ""]
    if t.get("settings"):
        parts += [markdown_table(*settings_rows(source, rows, t.get("seeds"))), SETTINGS_LEGEND, ""]
    if t.get("extras"):
        header, body = extras_rows(source, rows, t.get("seeds"))
        if body:
            parts += [markdown_table(header, body), ""]
    parts += going
    if plot and t.get("plot") == "attention":
        parts += attention_plots(t, source, rows, assets)
    elif plot:
        png = assets / f"{t['id']}.png"
        metric_bars(rep, png)
        parts += [f"![{t.get('title', t['id'])}]({assets.name}/{png.name})", ""]
    return parts
