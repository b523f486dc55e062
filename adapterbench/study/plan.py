"""Studies: one YAML grid -> all its runs, with dependencies, skip-done, locks and resume.

A study names models, tasks, seeds and method entries; every (model, task, seed, entry)
becomes one run. A fusion entry depends on the adapters of its source tasks (trained by
another entry, `source_method`), which are planned once however many fusions need them.
A run is identified by its folder (stage/method/task/model-seed-confighash), so a finished
run with the same resolved config is never trained twice, and a restarted study goes on
where it stopped. Workers (processes or machines sharing the folder) claim a run by its lock
(locks.py). Where a study stands: status.py; resuming from a results archive: archived.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapterbench.config import build, check_keys, deep_merge, load_yaml, portable
from adapterbench.errors import UserError
from adapterbench.fileio import slug
from adapterbench.methods import get_method
from adapterbench.recipe.stages import planned_folder, resolve
from adapterbench.records import status_of
from adapterbench.study.locks import locked
from adapterbench.tasks import load_task


def takes_sources(method) -> bool:
    """A method whose config names source adapters (fusion)."""
    return "adapters" in method.Config.__dataclass_fields__


@dataclass
class MethodEntry:
    name: str                                   # method (adapterbench ls methods)
    label: str = ""                             # row name in reports; default: the method name
    method: dict = field(default_factory=dict)  # method.* keys, e.g. reduction_factor: 64
    train: dict = field(default_factory=dict)   # train.* keys for this entry only
    sampling: dict = field(default_factory=dict)  # multi-task: sampling.* keys (scheme, temperature)
    tasks: list[str] = field(default_factory=list)  # run this entry on these study tasks only (default: all)
    sources: list[str] = field(default_factory=list)  # fusion: source tasks (default: the study's tasks)
    source_method: str = "pfeiffer"             # fusion/merge: label of the entry whose adapters are used
    adapters: list[str] = field(default_factory=list)  # fusion/merge: existing adapter folders (globs) instead
    include_target: bool | None = None          # use the target's own source adapter (default: fusion yes, merge no)
    merge: dict = field(default_factory=dict)   # merge the sources first (strategy, same_track, weights,
                                                # align_on), then train the merged adapter on the target
    seeds: list[int] = field(default_factory=list)  # this entry's seeds (default: the study's), e.g. 5 for merges
    lr_sweep: list[float] = field(default_factory=list)  # learning rates to choose from: runs at the study's
                                                # sweep seed on its sweep tasks decide (held-out score)


@dataclass
class Sweep:
    """Where a row's learning rate is chosen (`lr_sweep` entries): these tasks at this seed, the
    rate with the best mean held-out main metric (at each run's selected epoch) wins; the
    sweep seed is never a reported one."""
    seed: int = 1
    tasks: list[str] = field(default_factory=list)   # default: the study's tasks


@dataclass
class Study:
    name: str
    tasks: list[str]
    methods: list[MethodEntry]
    models: list[str] = field(default_factory=lambda: ["minilm-l6"])
    seeds: list[int] = field(default_factory=lambda: [42])
    shots: list[int] = field(default_factory=list)  # few-shot axis: k per class for runs on the targets
    defaults: dict = field(default_factory=dict)  # a config layer under every run (train, model, data)
    out_dir: str = ""                             # default: runs/<study name>
    sweep: Sweep = field(default_factory=Sweep)   # where lr_sweep entries choose their rate
    first: list[str] = field(default_factory=list)  # row labels run before all others (their sweeps,
                                                  # the runs they need, their seeds, seed by seed)
    first_seeds: list[int] = field(default_factory=list)  # only these seeds of the `first` rows go
                                                  # first (default: all); their other seeds after the rest

    # Set by the planner or the command, never by the YAML: `waiting` and `chosen` (the rows a
    # sweep holds back, the rates finished sweeps chose) and `archived` (a results archive's
    # finished runs by (label, folder name): a sweep run found there counts as finished).


@dataclass
class Node:
    index: int
    stage: str
    label: str
    task: str
    seed: int
    model: str
    config: dict                   # the user layer handed to stages.resolve
    folder: Path
    deps: list[int] = field(default_factory=list)
    row: str = ""                  # the entry whose planning added it first (a sweep's too)


def load_study(path: str | Path) -> Study:
    data = load_yaml(path)
    study = build(Study, data, where=f"study {Path(path).name}")
    from adapterbench.tasks import NAME
    if not NAME.match(study.name or ""):
        raise UserError(f"study {path}: name {study.name!r} must be letters, digits, '_', '-' or '.' "
                        f"(it names the study's folder)")
    labels = [m.label or m.name for m in study.methods]
    if len(set(labels)) != len(labels):
        raise UserError(f"study {path}: two method entries share the label '{_dup(labels)}': give each a label")
    unknown = [r for r in study.first if r not in labels]
    if unknown:
        raise UserError(f"study {path}: first names '{unknown[0]}', which is not a method label of the study "
                        f"({', '.join(labels)}): use one of those")
    if study.first_seeds and not study.first:
        raise UserError(f"study {path}: first_seeds needs `first` (the rows whose seeds go first)")
    seeds = {*study.seeds, *(x for m in study.methods for x in m.seeds)}
    if odd := [x for x in study.first_seeds if x not in seeds]:
        raise UserError(f"study {path}: first_seeds names seed {odd[0]}, which no row runs: use some of {sorted(seeds)}")
    if not study.out_dir:
        study.out_dir = str(Path("runs") / study.name)
    return study


def _dup(items):
    seen = set()
    return next(x for x in items if x in seen or seen.add(x))


def plan(study: Study) -> list[Node]:
    """Every run of the study in dependency order, each planned once. Rows whose learning rate a
    sweep chooses are planned once the sweep has finished (`study.waiting` says why not yet,
    `study.chosen` what each finished sweep chose)."""
    return Planner(study).plan()


class Planner:
    """Builds a study's nodes: one per run folder, so a run two rows need is planned once."""

    def __init__(self, study: Study):
        self.study = study
        self.nodes: dict[Path, Node] = {}
        self.by_index: dict[int, Node] = {}
        self.entries = {m.label or m.name: m for m in study.methods}
        self.row = ""                   # the entry being planned: its new nodes (and their needs) are its

    def plan(self) -> list[Node]:
        study = self.study
        self.choose_rates()
        all_seeds = list(dict.fromkeys([*study.seeds, *(s for e in study.methods for s in e.seeds)]))
        for model in study.models:
            for seed in all_seeds:
                for shots in study.shots or [0]:
                    self.grid_cell(model, seed, shots)
        return run_order(sorted(self.nodes.values(), key=lambda n: n.index), study.first,
                                study.first_seeds and [*study.first_seeds, study.sweep.seed])

    def grid_cell(self, model: str, seed: int, shots: int) -> None:
        """Every row's runs at one model, seed and shot count: per task, then multi-task rows."""
        study = self.study
        runs_here = [self.entries[e.label or e.name] for e in study.methods if seed in (e.seeds or study.seeds)
                     and (e.label or e.name) not in study.waiting]
        for task in study.tasks:
            for entry in runs_here:
                if get_method(entry.name).STAGE != "multitask" and (not entry.tasks or task in entry.tasks):
                    self.row = entry.label or entry.name
                    self.add(entry, task, seed, model, shots)
        for entry in runs_here:  # a multi-task entry is one run over all the study's tasks
            if get_method(entry.name).STAGE == "multitask":
                self.row = entry.label or entry.name
                self.add(entry, ",".join(study.tasks), seed, model, shots)

    def choose_rates(self) -> None:
        """Rows with an lr_sweep: their rate from the finished sweep (planning the sweep's runs)."""
        study = self.study
        study.waiting, study.chosen = {}, {}
        uses = lambda e: bool(e.merge or takes_sources(get_method(e.name)))   # noqa: E731
        for model in study.models:
            for entry in sorted(study.methods, key=uses):   # rows with sources last: they need their source's rate
                label = self.row = entry.label or entry.name
                src = self.entries.get(entry.source_method) if uses(entry) else None
                if src is not None and src.lr_sweep:    # its source row's rate is not chosen yet
                    study.waiting[label] = f"waits for {src.label or src.name}'s learning rate"
                elif entry.lr_sweep:
                    lr, why = sweep_rate(study, entry, model, lambda *a: self.by_index[self.add(*a)].folder)
                    if lr is None:
                        study.waiting[label] = why
                    else:
                        study.chosen[label] = {"lr": lr, "by": why}
                        self.entries[label] = replace(entry, train={**entry.train, "lr": lr}, lr_sweep=[])

    def node(self, stage, label, task, seed, model, config, folder, deps) -> int:
        if folder not in self.nodes:
            self.nodes[folder] = Node(len(self.nodes), stage, label, task, seed, model, config, folder, deps, self.row)
            self.by_index[self.nodes[folder].index] = self.nodes[folder]
        return self.nodes[folder].index

    def source_entry(self, entry: MethodEntry) -> MethodEntry:
        """The row a fusion or merge row takes its adapters from (source_method)."""
        label = entry.label or entry.name
        src_entry = self.entries.get(entry.source_method)
        if src_entry is entry or (src_entry is not None and (src_entry.merge or takes_sources(get_method(src_entry.name)))):
            raise UserError(f"{entry.name} entry '{label}': source_method '{entry.source_method}' must name an entry "
                            f"that trains adapters itself (not itself, a fusion or a merge): the study would "
                            f"depend on itself")
        if src_entry is None:
            raise UserError(f"{entry.name} entry '{label}': source_method '{entry.source_method}' is not "
                            f"a method label of the study ({', '.join(self.entries)})")
        return src_entry

    def sources(self, entry: MethodEntry, task: str, seed: int, model: str) -> tuple[list[int], list[str], str | None]:
        """(dependencies, adapter folders, the encoder folder they were trained on when that is
        not the study model's: an MT-A run's base_model) of a fusion or merge entry on `task`."""
        study, label = self.study, entry.label or entry.name
        own = entry.include_target if entry.include_target is not None else not entry.merge
        track = load_task(task).track if entry.merge and merge_spec(entry.merge, label)["same_track"] else None
        keep = lambda t: (own or t != task) and (track is None or load_task(t).track == track)  # noqa: E731
        if entry.adapters:
            found = expand_adapters(entry.adapters, label)
            return [], [str(p) for p, t in found if keep(t)], None
        src_entry = self.source_entry(entry)
        wanted = [t for t in (entry.sources or study.tasks) if keep(t)]   # a same-track merge trains only its track
        if entry.merge and not wanted:
            raise UserError(f"merge entry '{label}': no source task is in track '{track}' of {task} (sources: "
                            f"{', '.join(entry.sources or study.tasks)}): add one, or drop merge.same_track")
        if get_method(src_entry.name).STAGE == "multitask":   # Fusion w/ MT-A: the adapters one run exported,
            if entry.merge:                                    # on the encoder it fine-tuned with them
                raise UserError(f"merge entry '{label}': source_method '{entry.source_method}' is a multi-task run, "
                                f"whose adapters need its own fine-tuned encoder: merge single-task adapters")
            mt = self.add(src_entry, ",".join(study.tasks), seed, model, 0)
            root = self.by_index[mt].folder.resolve() / "multitask"
            return [mt], [str(root / "adapters" / load_task(t).name) for t in wanted], str(root / "base_model")
        deps = [self.add(src_entry, t, seed, model, 0) for t in wanted]
        return deps, [str(self.by_index[i].folder.resolve()) for i in deps], None

    def add(self, entry: MethodEntry, task: str, seed: int, model: str, shots: int) -> int:
        """The node of one run of `entry` (and, first, the nodes it needs)."""
        study, label = self.study, entry.label or entry.name
        method = get_method(entry.name)
        deps = []
        layer = {"task": task, "seed": seed, "model": {"name": model}, "out_dir": study.out_dir,
                 "label": label, "method": {"name": entry.name, **entry.method}, "train": dict(entry.train)}
        if "tracker_project" not in {**study.defaults.get("train", {}), **entry.train}:
            layer["train"]["tracker_project"] = study.name     # the trackers file a study's runs together
        if entry.sampling:
            layer["sampling"] = dict(entry.sampling)
        if shots and "shots" not in entry.train:
            layer["train"]["shots"] = shots
        if entry.merge:  # merge the sources first; the run starts from the merged adapter
            deps = [self.merge_node(entry, layer, task, seed, model)]
            label = layer["label"]
        elif takes_sources(method):
            deps, layer["method"]["adapters"], encoder = self.sources(entry, task, seed, model)
            if encoder:
                layer["method"].setdefault("encoder", encoder)
        user = deep_merge(study.defaults, layer)
        stage = method.STAGE
        folder = planned_folder(stage, resolve(user, stage))
        shown = f"{label} k={layer['train']['shots']}" if layer["train"].get("shots") else label
        return self.node(stage, shown, task, seed, model, user, folder, deps)

    def merge_node(self, entry: MethodEntry, layer: dict, task: str, seed: int, model: str) -> int:
        """A merge row's merge of its sources (the run then starts from it: `layer["init_from"]`)."""
        study, label = self.study, layer["label"]
        deps, paths, _ = self.sources(entry, task, seed, model)
        how = merge_spec(entry.merge, label)
        if len(paths) == 1:   # one source: nothing is merged, it is transfer
            label = layer["label"] = f"{label} (transfer)"
        spec = {"adapters": paths, "target": task, **how}
        here = Path(study.out_dir) / "merge" / slug(label) / load_task(task).name
        named = [portable(p, study.out_dir) for p in paths]
        folder = (here / f"{slug(model)}-{merge_digest(named, task, how)}").resolve()
        earlier = (here / f"{slug(model)}-{merge_digest(paths, task, how)}").resolve()   # by full paths
        if not folder.exists() and status_of(earlier) == "ok":
            folder = earlier
        layer["init_from"] = str(folder)
        return self.node("merge", label, task, seed, model, spec, folder, deps)


def run_order(nodes: list[Node], first: list[str], seeds: list[int] | None = None) -> list[Node]:
    """The plan reordered so the runs of the `first` rows (none: plan order; at `seeds` only, when given: a study's
    first_seeds and its sweep seed) come before every other run (in plan order otherwise: sweeps,
    then seed by seed), each run after the runs it needs, and a run that needs others (a fusion
    over its sources) as soon as they are all placed, among runs of its own group (first or not);
    indexes renumbered. A study puts its cheap rows first so their claims become testable early;
    the sources' weights are needed on disk for the shortest time, so a study folder lost in
    between (resuming with --skip-archived) retrains fewest of them."""
    by_index = {nd.index: nd for nd in nodes}
    early = lambda nd: nd.row in first and (not seeds or nd.seed in seeds)   # noqa: E731
    key = lambda nd: (not early(nd), nd.index)   # noqa: E731
    needed_by: dict[int, list[Node]] = {}
    for nd in sorted(nodes, key=key):
        for d in nd.deps:
            needed_by.setdefault(d, []).append(nd)
    order: list[Node] = []
    placed: set[int] = set()      # taken up (its needs may still be on the way)
    ordered: set[int] = set()     # in `order`

    def place(nd: Node) -> None:
        if nd.index in placed:
            return
        placed.add(nd.index)
        for d in nd.deps:
            place(by_index[d])
        order.append(nd)
        ordered.add(nd.index)
        for user in needed_by.get(nd.index, ()):
            if early(user) == early(nd) and all(d in ordered for d in user.deps):
                place(user)

    for nd in sorted(nodes, key=key):
        place(nd)
    new = {nd.index: i for i, nd in enumerate(order)}
    return [replace(nd, index=new[nd.index], deps=[new[d] for d in nd.deps]) for nd in order]


def sweep_rate(study: Study, entry: MethodEntry, model: str, place) -> tuple[float | None, str]:
    """Plan `entry`'s sweep runs (one per rate and sweep task, at the sweep seed, each its own row
    'label lr=V') and return (the chosen rate, how) once all have finished, else (None, how far
    the sweep is). The choice reads only held-out scores (`train.selection=heldout`, the
    default): the mean over the sweep tasks of the main metric at each run's selected epoch."""
    from adapterbench.methods import get_method
    label = entry.label or entry.name
    if entry.train.get("selection", study.defaults.get("train", {}).get("selection", "heldout")) != "heldout":
        raise UserError(f"entry '{label}': lr_sweep chooses on the held-out slice; drop its train.selection")
    if study.sweep.seed in (entry.seeds or study.seeds):
        raise UserError(f"entry '{label}': the sweep seed {study.sweep.seed} is also a reported seed: "
                        f"a rate chosen on a run must not be reported with it; change sweep.seed or seeds")
    multi = get_method(entry.name).STAGE == "multitask"
    tasks = [",".join(study.tasks)] if multi else (study.sweep.tasks or study.tasks)
    scores: dict[float, list] = {}
    archived = getattr(study, "archived", {})
    for lr in entry.lr_sweep:
        trial = replace(entry, label=f"{label} lr={lr:g}", train={**entry.train, "lr": lr}, lr_sweep=[], seeds=[])
        for task in tasks:
            folder = place(trial, task, study.sweep.seed, model, 0)   # plans the run, returns its folder
            scores.setdefault(lr, []).append(heldout_score(folder, archived.get((trial.label, folder.name))))
    done = sum(v is not None for vs in scores.values() for v in vs)
    total = sum(len(vs) for vs in scores.values())
    if done < total:
        return None, f"lr sweep {done} of {total} runs done"
    means = {lr: sum(vs) / len(vs) for lr, vs in scores.items()}
    best = max(means, key=lambda lr: (means[lr], -lr))    # a tie goes to the smaller rate
    return best, ", ".join(f"{lr:g}: {m:.2f}" for lr, m in means.items()) + f" (held-out, seed {study.sweep.seed})"


def heldout_score(folder: Path, archived=None) -> float | None:
    """A finished run's held-out selection value: the mean over its tasks of the main metric on
    the held-out slice at the selected epoch (None: not finished, or selected on another split).
    `archived`: the run's finished RunRecord in a results archive, read when its folder is not."""
    if status_of(folder) == "ok":
        tasks = json.loads((folder / "metrics.json").read_text())["tasks"]
    elif archived is not None:
        tasks = archived.tasks
    else:
        return None
    held = [t["heldout"][t["main_metric"]] for t in tasks.values() if "heldout" in t]
    return sum(held) / len(held) if held and len(held) == len(tasks) else None


MERGE_KEYS = {"strategy": "avg", "same_track": False, "weights": None, "align_on": None}


def merge_digest(sources: list[str], target: str, how: dict) -> str:
    """The short hash naming a merged adapter's folder: its sources, target and merge settings."""
    return hashlib.sha256(json.dumps({"sources": sources, "target": target, **how},
                                     sort_keys=True).encode()).hexdigest()[:8]


def merge_spec(spec: dict, label: str) -> dict:
    """An entry's `merge:` block with defaults; unknown keys are errors."""
    check_keys(spec, MERGE_KEYS, f"merge entry '{label}'", prefix="merge.")
    return {**MERGE_KEYS, **spec}


def expand_adapters(patterns: list[str], label: str) -> list[tuple[Path, str]]:
    """(adapter folder, its task) for every folder the patterns (globs, ~ and $VARS) match."""
    import glob

    from adapterbench.fileio import read_json
    from adapterbench.recipe.artifacts import adapter_folder
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expandvars(os.path.expanduser(pattern))))
        if not hits:
            raise UserError(f"entry '{label}': adapters pattern '{pattern}' matches no folder: train those "
                            f"adapters first or fix the path")
        for hit in hits:
            folder = adapter_folder(hit)
            out.append((Path(hit).resolve(), read_json(folder / "adapter_config.json").get("task")))
    return out


def state(node: Node) -> str:
    st = status_of(node.folder)
    if st == "ok":
        return "done"
    if locked(node):
        return "running"
    if st in ("failed",):
        return "failed"
    return "pending"


def selected(nodes: list[Node], patterns: list[str]) -> set[int]:
    """Indices of the nodes whose row label ('fusion', 'adapter k=32') matches one of the shell
    patterns, with every run they depend on."""
    from fnmatch import fnmatch
    keep = {nd.index for nd in nodes if any(fnmatch(nd.label, p) for p in patterns)}
    if not keep:
        labels = sorted({nd.label for nd in nodes})
        raise UserError(f"--only {','.join(patterns)} matches no run of the study (rows: {', '.join(labels)})")
    return with_deps(nodes, keep)


def with_deps(nodes: list[Node], start: set[int]) -> set[int]:
    """`start` and every run they depend on, directly or not."""
    keep, todo = set(start), list(start)
    while todo:
        for d in nodes[todo.pop()].deps:
            if d not in keep:
                keep.add(d)
                todo.append(d)
    return keep


