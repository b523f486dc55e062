"""A study's run-hours before its first run (`adapterbench run STUDY --dry-run --calibrate N`).

Each row's training speed is measured on this machine by the `Timer` the command passes
(`adapterbench bench`'s): N training steps (forward, loss, backward, AdamW) on real batches of
each of its tasks, at the row's model, batch size, precision and length grouping (the method's
default settings), in a fresh process with this process's threads (run it with the workers'
OMP_NUM_THREADS). A run's time is the tokens it trains on (its training
set after the held-out slice and limits, every epoch of its budget) over the tokens per second
measured for its row and task: an upper bound, since early stopping ends runs sooner, less the
dev and held-out scoring that come on top. Rows a sweep still holds back are counted at the
sweep's first rate: a learning rate does not change what a run costs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Protocol

from adapterbench.errors import UserError
from adapterbench.study.plan import Node, Study, plan, state


@dataclass
class Work:
    """One run still to do, as the estimate sees it."""
    row: str           # its report row (a sweep run: 'full lr=2e-05')
    config: str        # the bench configuration that trains as it does ('' : none does)
    model: str
    task: str          # the task whose batches time it (a multi-task run: each of its tasks)
    tokens: float      # the tokens it trains on, at most
    spec: dict         # bench Spec fields: batch size, precision, length grouping, data folder


@dataclass
class RowEstimate:
    row: str
    runs: int
    tokens: float
    tokens_per_s: float | None    # the median measured over its tasks (None: not measurable)
    seconds: float | None


def runs_to_do(study: Study, nodes: list[Node]) -> list[Node]:
    """The plan's unfinished runs, and the runs of the rows a sweep still holds back (planned at
    the sweep's first rate, rows whose sweep has chosen at the chosen one), each once."""
    todo = [n for n in nodes if n.stage != "merge" and state(n) != "done"]
    if not study.waiting:
        return todo
    held = set(study.waiting)

    def fixed(e):
        label = e.label or e.name
        if not e.lr_sweep:
            return e
        lr = study.chosen[label]["lr"] if label in study.chosen else e.lr_sweep[0]
        return replace(e, train={**e.train, "lr": lr}, lr_sweep=[])

    ahead = replace(study, methods=[fixed(e) for e in study.methods])
    seen = {n.folder for n in nodes}
    todo += [n for n in plan(ahead) if n.row in held and n.folder not in seen and n.stage != "merge"]
    return todo


def bench_config(cfg) -> str:
    """The `adapterbench bench` configuration that trains as the run does ('' when none does)."""
    from adapterbench.methods import get_method
    method = get_method(cfg.method.name)
    adapters = getattr(cfg.method, "adapters", None)
    if adapters:                                          # fusion over N adapters
        return f"fusion{len(adapters)}"
    return cfg.method.name if "bench" in getattr(method, "SUPPORTS", ()) else ""


class TrainingSets:
    """(examples, mean tokens per example) of a task's training set as a run sees it (after its
    held-out slice, shots and limit), tokenized by the run's model; computed once per setting."""

    def __init__(self):
        self.known: dict[tuple, tuple[int, float]] = {}
        self.tokenizers: dict[str, object] = {}

    def of(self, task, cfg) -> tuple[int, float]:
        t = cfg.train
        key = (task.name, cfg.data.data_dir, cfg.model.name, cfg.model.max_length, t.selection, t.heldout_fraction,
               t.heldout_min, t.shots, t.limit)
        if key not in self.known:
            from adapterbench.data import load_splits
            from adapterbench.recipe.splits import prepare_items
            items = prepare_items(task, load_splits(task, cfg.data.data_dir, ("train",)),
                                  self.tokenizer(cfg.model.name), cfg)["train"]
            mean = statistics.mean(len(it["input_ids"]) for it in items) if items else 0.0
            self.known[key] = (len(items), mean)
        return self.known[key]

    def tokenizer(self, model: str):
        if model not in self.tokenizers:
            from transformers import AutoTokenizer

            from adapterbench.models import resolve_model_path
            self.tokenizers[model] = AutoTokenizer.from_pretrained(resolve_model_path(model))
        return self.tokenizers[model]


