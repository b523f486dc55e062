"""Studies: one YAML grid -> all its runs, with dependencies, skip-done, locks and resume.

A study names models, tasks, seeds and method entries; every (model, task, seed, entry)
becomes one run. A fusion entry depends on the adapters of its source tasks (trained by
another entry, `source_method`), which are planned once however many fusions need them.
A run is identified by its folder (stage/method/task/model-seed-confighash), so a finished
run with the same resolved config is never trained twice, and a restarted study goes on
where it stopped. Workers (processes or machines sharing the folder) claim a run by
creating `<run folder>.lock` exclusively; a lock whose process is gone is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import build, deep_merge, load_yaml, portable
from .errors import UserError
from .runs import RunExists, read_archive_lines, read_json, slug, status_of, write_json



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


def load_study(path: str | Path) -> Study:
    data = load_yaml(path)
    study = build(Study, data, where=f"study {Path(path).name}")
    from .tasks import NAME
    if not NAME.match(study.name or ""):
        raise UserError(f"study {path}: name {study.name!r} must be letters, digits, '_', '-' or '.' "
                        f"(it names the study's folder)")
    labels = [m.label or m.name for m in study.methods]
    if len(set(labels)) != len(labels):
        raise UserError(f"study {path}: two method entries share the label '{_dup(labels)}': give each a label")
    if not study.out_dir:
        study.out_dir = str(Path("runs") / study.name)
    return study


def _dup(items):
    seen = set()
    return next(x for x in items if x in seen or seen.add(x))


def plan(study: Study) -> list[Node]:
    """Every run of the study in dependency order, each planned once."""
    from .methods import get_method
    from .stages import planned_folder, resolve
    from .tasks import load_task
    nodes: dict[Path, Node] = {}
    by_index: dict[int, Node] = {}
    entries = {m.label or m.name: m for m in study.methods}

    def node(stage, label, task, seed, model, config, folder, deps) -> int:
        if folder not in nodes:
            nodes[folder] = Node(len(nodes), stage, label, task, seed, model, config, folder, deps)
            by_index[nodes[folder].index] = nodes[folder]
        return nodes[folder].index

    def sources(entry: MethodEntry, task: str, seed: int, model: str) -> tuple[list[int], list[str]]:
        """(dependencies, adapter folders) of a fusion or merge entry on target `task`."""
        label = entry.label or entry.name
        own = entry.include_target if entry.include_target is not None else not entry.merge
        track = load_task(task).track if entry.merge and merge_spec(entry.merge, label)["same_track"] else None
        keep = lambda t: (own or t != task) and (track is None or load_task(t).track == track)  # noqa: E731
        if entry.adapters:
            found = expand_adapters(entry.adapters, label)
            return [], [str(p) for p, t in found if keep(t)]
        src_entry = entries.get(entry.source_method)
        if src_entry is entry or (src_entry is not None and (src_entry.merge or takes_sources(get_method(src_entry.name)))):
            raise UserError(f"{entry.name} entry '{label}': source_method '{entry.source_method}' must name an entry "
                            f"that trains adapters itself (not itself, a fusion or a merge): the study would "
                            f"depend on itself")
        if src_entry is None:
            raise UserError(f"{entry.name} entry '{label}': source_method '{entry.source_method}' is not "
                            f"a method label of the study ({', '.join(entries)})")
        wanted = [t for t in (entry.sources or study.tasks) if keep(t)]   # a same-track merge trains only its track
        if entry.merge and not wanted:
            raise UserError(f"merge entry '{label}': no source task is in track '{track}' of {task} (sources: "
                            f"{', '.join(entry.sources or study.tasks)}): add one, or drop merge.same_track")
        if get_method(src_entry.name).STAGE == "multitask":   # Fusion w/ MT-A: the adapters one run exported
            mt = add(src_entry, ",".join(study.tasks), seed, model, 0)
            root = by_index[mt].folder.resolve() / "multitask" / "adapters"
            return [mt], [str(root / load_task(t).name) for t in wanted]
        deps = [add(src_entry, t, seed, model, 0) for t in wanted]
        return deps, [str(by_index[i].folder.resolve()) for i in deps]

    def add(entry: MethodEntry, task: str, seed: int, model: str, shots: int) -> int:
        label = entry.label or entry.name
        method = get_method(entry.name)
        deps = []
        layer = {"task": task, "seed": seed, "model": {"name": model}, "out_dir": study.out_dir,
                 "label": label, "method": {"name": entry.name, **entry.method}, "train": dict(entry.train)}
        if entry.sampling:
            layer["sampling"] = dict(entry.sampling)
        if shots and "shots" not in entry.train:
            layer["train"]["shots"] = shots
        if entry.merge:  # merge the sources first; the run starts from the merged adapter
            deps, paths = sources(entry, task, seed, model)
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
            deps = [node("merge", label, task, seed, model, spec, folder, deps)]
            layer["init_from"] = str(folder)
        elif takes_sources(method):
            deps, layer["method"]["adapters"] = sources(entry, task, seed, model)
        user = deep_merge(study.defaults, layer)
        stage = method.STAGE
        folder = planned_folder(stage, resolve(user, stage))
        shown = f"{label} k={layer['train']['shots']}" if layer["train"].get("shots") else label
        return node(stage, shown, task, seed, model, user, folder, deps)

    all_seeds = list(dict.fromkeys([*study.seeds, *(s for e in study.methods for s in e.seeds)]))
    for model in study.models:
        for seed in all_seeds:
            for shots in study.shots or [0]:
                runs_here = [e for e in study.methods if seed in (e.seeds or study.seeds)]
                for task in study.tasks:
                    for entry in runs_here:
                        if get_method(entry.name).STAGE != "multitask" and (not entry.tasks or task in entry.tasks):
                            add(entry, task, seed, model, shots)
                for entry in runs_here:  # a multi-task entry is one run over all the study's tasks
                    if get_method(entry.name).STAGE == "multitask":
                        add(entry, ",".join(study.tasks), seed, model, shots)
    return sorted(nodes.values(), key=lambda n: n.index)


MERGE_KEYS = {"strategy": "avg", "same_track": False, "weights": None, "align_on": None}


def merge_digest(sources: list[str], target: str, how: dict) -> str:
    """The short hash naming a merged adapter's folder: its sources, target and merge settings."""
    return hashlib.sha256(json.dumps({"sources": sources, "target": target, **how},
                                     sort_keys=True).encode()).hexdigest()[:8]


