"""Claims reports: a YAML file names paper claims (row A against row B on some tasks) and the
tables to show; `adapterbench report RUNS --claims FILE --out results.md` writes one Markdown
document with those tables, their plots and a verdict per claim, all computed from the runs.

Verdicts (alpha 0.05; the test pairs the two rows' runs by (task, seed)):
- `gain` claims (A beats B): confirmed when the mean difference is positive and a two-sided
  paired t-test over the (task, seed) pairs gives p < alpha; otherwise not confirmed.
- `parity` claims (A within `margin` points of B): a non-inferiority test, one-sided t-test of
  (A - B + margin) > 0 over the same pairs; confirmed when p < alpha.
- not testable here: a row is missing, fewer than 2 seeds are shared, or the file says so
  (`testable: false` with `why`). While a study is under way the claim's table still shows the
  runs so far (per task, over the seeds both rows have), without a mean, p or verdict.
The human discussion (likely reasons) is text in the claims file, printed beside the verdict.
A table may read other runs than the document's (`runs: docs/results/lr_sweep.jsonl`, a folder or
archive, relative to where the command runs), keep only some seeds (`seeds: [2, 3, 4]`: a
study's reported seeds, when some rows trained extra seeds for another row's sake), add its rows'
budgets (`settings: true`) and what their runs recorded beyond scores (`extras: true`: multi-task
shares, merge alignment, fusion attention), and draw fusion rows' attention as target x source
heatmaps instead of score bars (`plot: attention`). A table that names its seeds says below it
which of its rows' runs have not finished (`still_to_come`), and with `unfinished:
docs/results/unfinished.jsonl` (written by `archive --unfinished`) how far they had got: each
attempt's step, dev score per epoch and, for a multi-task run, its last epoch's shares (no result).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import load_yaml
from .errors import UserError
from .report import (SETTINGS_LEGEND, Report, build_report, collect, extras_rows, markdown_table, render,
                     settings_rows, split_labels)

TABLE_KEYS = {"id", "title", "rows", "versus", "reference", "metric", "tasks", "seeds", "text", "runs", "settings",
              "extras", "plot", "unfinished"}
CLAIM_KEYS = {"id", "title", "paper", "claim", "a", "b", "tasks", "kind", "margin", "paper_delta", "metric",
              "testable", "why", "discussion"}
TOP_KEYS = {"title", "intro", "tables", "claims", "closing", "compare_protocols"}


@dataclass
class Claim:
    id: str
    title: str
    a: str
    b: str
    paper: str = ""
    claim: str = ""
    tasks: list[str] = field(default_factory=list)
    kind: str = "gain"
    margin: float = 0.0
    paper_delta: dict | float | None = None
    metric: str | None = None
    testable: bool = True
    why: str = ""
    discussion: str = ""


@dataclass
class Verdict:
    word: str                 # confirmed | contradicted | inconclusive | not testable here
    delta: float | None = None
    p: float | None = None    # one-sided p (gain: Holm-adjusted across the file's gain claims)
    n: int = 0                # (task, seed) pairs
    test: str = ""
    per_task: list[tuple] = field(default_factory=list)   # (task, a mean, b mean, delta, (ci lo, hi), seeds)
    note: str = ""
    ci: tuple | None = None   # 95% CI of the stratified Δ
    paper: float | None = None          # the paper's Δ on these tasks (its mean)
    power: float | None = None          # at the paper's Δ, with these seeds
    seeds_needed: int | None = None     # per task, for 80% power at the paper's Δ
    protocol: str = ""
    estimate: object = None             # stats.Estimate


def _check_keys(d: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(allowed))})")


def load_claims(path: Path) -> dict:
    """The claims file, checked: unknown keys and bad kinds are errors naming the file."""
    spec = load_yaml(path)
    _check_keys(spec, TOP_KEYS, str(path))
    for i, t in enumerate(spec.get("tables", [])):
        _check_keys(t, TABLE_KEYS, f"{path}: tables[{i}]")
        if "id" not in t or "rows" not in t:
            raise UserError(f"{path}: tables[{i}] needs 'id' and 'rows'")
        if t.get("plot", "bars") not in ("bars", "attention"):
            raise UserError(f"{path}: tables[{i}].plot = {t['plot']!r} must be bars (scores) or attention "
                            "(fusion rows: target x source heatmap)")
        if "seeds" in t and not (isinstance(t["seeds"], list) and all(type(x) is int for x in t["seeds"])):
            raise UserError(f"{path}: tables[{i}].seeds = {t['seeds']!r} must be a list of seeds, e.g. [2, 3, 4]")
    claims = []
    for i, c in enumerate(spec.get("claims", [])):
        _check_keys(c, CLAIM_KEYS, f"{path}: claims[{i}]")
        missing = [k for k in ("id", "title", "a", "b") if k not in c]
        if missing:
            raise UserError(f"{path}: claims[{i}] needs '{missing[0]}'")
        claim = Claim(**c)
        if claim.kind not in ("gain", "parity"):
            raise UserError(f"{path}: claims[{i}].kind '{claim.kind}' must be gain or parity")
        claims.append(claim)
    spec["claims"] = claims
    return spec


def paper_effect(claim: Claim, tasks: list[str]) -> float | None:
    """The paper's Δ for the claim as a whole: its `mean`, else the mean of its per-task values on
    these tasks, else the single number given."""
    pd = claim.paper_delta
    if isinstance(pd, dict):
        if "mean" in pd:
            return float(pd["mean"])
        vals = [float(pd[t]) for t in tasks if t in pd]
        return float(np.mean(vals)) if vals else None
    return None if pd is None else float(pd)


def at_floor(claim: Claim, a, b, tasks: list[str]) -> str | None:
    """Why the claim cannot be tested here when both rows sit at or below the majority-class
    baseline on every one of its tasks (a floor: neither learned the tasks), else None."""
    from .report import majority_baseline
    below = []
    for t in tasks:
        base, _ = majority_baseline(t, claim.metric)
        means = [float(np.mean(list(r.cells[t].by_seed.values()))) for r in (a, b)]
        if base is None or max(means) > base:
            return None
        below.append(f"{t} {max(means):.2f} ≤ {base:.2f}")
    return "both rows at or below the majority-class baseline on every task (" + "; ".join(below) + ")"


def judge(claim: Claim, rows: dict) -> Verdict:
    """The claim's evidence from the report rows (label -> Row): the stratified Δ over its tasks
    with a 95% CI, the one-sided p (unadjusted; `decide` applies Holm and the verdict rules),
    the power at the paper's Δ and the seeds that would give 80%."""
    from . import stats
    if not claim.testable:
        return Verdict("not testable here", note=claim.why)
    missing = [r for r in (claim.a, claim.b) if r not in rows]
    if missing:
        return Verdict("not testable here", note=f"no finished runs for row '{missing[0]}'")
    a, b = rows[claim.a], rows[claim.b]
    if len(a.protocols | b.protocols) > 1:
        raise UserError(f"claim '{claim.id}': '{claim.a}' selects its epochs on {'/'.join(sorted(a.protocols))}, "
                        f"'{claim.b}' on {'/'.join(sorted(b.protocols))}: compare rows of one selection protocol "
                        f"(train.selection), or report the archives apart")
    tasks = claim.tasks or sorted(set(a.cells) & set(b.cells))
    diffs, per_task, lacking = {}, [], None
    for t in tasks:
        if t not in a.cells or t not in b.cells:
            lacking = lacking or f"task {t} lacks runs of '{claim.a}' or '{claim.b}'"
            continue
        seeds = sorted(set(a.cells[t].by_seed) & set(b.cells[t].by_seed))   # both means over the same seeds
        if len(seeds) < 2:
            lacking = lacking or f"fewer than 2 seeds shared by both rows on {t}"
        if not seeds:
            continue
        d = [a.cells[t].by_seed[s] - b.cells[t].by_seed[s] for s in seeds]
        am = float(np.mean([a.cells[t].by_seed[s] for s in seeds]))
        bm = float(np.mean([b.cells[t].by_seed[s] for s in seeds]))
        ci = stats.stratified({t: d}).ci if len(d) >= 2 else None
        diffs[t] = d
        per_task.append((t, am, bm, am - bm, ci, len(seeds)))
    protocol = "/".join(sorted(a.protocols))
    if lacking:   # no verdict on part of the data; what there is so far is still shown
        return Verdict("not testable here", per_task=per_task, protocol=protocol,
                       note=lacking + (" (the table shows the runs so far, no verdict)" if per_task else ""))
    if not per_task:
        return Verdict("not testable here", note="the two rows share no task")
    est = stats.stratified(diffs)
    paper = paper_effect(claim, tasks)
    shift = claim.margin if claim.kind == "parity" else 0.0
    v = Verdict("", est.delta, est.p_greater(-shift), sum(len(d) for d in diffs.values()), "", per_task,
                ci=est.ci, paper=paper, protocol=protocol, estimate=est)
    if paper is not None:
        v.power, v.seeds_needed = stats.power(est, paper, shift=shift), stats.seeds_for_power(est, paper, shift)
    v.test = (f"one-sided test of Δ > 0 over {len(tasks)} task(s) as strata, {v.n} (task, seed) pairs"
              if claim.kind == "gain" else
              f"non-inferiority: one-sided test of Δ > −{claim.margin:g} over {len(tasks)} task(s) as strata, "
              f"{v.n} (task, seed) pairs")
    if floor := at_floor(claim, a, b, tasks):
        v.word, v.note = "not testable here", floor
    return v