def work_of(node: Node, sets: TrainingSets) -> list[Work]:
    """The run as tokens to train on, one Work per task whose batches time it (a multi-task run
    splits its tokens over its tasks by the examples each contributes)."""
    from adapterbench.recipe.stages import resolve, tasks_of
    cfg = resolve(node.config, node.stage)
    tasks = tasks_of(cfg)
    sizes = [sets.of(t, cfg) for t in tasks]
    b, epochs = cfg.train.batch_size, cfg.train.epochs
    if len(tasks) > 1:
        per_epoch = (len(tasks) * max(math.ceil(n / b) for n, _ in sizes) if cfg.sampling.epoch == "reference"
                     else max(1, sum(n for n, _ in sizes) // b))
        examples = per_epoch * b * epochs
    else:
        examples = sizes[0][0] * epochs
    if cfg.train.max_steps:
        examples = min(examples, cfg.train.max_steps * b)
    total = sum(n for n, _ in sizes) or 1
    grouped = cfg.sampling.group_by_length if len(tasks) > 1 else cfg.train.group_by_length
    spec = {"batch_size": b, "precision": cfg.train.precision, "group_by_length": grouped,
            "data_dir": cfg.data.data_dir, "seq_len": cfg.model.max_length}
    config = bench_config(cfg)
    given = [x.strip() for x in cfg.task.split(",") if x.strip()]     # a name or a task file, as bench takes it
    return [Work(node.label, config, cfg.model.name, g, examples * n / total * mean, spec)
            for g, (n, mean) in zip(given, sizes)]


class Timer(Protocol):
    """Training tokens per second of a bench configuration: `steps` timed steps after one warm-up,
    on real batches of `task`, with the bench Spec fields in `spec` (the CLI passes bench's)."""
    def __call__(self, config: str, model: str, task: str, steps: int, spec: dict) -> float: ...


def measure_speeds(work: list[Work], steps: int, timer: Timer) -> dict[tuple, float]:
    """Tokens per second of each (model, config, task, spec) the work needs, each timed once."""
    speeds: dict[tuple, float] = {}
    for w in work:
        key = speed_key(w)
        if key not in speeds and w.config:
            speed = timer(w.config, w.model, w.task, steps, w.spec)
            if speed > 0:            # no tokens timed: no speed to go by
                speeds[key] = speed
    return speeds


def speed_key(w: Work) -> tuple:
    return (w.model, w.config, w.task, tuple(sorted(w.spec.items())))


def estimate(study: Study, nodes: list[Node], steps: int, timer: Timer) -> list[RowEstimate]:
    """Per row: its runs still to do, the tokens they train on and the run-seconds that takes at
    the speeds measured here (None: a row no bench configuration trains like, e.g. a plug-in)."""
    if steps < 1:
        raise UserError(f"--calibrate {steps}: give the number of timed steps per row and task, e.g. 3")
    sets = TrainingSets()
    todo = runs_to_do(study, nodes)
    work = [w for n in todo for w in work_of(n, sets)]
    speeds = measure_speeds(work, steps, timer)
    rows: dict[str, RowEstimate] = {}
    runs: dict[str, set] = {}
    for n in todo:
        runs.setdefault(n.label, set()).add(n.folder)
    for w in work:
        r = rows.setdefault(w.row, RowEstimate(w.row, len(runs[w.row]), 0.0, None, 0.0))
        r.tokens += w.tokens
        speed = speeds.get(speed_key(w))
        r.seconds = None if speed is None or r.seconds is None else r.seconds + w.tokens / speed
    for r in rows.values():
        measured = [speeds[speed_key(w)] for w in work if w.row == r.row and speed_key(w) in speeds]
        r.tokens_per_s = statistics.median(measured) if measured else None
    return list(rows.values())