def merge_spec(spec: dict, label: str) -> dict:
    """An entry's `merge:` block with defaults; unknown keys are errors."""
    unknown = sorted(set(spec) - set(MERGE_KEYS))
    if unknown:
        raise UserError(f"merge entry '{label}': unknown key merge.{unknown[0]} (valid: {', '.join(MERGE_KEYS)})")
    return {**MERGE_KEYS, **spec}


def expand_adapters(patterns: list[str], label: str) -> list[tuple[Path, str]]:
    """(adapter folder, its task) for every folder the patterns (globs, ~ and $VARS) match."""
    import glob
    from .artifacts import adapter_folder
    from .runs import read_json
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


def run_merge(node: Node) -> None:
    """A study's merge node: the merged adapter folder, marked done by its metrics.json."""
    from .merge import merge
    c = node.config
    merge(c["adapters"], c["strategy"], c["weights"], node.folder, target=c["target"],
          same_track_only=c["same_track"], include_target=True, align_on=c["align_on"], force=True)
    write_json(node.folder / "metrics.json", {"status": "ok", "stage": "merge", "label": node.label,
                                              "task": c["target"], "main_value": None, "sources": c["adapters"]})


# --- locks ---------------------------------------------------------------------------------

def lock_path(node: Node) -> Path:
    return node.folder.with_name(node.folder.name + ".lock")


LOCK_TIMEOUT = float(os.environ.get("ADAPTERBENCH_LOCK_TIMEOUT", 300))   # seconds without a heartbeat
HEARTBEAT_EVERY = float(os.environ.get("ADAPTERBENCH_HEARTBEAT", 30))


