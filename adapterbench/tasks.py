"""Tasks are data: one YAML per task under configs/tasks/ (lm-evaluation-harness style).

A task YAML names its labels (or `regression: true`), text columns, metrics, main metric
and where its data comes from: `sources.local` (a folder of TSV/CSV/JSONL files, or one
file split by a column) and/or `sources.hub` (a `datasets.load_dataset` path).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapterbench.config import build, load_yaml
from adapterbench.errors import UserError
from adapterbench.metrics import METRICS


def configs_dir() -> Path:
    """The shipped configs/ folder: package data, there in an installed wheel as in a checkout."""
    return Path(__file__).resolve().parent / "configs"


def task_dirs() -> list[Path]:
    """Where task YAMLs are found: the shipped tasks, then each folder of $ADAPTERBENCH_TASKS
    (os.pathsep-separated, e.g. set by --tasks-dir). User folders add tasks; a shipped task keeps
    its name."""
    extra = [Path(p).expanduser() for p in os.environ.get("ADAPTERBENCH_TASKS", "").split(os.pathsep) if p]
    return [configs_dir() / "tasks", *extra]


def shipped(kind: str, name_or_path: str | Path, suffix: str = ".yaml") -> Path:
    """A file by path, or a shipped study/claims/run config by name ('quickstart')."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return p
    cand = configs_dir() / kind / f"{name_or_path}{suffix}"
    if cand.is_file():
        return cand
    known = ", ".join(sorted(q.stem for q in (configs_dir() / kind).glob("*.yaml")))
    singular = {"studies": "study"}.get(kind, kind.rstrip("s"))
    raise UserError(f"no {singular} file '{name_or_path}': give a path or a shipped name ({known})")


@dataclass
class FileSpec:
    path: str                               # relative to the source folder
    header: list[str] | None = None         # column names for a file without a header line


@dataclass
class LocalSource:
    dir: str = ""                           # under data_dir, else relative to the task YAML
    format: str = "tsv"                     # tsv (quoting off) | csv | jsonl
    files: dict = field(default_factory=dict)   # split -> file name or {path, header}
    split_column: str | None = None         # one file holding all splits (SICK's SemEval_set)
    split_values: dict = field(default_factory=dict)  # split -> value of split_column
    columns: dict = field(default_factory=dict)       # canonical name -> column in the file
    label_map: dict = field(default_factory=dict)     # raw label -> one of the task's labels


@dataclass
class HubSource:
    path: str = ""                          # e.g. nyu-mll/glue
    name: str | None = None                 # e.g. mrpc
    splits: dict = field(default_factory=dict)        # split -> hub split name
    columns: dict = field(default_factory=dict)       # canonical name -> the dataset's column (MNLI: premise)
    label_map: dict = field(default_factory=dict)     # the dataset's label name -> one of the task's labels
    revision: str | None = None             # a Hub commit, tag or branch to pin (a local folder: none)


@dataclass
class Sources:
    local: LocalSource | None = None
    hub: HubSource | None = None


@dataclass
class TaskSpec:
    name: str
    version: int = 1
    description: str = ""
    track: str = ""                         # task family for same-track merging (MerA)
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)   # class names; empty when regression
    regression: bool = False
    id_column: str | None = None            # written to test prediction files
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    main_metric: str = "accuracy"
    sources: Sources = field(default_factory=Sources)
    include: str | None = None              # another task YAML this one extends
    path: str = ""                          # where the YAML was read from (filled in)

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.labels)


def task_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in task_dirs():
        for p in sorted(root.glob("**/*.yaml")):
            found.setdefault(p.stem, p)
    return found


def load_task(name_or_path: str) -> TaskSpec:
    """A shipped task by name, or any task YAML by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        files = task_files()
        if name_or_path.lower() not in files:
            raise UserError(f"unknown task '{name_or_path}'; known tasks: {', '.join(files)} "
                            f"(or give the path of a task YAML)")
        path = files[name_or_path.lower()]
    return parse_task(path)


def parse_task(path: Path, stored: bool = False) -> TaskSpec:
    """A task YAML; `stored`: a copy kept in a run folder, whose `path` still names the
    original YAML (a relative `dir:` resolves against it)."""
    data = load_yaml(path)
    original = data.pop("path", None) if stored else None
    if "include" in data:  # variants (MNLI mismatched) extend a base YAML; nested keys merge
        from adapterbench.config import deep_merge
        base = load_yaml(path.parent / data["include"])
        data = deep_merge(base, {k: v for k, v in data.items() if k != "include"})
    spec = build(TaskSpec, data, where=f"task {path.name}")
    spec.path = original or str(path.resolve())
    validate_task(spec, path)
    return spec


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate_task(spec: TaskSpec, path: Path) -> None:
    where = f"task {path}"
    if not NAME.match(spec.name or ""):
        raise UserError(f"{where}: name {spec.name!r} must be letters, digits, '_', '-' or '.' "
                        f"(it names run folders)")
    for m in spec.metrics:
        if m not in METRICS:
            raise UserError(f"{where}: unknown metric '{m}'; known: {', '.join(METRICS)}")
    if spec.main_metric not in spec.metrics:
        raise UserError(f"{where}: main_metric '{spec.main_metric}' is not in metrics {spec.metrics}")
    dup = sorted({str(lab) for lab in spec.labels if [str(x) for x in spec.labels].count(str(lab)) > 1})
    if dup:
        raise UserError(f"{where}: label '{dup[0]}' is listed twice in labels: each class once")
    if not spec.regression and len(spec.labels) < 2:
        raise UserError(f"{where}: a classification task needs at least two labels (or regression: true)")
    if not 1 <= len(spec.text_columns) <= 2:
        raise UserError(f"{where}: text_columns must name one or two columns")
    if spec.sources.local is None and spec.sources.hub is None:
        raise UserError(f"{where}: sources needs a 'local' or a 'hub' entry")
    local = spec.sources.local
    if local is not None and local.format not in ("tsv", "csv", "jsonl"):
        raise UserError(f"{where}: sources.local.format '{local.format}' must be tsv, csv or jsonl")
