"""`adapterbench report RUNS --against ARCHIVE.jsonl`: a user's runs beside an archive's rows,
without retraining them. A user's run is matched with the archive's runs of the same model,
task and seed; the two are comparable only when everything else that decides a comparison is
equal too (the data seed, the selection protocol and its slice, the training data's size and
the epoch budget), otherwise the command stops with one line naming what differs. Each user row
is then compared with each archive row by the claims' statistics (stratified paired Δ over the
tasks, 95% CI, one-sided test, Holm across the comparisons): "better", "worse" (the CI lies
below 0) or "no difference shown".
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from adapterbench.errors import UserError
from adapterbench.records import RECORD_FIELDS, RunRecord
from adapterbench.results.report import records

# what must be equal for two runs to be compared: (where in the record, how to say it)
PROTOCOL = (
    (("selection",), "select their epochs on"),
    (("config", "train", "heldout_fraction"), "hold out a share of"),
    (("config", "train", "heldout_min"), "hold out at least"),
    (("data_seed",), "draw their data with data seed"),
    (("config", "train", "limit"), "train on at most (train.limit)"),
    (("config", "train", "shots"), "train on k-shot data, k ="),
    (("config", "train", "epochs"), "have an epoch budget of"),
    (("config", "train", "patience"), "stop early with patience"),
    (("config", "train", "max_steps"), "stop at max_steps"),
    (("config", "train", "eval_limit"), "score dev on at most (train.eval_limit)"),
)
DEFAULTS = {"selection": "dev", "heldout_fraction": 0.1, "heldout_min": 100, "limit": 0, "shots": 0,
            "patience": 0, "max_steps": 0, "eval_limit": 0}
WORDS = {"dev": "dev", "heldout": "the held-out slice", "last": "the last epoch"}


def field(record: RunRecord, path: tuple):
    """A setting of a record: a typed field, a config key (("config", "train", "epochs")) or an
    extra the run recorded; a default where runs leave it out."""
    head, *rest = path
    node = (record.config if head == "config" else getattr(record, head) if head in RECORD_FIELDS
            else record.extras.get(head))
    for key in rest:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        node = DEFAULTS.get(path[-1])
    if path == ("data_seed",) and node is None:
        node = record.seed
    return node


def cell(record: RunRecord) -> tuple:
    return record.model, record.task, record.seed


def matched(mine: list[RunRecord], archive: list[RunRecord]) -> list[RunRecord]:
    """The archive's runs comparable with `mine` (same model, task and seed, same protocol);
    one line naming the first difference when a cell's archive runs all differ."""
    by_cell: dict[tuple, list[RunRecord]] = {}
    for r in archive:
        by_cell.setdefault(cell(r), []).append(r)
    keep, seen = [], set()
    for r in mine:
        others = by_cell.get(cell(r), [])
        if not others:
            model, task, seed = cell(r)
            have = sorted({(c[1], c[2]) for c in by_cell if c[0] == model})
            raise UserError(f"the archive has no run of {model} on {task} with seed {seed} (it has "
                            f"{', '.join(f'{t} s{s}' for t, s in have[:8]) or 'no run of that model'}"
                            f"{', ...' if len(have) > 8 else ''}): run your method on the archive's tasks and seeds")
        fits = [o for o in others if not differences(r, o)]
        if not fits:
            raise UserError(f"{r.label} on {r.task} seed {r.seed} is not comparable with the "
                            f"archive: {differences(r, others[0])[0]}")
        for o in fits:
            if id(o) not in seen:
                seen.add(id(o))
                keep.append(o)
    return keep


def differences(mine: RunRecord, theirs: RunRecord) -> list[str]:
    out = []
    for path, says in PROTOCOL:
        a, b = field(theirs, path), field(mine, path)
        if a != b:
            a, b = (WORDS.get(a, a), WORDS.get(b, b)) if path == ("selection",) else (a, b)
            out.append(f"archive runs {says} {a}, yours {b}")
    return out


def records_of(source: Path, tag: str = "") -> list[RunRecord]:
    """The finished runs of `source`, their row labels ending in `tag`."""
    return [replace(r, label=f"{r.label}{tag}") for r in records(source) if r.finished]


def compare(runs: Path, archive: Path, metric: str | None = None):
    """(Report over both, [(user row, archive row, Verdict)]): the user's rows, the archive's
    comparable rows (labelled '... (archive)') and one stratified comparison per pair."""
    from adapterbench.results.claims import Claim, decide, judge
    from adapterbench.results.report import build_report, collect
    mine = records_of(runs)
    if not mine:
        raise UserError(f"no finished runs under {runs}")
    theirs = matched(mine, records_of(archive, " (archive)"))
    with tempfile.TemporaryDirectory() as tmp:
        both = Path(tmp) / "both.jsonl"
        both.write_text("".join(json.dumps(r.to_dict(), default=str) + "\n" for r in [*mine, *theirs]))
        rep = build_report(both, majority=False, metric=metric, versus="")
        rep.marks = False            # the pairs' comparisons below carry the statistics
        rows = collect(both, metric)
    pairs = [(a, b) for a in sorted({r.label for r in mine}) for b in sorted({r.label for r in theirs})]
    claims = [Claim(id=f"{a} vs {b}", title=f"{a} vs {b}", a=a, b=b) for a, b in pairs]
    verdicts = [judge(c, rows) for c in claims]
    decide(claims, verdicts)
    return rep, list(zip(pairs, verdicts))


def comparison_table(results) -> str:
    from adapterbench.results.document import _ci, _fmt_p
    words = {"confirmed": "better", "contradicted": "worse", "inconclusive": "no difference shown"}
    lines = ["| yours | archive row | Δ | 95% CI | p (one-sided, Holm) | tasks x seeds | reading |",
             "|---|---|---|---|---|---|---|"]
    for (a, b), v in results:
        delta = "–" if v.delta is None else f"{v.delta:+.2f}"
        lines.append(f"| {a} | {b} | {delta} | {_ci(v.ci)} | {_fmt_p(v.p)} | {v.n} | "
                     f"{words.get(v.word, v.word)}{': ' + v.note if v.word == 'not testable here' and v.note else ''} |")
    return "\n".join(lines) + "\n"