def lock_record() -> dict:
    """Who holds a lock: host, pid, the SLURM job (array job_task when in an array), heartbeat."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID")
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "started": now, "heartbeat": now}


def try_lock(node: Node) -> bool:
    """Claim a run by creating its lock exclusively; a stale lock (its process gone on this
    host, or no heartbeat for LOCK_TIMEOUT seconds from any host) is taken over."""
    path = lock_path(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = read_lock(path)
            if not _stale(path, seen) or not _take_over(path, seen):
                return False
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(lock_record(), f)
        return True
    return False


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _take_over(path: Path, seen: dict | None) -> bool:
    """Move a stale lock aside; if what was moved is not the lock judged stale (another worker
    took it over meanwhile), put it back."""
    grave = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True                      # gone already: try to create it
    if read_lock(grave) != seen:
        try:
            os.link(grave, path)         # put the fresh lock back (fails if a new one exists)
        except FileExistsError:
            pass
        grave.unlink(missing_ok=True)
        return False
    grave.unlink(missing_ok=True)
    return True


def _stale(path: Path, info: dict | None = None) -> bool:
    info = info if info is not None else read_lock(path)
    if info is None:
        return time.time() - path.stat().st_mtime > 60 if path.exists() else True
    if time.time() - float(info.get("heartbeat", info.get("time", 0))) > LOCK_TIMEOUT:
        return True                      # no heartbeat for too long: dead, on whatever host
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


class Heartbeat:
    """While a run trains, rewrite its lock's heartbeat every HEARTBEAT_EVERY seconds (a thread)."""

    def __init__(self, node: Node):
        import threading
        self.path, self.stop = lock_path(node), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        from .runs import write_json
        while not self.stop.wait(HEARTBEAT_EVERY):
            info = read_lock(self.path)
            if info is None or info.get("pid") != os.getpid():
                return                   # no longer ours
            info["heartbeat"] = time.time()
            try:
                write_json(self.path, info)
            except Exception:
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def unlock(node: Node) -> None:
    lock_path(node).unlink(missing_ok=True)


def locked(node: Node) -> bool:
    return lock_path(node).exists() and not _stale(lock_path(node))


# --- running -------------------------------------------------------------------------------

def state(node: Node) -> str:
    st = status_of(node.folder)
    if st == "ok":
        return "done"
    if locked(node):
        return "running"
    if st in ("failed",):
        return "failed"
    return "pending"


def status_table(nodes: list[Node]) -> list[dict]:
    """Every run of a plan: done / running (host, job, heartbeat age, progress) / queued / failed /
    blocked (a run it needs failed)."""
    states = {nd.index: state(nd) for nd in nodes}
    out = []
    for nd in nodes:
        st, detail = states[nd.index], ""
        if st == "running":
            info = read_lock(lock_path(nd)) or {}
            age = time.time() - float(info.get("heartbeat", time.time()))
            detail = f"{info.get('host')} pid {info.get('pid')} job {info.get('job') or '-'}, heartbeat {age:.0f}s ago"
            detail += progress(nd)
        elif st == "pending":
            st = "blocked" if any(states[d] in ("failed", "blocked") for d in nd.deps) else "queued"
            if (nd.folder / "checkpoint" / "latest.json").is_file():
                detail = "has a checkpoint: resumes"
        elif st == "failed":
            from .runs import read_json
            try:
                detail = str(read_json(nd.folder / "metrics.json").get("error", ""))[:100]
            except Exception:
                detail = ""
        states[nd.index] = st if st != "pending" else states[nd.index]
        out.append({"index": nd.index, "stage": nd.stage, "label": nd.label, "task": nd.task, "seed": nd.seed,
                    "state": st, "detail": detail, "folder": str(nd.folder)})
    return out


def progress(node: Node) -> str:
    """Where a running run is, from the last step its log.jsonl recorded: '; epoch 2/3, step 1800,
    9.3 samples/s' ('' before its first logged step)."""
    try:
        with open(node.folder / "log.jsonl", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4096))                # the last records are enough
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue                      # a line cut by the seek, or one being written
        if isinstance(rec, dict) and "step" in rec and "samples_per_s" in rec:
            epochs = _resolved_epochs(node)
            return (f"; epoch {int(rec.get('epoch', 0)) + 1}/{epochs or '?'}, step {rec['step']}, "
                    f"{float(rec['samples_per_s']):.1f} samples/s")
    return ""


def _resolved_epochs(node: Node):
    """The epoch budget the run folder's resolved config.yaml names (method defaults included)."""
    try:
        cfg = load_yaml(node.folder / "config.yaml")
    except (UserError, OSError):
        return None
    return (cfg.get("train") or {}).get("epochs") if isinstance(cfg, dict) else None


def run_seconds(folder: Path) -> float | None:
    """How long a finished run took: the larger of its wall clock and its training time (a resumed
    run's wall clock counts only its last leg; training time leaves out loading and dev scoring);
    0 for a step that records neither (a merge takes seconds); None when unreadable."""
    try:
        return recorded_seconds(read_json(Path(folder) / "metrics.json"))
    except (UserError, OSError, TypeError, ValueError):
        return None