def verdict(claim: Claim, rows: dict) -> Verdict:
    """One claim judged and decided on its own (Holm over one claim is no adjustment)."""
    v = judge(claim, rows)
    decide([claim], [v])
    return v


def decide(claims: list[Claim], verdicts: list[Verdict]) -> None:
    """Holm across the gain claims that have a test, then the four verdicts:
    confirmed (adjusted one-sided p < α); contradicted (the 95% CI excludes the paper's Δ: for a
    parity claim, it lies wholly below −margin); inconclusive (neither: the CI holds both 0, or
    −margin, and the paper's effect; the seeds that would settle it are given); not testable here."""
    from . import stats
    gains = [i for i, (c, v) in enumerate(zip(claims, verdicts)) if c.kind == "gain" and not v.word]
    for i, adj in zip(gains, stats.holm([verdicts[i].p for i in gains])):
        verdicts[i].p = adj
    for c, v in zip(claims, verdicts):
        if v.word:
            continue
        lo, hi = v.ci
        if v.p < stats.ALPHA and (c.kind == "parity" or v.delta > 0):
            v.word = "confirmed"
        elif (c.kind == "gain" and hi < (v.paper if v.paper is not None else 0.0)) or \
                (c.kind == "parity" and hi < -c.margin):   # a gain claim without a paper Δ: the CI excludes any gain
            v.word = "contradicted"
        else:
            v.word = "inconclusive"
            if v.seeds_needed:
                v.note = f"about {v.seeds_needed} seeds per task would give 80% power at the paper's Δ"


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _ci(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _num(x, fmt="+.2f") -> str:
    return "–" if x is None else format(x, fmt)


def claim_section(i: int, claim: Claim, v: Verdict) -> str:
    from . import stats
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
    from .report import records
    if next(records(runs_dir), None) is None:   # stops at the first record
        return {}
    return collect(runs_dir, metric)


def still_to_come(rep: Report, rows: list[str], tasks: list[str] | None, seeds: list[int] | None) -> str | None:
    """One line naming what a table with `seeds` still lacks, so a partial table does not pass for
    a finished one: each row it names (patterns left out) with no run, or with a (task, seed) it
    has no run for. None when every named row has every seed on every task."""
    if not seeds:
        return None
    have, tasks = {r.label: r for r in rep.rows}, tasks or rep.tasks
    parts = []
    for label in (x for x in rows if not any(c in x for c in "*?[")):
        if label not in have:
            parts.append(f"{label} (no run yet)")
            continue
        gaps = {t: [s for s in seeds if s not in (have[label].cells[t].by_seed if t in have[label].cells else {})]
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
    from .progress import unfinished_key
    from .runs import read_archive_lines
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
    from .report import selected_records
    try:
        return frozenset((label, m.get("run")) for label, m in selected_records(source, rows))
    except UserError:
        return frozenset()


def attention_plots(table: dict, source: Path, rows: list[str], assets: Path) -> list[str]:
    """`plot: attention`: per fusion row of the table, a target x source heatmap of the attention
    (mean over layers and the table's seeds), as the paper draws it; Markdown image lines."""
    from .plots import attention_heatmap
    from .report import attention_matrix, selected_records
    from .runs import slug
    found = list(selected_records(source, rows, table.get("seeds")))     # read once, used per row
    labels = sorted({lab for lab, m in found if m.get("fusion_attention")})
    lines = []
    for label in labels:
        targets, sources, matrix = attention_matrix(found, label, table.get("tasks"))
        png = assets / f"{table['id']}-{slug(label)}.png"
        attention_heatmap(matrix, sources, png, title=f"{label}: attention per target (mean over layers and seeds)",
                          row_names=targets)
        lines += [f"![{label}: attention per target]({assets.name}/{png.name})", ""]
    return lines


def sensitivity_section(claims: list[Claim], verdicts: list[Verdict], other: Path) -> list[str]:
    """Each claim judged again on another archive (the same study under the other selection
    protocol): both verdicts side by side and whether the protocol changed it."""
    others = [judge(c, rows_or_none(other, c.metric)) for c in claims]
    decide(claims, others)
    out = ["## Protocol sensitivity", "",
           f"Each claim under this document's runs and under `{other}` (the other selection protocol).", "",
           "| # | claim | verdict | Δ [95% CI] | protocol | verdict there | Δ [95% CI] there | protocol there | changed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for i, (c, v, w) in enumerate(zip(claims, verdicts, others), 1):
        cell = lambda x: "–" if x.delta is None else f"{x.delta:+.2f} {_ci(x.ci)}"   # noqa: E731
        out.append(f"| {i} | {c.title} | {v.word} | {cell(v)} | {v.protocol or '–'} | {w.word} | {cell(w)} | "
                   f"{w.protocol or '–'} | {'yes' if v.word != w.word else 'no'} |")
    return out + [""]


def optimism_rows(source: Path) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): per row label, over its held-out-selected runs, the mean of dev at the
    dev-best scored epoch minus dev at the held-out-chosen epoch (None: no such runs)."""
    from .report import records
    gaps: dict[str, list[float]] = {}
    try:
        found = list(records(source))
    except UserError:
        return None
    for _, m in found:
        hist = m.get("history") or []
        if m.get("selection") != "heldout" or not hist or m.get("status") != "ok":
            continue
        chosen = next((h for h in hist if h["epoch"] == m.get("best_epoch")), None)
        if chosen is None:
            continue
        gaps.setdefault(m.get("label") or m.get("method"), []).append(max(h["main"] for h in hist) - chosen["main"])
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
    from .plots import metric_bars
    from .runs import atomic_write
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
        parts += ["## Verdicts at a glance", "", VERDICT_RULES, "", *verdict_table(judged)]
        if plot and any(v.ci for _, v in judged):
            from .plots import forest_plot
            png = assets / "forest.png"
            forest_plot([(f"{i}. {c.title}", v.delta, v.ci, v.paper, [(t, d, ci) for t, _, _, d, ci, _ in v.per_task])
                         for i, (c, v) in enumerate(judged, 1) if v.ci], png)
            parts += [f"![Every claim: our Δ with its 95% CI, the paper's Δ and 0]({assets.name}/{png.name})", ""]
    if judged and spec.get("compare_protocols"):
        parts += sensitivity_section(spec["claims"], [v for _, v in judged], Path(spec["compare_protocols"]))
    if optimism := optimism_rows(runs_dir):
        parts += ["## What dev selection would have added", "",
                  "Per row, the mean over its runs of dev at the epoch dev would have chosen minus dev at the "
                  "epoch the held-out slice chose (from each run's per-epoch scores): the optimism the "
                  "papers' protocol carries here.", "", *markdown_table(*optimism).splitlines(), ""]
    for t in spec.get("tables", []):
        rows = split_labels(t["rows"])
        parts += [f"## {t.get('title', t['id'])}", ""]
        if t.get("text"):
            parts += [t["text"].strip(), ""]
        source = Path(t["runs"]) if t.get("runs") else runs_dir
        going = unfinished_table(Path(t["unfinished"]), rows, t.get("seeds"), finished_runs(source, rows)) \
            if t.get("unfinished") else []
        try:
            rep: Report = build_report(source, t.get("reference"), t.get("versus", "full"), rows,
                                       t.get("metric"), t.get("tasks"), seeds=t.get("seeds"))
        except UserError:   # a study still running: say so instead of failing the whole document
            parts += [f"_No finished runs yet for rows {', '.join(rows)}._", "", *going]
            continue
        rep.marks = False   # per-cell † on 2-6 seeds, uncorrected: the claims carry CIs and Holm instead
        parts += [render(rep, "md").rstrip(), ""]
        if todo := still_to_come(rep, rows, t.get("tasks"), t.get("seeds")):
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
