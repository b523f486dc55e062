"""Reports: every finished run under a folder -> one row per method, one column per task.

Each cell is the task's main metric as mean ± std over seeds (n; one seed: no std); deltas are against the
full fine-tuning and multi-task baselines; a cell is marked when a paired t-test over the
seeds both runs share (scipy.stats.ttest_rel, two-sided) gives p < 0.05 against full
fine-tuning (or the row `--versus LABEL`). Few-shot rows ('adapter k=16') are compared with
the baseline at the same k. `--reference NAME` adds the paper's numbers from configs/references/NAME.yaml.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapterbench.config import load_yaml
from adapterbench.errors import UserError
from adapterbench.records import RunRecord, read_records

BASELINES = ("full", "mtl")  # rows that deltas are taken against, when present
ALPHA = 0.05


@dataclass
class Cell:
    by_seed: dict[int, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.by_seed.values())))

    @property
    def std(self) -> float:
        return float(np.std(list(self.by_seed.values()), ddof=1)) if self.n > 1 else 0.0


@dataclass
class Row:
    label: str
    cells: dict[str, Cell] = field(default_factory=dict)
    params_pct: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    protocols: set = field(default_factory=set)   # what selected its runs' epochs: heldout | dev | last


def records(root: Path, seeds: list[int] | None = None) -> Iterator[RunRecord]:
    """Every run under `root` (run folders, or the lines of a results archive: `adapterbench
    archive`, a .jsonl file) as a RunRecord. `seeds`: only runs of these seeds (e.g. a study's
    reported seeds, leaving out extra seeds that only some rows trained)."""
    for record in read_records(Path(root)):
        if seeds is None or record.seed in seeds:
            yield record


def collect(root: Path, metric: str | None = None, seeds: list[int] | None = None,
            found: list[RunRecord] | None = None) -> dict[str, Row]:
    """Rows keyed by label from every finished run under `root` (run folders or an archive).
    Cells hold each task's main metric, or `metric` (e.g. accuracy) on the tasks that report
    it. With runs of several models, a row is a (label, model) pair; two runs that would fill
    one cell (same row, task and seed) are an error, never one silently replacing the other."""
    found = [r for r in (records(root, seeds) if found is None else found) if r.finished]
    models = {r.model for r in found}
    rows: dict[str, Row] = {}
    filled: dict[tuple, str] = {}
    for r in found:
        label = f"{r.label} [{r.model}]" if len(models) > 1 else r.label
        row = rows.setdefault(label, Row(label))
        for task, result in r.tasks.items():  # a multi-task run fills one cell per task
            key = (label, task, r.seed)
            if key in filled:
                raise UserError(f"two runs fill the cell {label} / {task} / seed {r.seed}: {filled[key]} and "
                                f"{r.where}; give the study entries different labels or report them apart")
            filled[key] = r.where
            row.cells.setdefault(task, Cell()).by_seed[r.seed] = float(pick(result, metric))
        row.protocols.add(r.selection)   # runs before the held-out protocol selected on dev
        row.params_pct.append(r.trainable_percent)
        row.train_seconds.append(r.train_seconds)
    if not rows:
        raise UserError(f"no finished runs (metrics.json with status ok) under {root}"
                        + (f" with seeds {', '.join(map(str, seeds))}" if seeds is not None else ""))
    return rows




def pick(result: dict, metric: str | None) -> float:
    """`metric` from a run's (or one task's) dev metrics when it has it, else its main metric."""
    dev = result.get("dev") or result.get("metrics", {}).get("dev", {})
    return dev[metric] if metric and metric in dev else result["main_value"]


def paired_p(a: Cell, b: Cell) -> float | None:
    """Two-sided paired t-test over the seeds both cells have (None if fewer than 2)."""
    from scipy.stats import ttest_rel
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if len(seeds) < 2:
        return None
    x = [a.by_seed[s] for s in seeds]
    y = [b.by_seed[s] for s in seeds]
    diffs = np.subtract(x, y)
    if np.allclose(diffs, diffs[0]):
        return None if diffs[0] == 0 else 0.0
    return float(ttest_rel(x, y).pvalue)


def split_k(label: str) -> tuple[str, int]:
    """'adapter k=16' -> ('adapter', 16); labels without a few-shot suffix get k = 0."""
    name, _, k = label.rpartition(" k=")
    return (name, int(k)) if name and k.isdigit() else (label, 0)


@dataclass
class Report:
    tasks: list[str]
    rows: list[Row]
    baselines: list[str]
    reference: dict | None = None
    versus: str = "full"           # the row the † test compares against
    metric: str | None = None      # None: each task's main metric
    majority: dict = field(default_factory=dict)   # task -> the majority-class baseline's score
    metric_names: dict = field(default_factory=dict)   # task -> the metric its cells report
    marks: bool = True             # † per cell; claims documents leave them out (many uncorrected
                                   # tests on 2-4 seeds; their claims carry CIs and Holm instead)

    def base_row(self, row: Row, base: str) -> Row | None:
        """The baseline row for `row`: the one with the same few-shot k when there is one."""
        k = split_k(row.label)[1]
        return (self.by_label.get(f"{base} k={k}") if k else None) or self.by_label.get(base)

    def delta(self, row: Row, base: str, task: str) -> float | None:
        b = self.base_row(row, base)
        if b is None or task not in row.cells or task not in b.cells:
            return None
        return row.cells[task].mean - b.cells[task].mean

    @property
    def by_label(self) -> dict[str, Row]:
        return {r.label: r for r in self.rows}

    def mean_delta(self, row: Row, base: str) -> float | None:
        ds = [d for t in self.tasks if (d := self.delta(row, base, t)) is not None]
        return float(np.mean(ds)) if ds else None

    def improved(self, row: Row, base: str, margin: float = 0.3) -> str:
        """AdapterFusion Table 2 style: tasks where the row beats the baseline by > margin."""
        ds = [d for t in self.tasks if (d := self.delta(row, base, t)) is not None]
        return f"{sum(d > margin for d in ds)}/{len(ds)}" if ds else ""

    def row_mean(self, row: Row) -> float | None:
        vals = [row.cells[t].mean for t in self.tasks if t in row.cells]
        return float(np.mean(vals)) if len(vals) == len(self.tasks) else None

    def mark(self, row: Row, task: str) -> str:
        base = self.base_row(row, self.versus)
        if not self.marks or base is None or row is base or task not in row.cells or task not in base.cells:
            return ""
        p = paired_p(row.cells[task], base.cells[task])
        return "†" if p is not None and p < ALPHA else ""


def majority_baseline(task_name: str, metric: str | None, data_dir: str | None = None
                      ) -> tuple[float | None, str | None]:
    """(score, metric name) of predicting the training set's majority class (regression: its
    mean, a constant) for every dev example; (None, None) when the task or a local copy of its
    data is not at hand (a report never waits on the Hub for this row). `task_name`: the task as
    the runs named it (a user's YAML by its path, so a shipped task of the same name never
    stands in for it)."""
    from adapterbench import metrics as M
    from adapterbench.data import load_splits
    from adapterbench.tasks import load_task
    try:
        task = load_task(task_name)
        splits = load_splits(task, data_dir, ("train", "dev"), allow_hub=False)
    except UserError:
        return None, None
    train = [e["label"] for e in splits["train"] if e["label"] is not None]
    dev = [e["label"] for e in splits["dev"] if e["label"] is not None]
    if not train or not dev:
        return None, None
    guess = float(np.mean(train)) if task.regression else max(set(train), key=train.count)
    name = metric if metric and metric in task.metrics else task.main_metric
    return M.compute([name], dev, [guess] * len(dev))[name], name


def build_report(root: Path, reference: str | None = None, versus: str = "full",
                 only: list[str] | None = None, metric: str | None = None,
                 tasks: list[str] | None = None, majority: bool = True, seeds: list[int] | None = None) -> Report:
    found = list(records(root, seeds))          # read once: the rows and the tasks as the runs named them
    rows = collect(root, metric, seeds, found)
    if only:  # row labels or shell patterns ('merge-*'), kept in the order of the report
        from fnmatch import fnmatch
        rows = {k: r for k, r in rows.items() if any(fnmatch(k, pat) for pat in only)}
        if not rows:
            raise UserError(f"--rows {','.join(only)} matches no row under {root}: see the report without --rows")
    tasks = tasks or sorted({t for r in rows.values() for t in r.cells})
    names = {split_k(label)[0] for label in rows}
    wanted = [versus] + [b for b in BASELINES if b != versus]
    # few-shot rows group by k; within a k the baselines come first
    order = sorted(rows.values(), key=lambda r: (split_k(r.label)[1], split_k(r.label)[0] not in wanted, r.label))
    ref = load_reference(reference) if reference else None
    rep = Report(tasks, order, [b for b in wanted if b in names], ref, versus, metric)
    if majority:
        given = tasks_as_given(found, Path(root))
        for t in tasks:
            spec, data_dir = given.get(t, (t, None))
            value, name = majority_baseline(spec, metric, data_dir)
            if value is not None:
                rep.majority[t], rep.metric_names[t] = value, name
    return rep


def tasks_as_given(found: list[RunRecord], root: Path) -> dict[str, tuple[str, str | None]]:
    """Each task name -> (the task as the runs' configs gave it: a shipped name or a user's YAML
    path, their data folder). A user's task that is no longer where its runs found it gives no
    majority row rather than a shipped task's of the same name."""
    out: dict[str, tuple[str, str | None]] = {}
    for r in found:
        given = str(r.config.get("task") or "").split(",")
        if len(given) == len(r.task.split(",")):
            data_dir = (r.config.get("data") or {}).get("data_dir")
            data_dir = found_from(data_dir, Path(root)) if data_dir else None
            for name, spec in zip(r.task.split(","), given):
                spec = spec.strip()
                out.setdefault(name, (found_from(spec, Path(root)) if spec.endswith((".yaml", ".yml")) else spec,
                                      data_dir))
    return out