def recorded_seconds(metrics: dict) -> float:
    """A finished run's time from its metrics (a folder's metrics.json or an archive line), as `run_seconds`."""
    return max(float(metrics.get("wall_seconds") or 0), float(metrics.get("train_seconds") or 0))


def remaining(rows: list[dict], now: float | None = None) -> dict:
    """What the unfinished runs of a plan (status_table rows) still need, in run-seconds: each
    queued or running run is estimated by what the archive recorded for its cell (`mark_archived`)
    or else by the median time of the finished (or archived) runs of the same row, stage and task
    (other seeds), less what a running run has spent in its current leg. Returns
    {"seconds", "estimated": runs estimated, "unknown": runs with no finished run to go by}."""
    import statistics
    now = time.time() if now is None else now
    taken: dict[tuple, list[float]] = {}
    for r in rows:
        s = r["seconds"] if r["state"] == "archived" else run_seconds(r["folder"]) if r["state"] == "done" else None
        if s is not None:
            taken.setdefault((r["label"], r["stage"], r["task"]), []).append(s)
    seconds, estimated, unknown = 0.0, 0, 0
    for r in rows:
        if r["state"] not in ("queued", "running"):
            continue
        if r["stage"] == "merge":        # a merge takes seconds
            estimated += 1
            continue
        peers = taken.get((r["label"], r["stage"], r["task"]))
        if r.get("expect") is None and not peers:
            unknown += 1
            continue
        need = r["expect"] if r.get("expect") is not None else statistics.median(peers)
        if r["state"] == "running":
            try:
                need -= now - float(read_json(Path(r["folder"]) / "metrics.json").get("started", now))
            except (UserError, OSError, TypeError, ValueError):
                pass                                   # no start time yet: count the whole run
        seconds += max(need, 0.0)
        estimated += 1
    return {"seconds": seconds, "estimated": estimated, "unknown": unknown}


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


def archived(nodes: list[Node], records: dict[tuple, dict], among: set[int] | None = None) -> tuple[set[int], int]:
    """(runs to skip, stale count) for a study resuming from a results archive (its `archive_records`).
    Skipped: the runs (of `among`, default all) the archive holds (`archive_matches`) that no run
    still to do needs as a dependency, so a study whose folder was lost retrains only what the
    archive lacks and the weights those runs need (Fusion w/ MT-A needs its MT-A run). Stale: runs
    still to do whose cell (row, tasks, seed, model) the archive holds under another config; they
    run again."""
    pool = set(range(len(nodes))) if among is None else set(among)
    runs = {i for i in pool if nodes[i].stage != "merge"}         # merges: only when a run needs one
    have = set(archive_matches(nodes, records, runs))
    skip = pool - with_deps(nodes, runs - have)
    cells = {record_cell(r) for r in records.values()}
    stale = sum(1 for i in runs - have if node_cell(nodes[i]) in cells)
    return skip, stale


def archive_matches(nodes: list[Node], records: dict[tuple, dict], among) -> dict[int, tuple]:
    """The archive key of each run of `among` the archive holds: the record with its row label and
    folder name, else, for a run that names other runs' folders (a fusion's sources, a merged
    start), a record of its cell that an earlier version named by those folders' full paths
    (before identities were portable) with the same config once they are compared inside the
    output root (`inside_root`). As with other runs archived before tasks had an identity, such a
    match is by config alone: the archive records no data content."""
    out, by_cell = {}, {}
    for key, record in records.items():
        by_cell.setdefault(record_cell(record), []).append(key)
    for i in among:
        nd = nodes[i]
        if (nd.label, nd.folder.name) in records:
            out[i] = (nd.label, nd.folder.name)
        elif names_other_runs(nd) and (mine := inside_root(nd, nodes)) is not None:
            out.update({i: key for key in by_cell.get(node_cell(nd), ()) if archived_inside_root(records[key]) == mine})
    return out


def names_other_runs(node: Node) -> bool:
    """A run whose config names other runs' folders: a fusion's sources, a merged start."""
    return bool(node.config.get("init_from") or (node.config.get("method") or {}).get("adapters"))


