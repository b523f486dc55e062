"""Claims reports: a YAML file names paper claims (row A against row B on some tasks) and the
tables to show; `adapterbench report RUNS --claims FILE --out results.md` writes one Markdown
document with those tables, their plots and a verdict per claim, all computed from the runs.

Verdicts (`judge` and `decide` below, on `stats.py`'s estimates; the document prints the rules): a claim's
effect is the stratified Δ (per task, the mean paired difference over the seeds both rows have;
then the mean over tasks) with a 95% CI. A `gain` claim (A beats B) is a one-sided test of Δ > 0
at alpha 0.05, Holm-adjusted across the file's gain claims; a `parity` claim (A within `margin`
points of B) a non-inferiority test of Δ > -margin at the same alpha. **confirmed** (the test
rejects), **contradicted** (the CI excludes the paper's Δ), **inconclusive** (neither: with the
seeds 80% power would need) or **not testable here** (a row or seeds missing, rows at or below
the majority class on every task, or the file says so: `testable: false` with `why`). While a
study is under way the claim's table still shows the runs so far, without a verdict.
The human discussion (likely reasons) is text in the claims file, printed beside the verdict.
A table may read other runs than the document's (`runs: docs/results/lr_sweep.jsonl`, a folder or
archive, relative to where the command runs), keep only some seeds (`seeds: [2, 3, 4]`: a
study's reported seeds, when some rows trained extra seeds for another row's sake; `seeds_by_row`
for rows the study ran at fewer of them), add its rows'
budgets (`settings: true`) and what their runs recorded beyond scores (`extras: true`: multi-task
shares, merge alignment, fusion attention), and draw fusion rows' attention as target x source
heatmaps instead of score bars (`plot: attention`). A table that names its seeds says below it
which of its rows' runs have not finished (`still_to_come`), and with `unfinished:
docs/results/unfinished.jsonl` (written by `archive --unfinished`) how far they had got: each
attempt's step, dev score per epoch and, for a multi-task run, its last epoch's shares (no result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapterbench.config import check_keys, load_yaml, split_labels
from adapterbench.errors import UserError

TABLE_KEYS = {"id", "title", "rows", "versus", "reference", "metric", "tasks", "seeds", "seeds_by_row", "text", "runs",
              "settings", "extras", "plot", "unfinished"}
CLAIM_KEYS = {"id", "title", "paper", "claim", "a", "b", "tasks", "kind", "margin", "paper_delta", "metric",
              "testable", "why", "discussion"}
TOP_KEYS = {"title", "intro", "tables", "claims", "closing", "compare_protocols", "compare_encoders"}


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


def check_seeds_by_row(t: dict, where: str) -> None:
    """`seeds_by_row: {head: [2, 3, 4]}`: rows of the table that a study ran at fewer of the
    table's `seeds` (so `still_to_come` does not wait for seeds that were never planned)."""
    by_row = t.get("seeds_by_row")
    if by_row is None:
        return
    if not isinstance(by_row, dict) or not t.get("seeds"):
        raise UserError(f"{where}.seeds_by_row must map rows to some of the table's seeds, e.g. {{head: [2, 3, 4]}} "
                        f"beside seeds: [2, 3, 4, 5, 6]")
    rows = set(split_labels(str(t["rows"])))
    for label, seeds in by_row.items():
        if label not in rows:
            raise UserError(f"{where}.seeds_by_row names {label!r}, not a row of the table ({t['rows']}): "
                            f"name one of its rows")
        if not (isinstance(seeds, list) and seeds and all(type(x) is int and x in t["seeds"] for x in seeds)):
            raise UserError(f"{where}.seeds_by_row.{label} = {seeds!r} must list some of the table's seeds "
                            f"{t['seeds']}, e.g. {t['seeds'][:3]}")


def load_claims(path: Path) -> dict:
    """The claims file, checked: unknown keys and bad kinds are errors naming the file."""
    spec = load_yaml(path)
    check_keys(spec, TOP_KEYS, str(path))
    for i, t in enumerate(spec.get("tables", [])):
        check_keys(t, TABLE_KEYS, f"{path}: tables[{i}]")
        if "id" not in t or "rows" not in t:
            raise UserError(f"{path}: tables[{i}] needs 'id' and 'rows'")
        if t.get("plot", "bars") not in ("bars", "attention"):
            raise UserError(f"{path}: tables[{i}].plot = {t['plot']!r} must be bars (scores) or attention "
                            "(fusion rows: target x source heatmap)")
        if "seeds" in t and not (isinstance(t["seeds"], list) and all(type(x) is int for x in t["seeds"])):
            raise UserError(f"{path}: tables[{i}].seeds = {t['seeds']!r} must be a list of seeds, e.g. [2, 3, 4]")
        check_seeds_by_row(t, f"{path}: tables[{i}]")
    claims = []
    for i, c in enumerate(spec.get("claims", [])):
        check_keys(c, CLAIM_KEYS, f"{path}: claims[{i}]")
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
    from adapterbench.results.report import majority_baseline
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
    from adapterbench.results import stats
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
    from adapterbench.results import stats
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