def found_from(path: str, root: Path) -> str:
    """A path a run's config gave: absolute, or (an archive writes paths inside the study relative
    to the folder above it) found from the archive's or runs folder or a folder above it, else
    from here; as given when found nowhere."""
    if Path(path).is_absolute():
        return path
    bases = [*(([root.parent, *root.parent.parents]) if root.is_file() else [root, *root.parents]), Path.cwd()]
    return next((str(b / path) for b in bases if (b / path).exists()), path)


def load_reference(name: str) -> dict:
    from adapterbench.tasks import configs_dir
    path = configs_dir() / "references" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in (configs_dir() / "references").glob("*.yaml"))
        raise UserError(f"unknown reference '{name}'; known: {known}")
    return load_yaml(path)


def selected_records(root: Path, only: list[str] | None = None, seeds: list[int] | None = None
                     ) -> Iterator[tuple[str, RunRecord]]:
    """(row label, record) of every finished run whose label matches a pattern of `only` (all if
    None), of the given seeds (all if None)."""
    from fnmatch import fnmatch
    for r in records(root, seeds):
        if r.finished and (not only or any(fnmatch(r.label, pat) for pat in only)):
            yield r.label, r


def attention_matrix(found, label: str, tasks: list[str] | None = None) -> tuple[list[str], list[str], list[list[float]]]:
    """Target x source attention of one fusion row (Pfeiffer et al. 2021's heatmaps): per target
    task, each source's weight averaged over layers and over the row's runs in `found` ((label,
    record) pairs, e.g. `selected_records` of the table's seeds); targets in `tasks` order (else
    sorted), sources the targets first (so each target's own adapter is on the diagonal), then
    the others sorted."""
    per_target: dict[str, list[dict]] = {}
    for lab, r in found:
        if lab == label and r.extras.get("fusion_attention") and (not tasks or r.task in tasks):
            per_target.setdefault(r.task, []).append(r.extras["fusion_attention"])
    if not per_target:
        return [], [], []
    targets = [t for t in (tasks or sorted(per_target)) if t in per_target]
    names = {src for runs in per_target.values() for a in runs for src in a}
    sources = [t for t in targets if t in names] + sorted(names - set(targets))   # own adapters on the diagonal
    matrix = [[float(np.mean([np.mean(a[src]) for a in per_target[t] if src in a] or [np.nan]))
               for src in sources] for t in targets]
    return targets, sources, matrix