def inside_root(node: Node, nodes: list[Node]) -> str | None:
    """A planned run's config hash with the folders it names written inside the output root
    (`_hash_inside`), to compare with `archived_inside_root`."""
    from .config import to_dict
    from .stages import resolve
    cfg = to_dict(resolve(node.config, node.stage))
    inside = lambda p: q if (q := portable(p, cfg["out_dir"])).startswith("<out_dir>/") else None  # noqa: E731
    spec = next((nodes[d].config for d in node.deps if nodes[d].stage == "merge"), None)
    return _hash_inside(cfg, inside, spec and (spec["adapters"], spec))


def archived_inside_root(record: dict) -> str | None:
    """An archived run's config hash as `inside_root` makes it. `adapterbench archive` writes the
    folders a config names relative to the folder above the study's ('<study>/extract/...'); a
    merged start is read from the merge's record, whose sources are adapter folders ('.../adapter')."""
    inside = lambda p: "<out_dir>/" + p.split("/", 1)[1] if "/" in p and not p.startswith("/") else None  # noqa: E731
    merge = record.get("merge")
    sources = merge and [s["path"].removesuffix("/adapter") for s in merge.get("sources") or []]
    return _hash_inside(json.loads(json.dumps(record.get("config") or {})), inside, merge and (sources, merge))


def _hash_inside(cfg: dict, inside, merged: tuple | None) -> str | None:
    """config_hash of `cfg` with a fusion's sources written by `inside` (None: outside the root)
    and a merged start (`init_from`) replaced by what decides it, `merged` = (source folders,
    merge settings): sources, target, strategy, same_track, align_on and weights (None meaning
    equal weights, as `merge` records them). None where a folder lies outside the root or a start
    has no merge to describe it."""
    from .config import config_hash
    method = cfg.get("method") or {}
    if method.get("adapters"):
        method["adapters"] = [inside(p) for p in method["adapters"]]
    if cfg.get("init_from"):
        if not merged:
            return None
        paths, how = merged
        cfg["init_from"] = {"sources": [inside(p) for p in paths], "target": how.get("target"),
                            "strategy": how.get("strategy"), "same_track": how.get("same_track"),
                            "align_on": how.get("align_on"),
                            "weights": [float(w) for w in how.get("weights") or [1.0] * len(paths)]}
    named = [*(method.get("adapters") or []), *((cfg.get("init_from") or {}).get("sources") or [])]
    return None if not cfg or None in named else config_hash(cfg, portable_paths=False)


def node_cell(node: Node) -> tuple:
    """A planned run's cell of a results table: (row label, task names, seed, model)."""
    from .tasks import load_task
    return node.label, tuple(sorted(load_task(t).name for t in node.task.split(","))), node.seed, node.model


def record_cell(record: dict) -> tuple:
    """An archived run's cell, as `node_cell`."""
    return record.get("label"), tuple(sorted(record.get("tasks") or [])), record.get("seed"), record.get("model")


# Why a run still to do can have a cell the archive holds under another folder name.
STALE_WHY = "a setting, a default, or a source run it uses has changed since"


def archive_records(archive: Path) -> dict[tuple, dict]:
    """A results archive's records by (row label, run folder name); one clear line when it is missing."""
    if not Path(archive).is_file():
        raise UserError(f"archive {archive} does not exist: pass the .jsonl `adapterbench archive` wrote")
    return {key: json.loads(line) for key, line in read_archive_lines(archive).items()}


def mark_archived(rows: list[dict], nodes: list[Node], archive: Path) -> int:
    """Status rows (status_table) of a study resuming from a results archive: the queued runs that
    `run --skip-archived` would skip become 'archived', with the time the archive recorded for
    them (so `remaining` estimates from them). Returns the stale count (see `archived`)."""
    records = archive_records(archive)
    skip, stale = archived(nodes, records)
    matches = archive_matches(nodes, records, [r["index"] for r in rows if r["state"] == "queued"])
    took = {key: recorded_seconds(record) for key, record in records.items()}
    took_in_cell = {record_cell(record): took[key] for key, record in records.items()}
    for r in rows:
        nd = nodes[r["index"]]
        if r["state"] != "queued":
            continue
        own = took.get(matches.get(r["index"]))
        if r["index"] in skip:       # (a merge no run to do needs is skipped too; merges are not archived)
            r["state"], r["detail"], r["seconds"] = "archived", "", own or 0.0
        elif nd.stage != "merge":    # to be rerun: expect what this run, or its cell, took before
            r["expect"] = own if own is not None else took_in_cell.get(node_cell(nd))
    return stale


def bf16_notice(nodes: list[Node], among) -> str | None:
    """One line when runs of `among` not yet finished ask for bf16 and this machine would emulate
    it (`train.precision_warning`: a CPU without AVX512-BF16 or AMX, no GPU): they would train many
    times slower here. The study is left as it is: another precision would make them other runs.
    The machine is asked first, so a machine with native bf16 reads no run folder."""
    import torch

    from . import train
    if train.precision_warning("bf16", "cuda" if torch.cuda.is_available() else "cpu") is None:
        return None
    n = sum(1 for i in among if (nodes[i].config.get("train") or {}).get("precision") == "bf16"
            and status_of(nodes[i].folder) != "ok")
    if not n:
        return None
    return (f"{n} runs still to do ask for train.precision=bf16, which this machine emulates (CPU "
            f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX, no GPU): here they train many "
            f"times slower than where bf16 is native; run them on such a machine (another precision "
            f"would make them other runs)")


def execute(study: Study, nodes: list[Node], retry_failed: bool = False, shard: tuple[int, int] = (0, 1),
            poll: float = 10.0, on_event=lambda node, what: None, only: set[int] | None = None,
            wait_for_others: bool = True) -> dict[str, list[int]]:
    """Run every runnable node this worker may take (in `only`, when given); returns indices by outcome.
    Runs that other workers hold, and runs that need them, are waited for (and a holder that died
    is taken over once its lock goes stale); with `wait_for_others=False` they are left to those
    workers ("left") as soon as nothing else can start, so a queue of phases moves on instead of
    idling through another worker's last run."""
    from .stages import resolve, train_stage
    i, n = shard
    mine = [nd for nd in nodes if nd.index % n == i and (only is None or nd.index in only)]
    outcome = {"done": [], "ran": [], "failed": [], "blocked": [], "left": []}
    retried: set[int] = set()
    while True:
        waiting = False
        progressed = False
        for nd in mine:
            if nd.index in outcome["ran"] or nd.index in outcome["failed"] or nd.index in outcome["blocked"]:
                continue
            st = state(nd)
            if st == "done":
                if nd.index not in outcome["done"]:
                    outcome["done"].append(nd.index)
                continue
            if st == "failed" and not (retry_failed and nd.index not in retried):
                outcome["failed"].append(nd.index)
                on_event(nd, "failed earlier (--retry-failed reruns it)")
                continue
            dep_states = [state(nodes[d]) for d in nd.deps]
            if any(s == "failed" for s in dep_states):
                outcome["blocked"].append(nd.index)
                on_event(nd, "blocked: a run it depends on failed")
                continue
            if any(s != "done" for s in dep_states) or st == "running":
                waiting = True
                continue
            if not try_lock(nd):
                waiting = True
                continue
            try:
                if status_of(nd.folder) == "ok":   # finished by another worker meanwhile
                    continue
                retried.add(nd.index)
                on_event(nd, "start")
                with Heartbeat(nd):
                    if nd.stage == "merge":
                        run_merge(nd)
                    else:
                        train_stage(nd.stage, resolve(nd.config, nd.stage), force=False, show_progress=True,
                                    save_attention=nd.stage == "fuse")   # the paper's attention figure
                outcome["ran"].append(nd.index)
                on_event(nd, "ok")
            except RunExists:
                outcome["done"].append(nd.index)
            except UserError as e:
                mark_failed(nd, e)
                outcome["failed"].append(nd.index)
                on_event(nd, f"failed: {e}")
            except Exception as e:  # a bug or a crash in one run must not stop the study
                mark_failed(nd, e)
                outcome["failed"].append(nd.index)
                on_event(nd, f"failed: {type(e).__name__}: {e}")
            finally:
                unlock(nd)
            progressed = True
        if not waiting:
            return outcome
        if not progressed:
            if not wait_for_others:
                finished = {x for k in ("done", "ran", "failed", "blocked") for x in outcome[k]}
                outcome["left"] = [nd.index for nd in mine if nd.index not in finished]
                return outcome
            time.sleep(poll)


def mark_failed(node: Node, error: BaseException) -> None:
    """A run that failed before its folder existed still gets a `failed` status."""
    if status_of(node.folder) != "failed":
        node.folder.mkdir(parents=True, exist_ok=True)
        write_json(node.folder / "metrics.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})
