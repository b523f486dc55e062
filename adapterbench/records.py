"""Records read back from run folders: a finished run's metrics.json as one archive record
(`archive_record`), an unfinished run's progress from its log (`unfinished_record`), per-task
results of any metrics.json, and the records of a results archive (`read_records`). `archive`
writes and updates archive files. `results/` and `study/` read runs only through these two."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from adapterbench.config import StrictLoader, load_yaml
from adapterbench.errors import UserError
from adapterbench.fileio import file_sha256, read_json


def status_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metrics.json").read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def sealed_files(folder: Path) -> list[str]:
    """The files that say what a run was (config.yaml, task.yaml, a multi-task run's tasks/N.yaml)."""
    folder = Path(folder)
    names = [n for n in ("config.yaml", "task.yaml") if (folder / n).is_file()]
    return names + sorted(p.relative_to(folder).as_posix() for p in folder.glob("tasks/*.yaml"))


def seal(folder: Path) -> dict:
    """{file: sha256} of `sealed_files`, written into metrics.json when the run finishes."""
    return {name: file_sha256(Path(folder) / name) for name in sealed_files(folder)}


def check_seal(folder: Path, metrics: dict | None = None) -> None:
    """A finished run whose config.yaml or task files changed after it finished no longer
    describes its weights and scores: one line naming the file and the fix. Runs finished before
    runs were sealed (no `sealed` in metrics.json) are read as they are."""
    folder = Path(folder)
    if metrics is None:
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            return
    sealed = metrics.get("sealed") if isinstance(metrics, dict) and metrics.get("status") == "ok" else None
    for name, digest in (sealed if isinstance(sealed, dict) else {}).items():
        path = folder / name
        if not path.is_file() or path.is_symlink() or file_sha256(path) != digest:
            raise UserError(f"{path} was {'removed' if not path.exists() else 'changed'} after the run finished "
                            f"(metrics.json's `sealed` holds its sha256): restore it as it was, or train the run "
                            f"again with --force")


def run_config(folder: Path) -> dict:
    """A run folder's resolved config.yaml, checked against its seal when the run finished."""
    check_seal(folder)
    return load_yaml(Path(folder) / "config.yaml")


def task_results(metrics: dict) -> dict:
    """{task: {"dev", "main_metric", "main_value"}} of any run's metrics.json, also of folders
    written before every run had per-task metrics (single-task `metrics.dev`)."""
    if "tasks" in metrics:
        return metrics["tasks"]
    dev = metrics.get("metrics", {}).get("dev", {})
    return {metrics.get("task", "task"): {"dev": dev, "main_metric": metrics.get("main_metric"),
                                          "main_value": metrics.get("main_value")}}


def iter_runs(root: Path):
    """Every run folder (one holding metrics.json) under `root`."""
    for m in sorted(Path(root).glob("**/metrics.json")):
        yield m.parent


def archive_record(folder: Path) -> dict | None:
    """One line of a results archive: a finished run's metrics.json (label, task, model, seed,
    per-task dev metrics, history, best epoch, timing, parameters, method extras), its folder's
    config hash and resolved config, for a run that started from a merged adapter the
    merge's record (sources, relative change, units moved), and for a fusion run that wrote
    attention.csv its attention per source and layer."""
    try:
        m = json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict) or m.get("status") != "ok" or m.get("main_value") is None:
        return None
    check_seal(folder, m)
    try:   # a folder without a readable config.yaml still reports its scores
        config = yaml.load((folder / "config.yaml").read_text(), Loader=StrictLoader)  # noqa: S506
    except (OSError, yaml.YAMLError):
        config = None
    config = config if isinstance(config, dict) else {}
    out = {"run": folder.name, "config_hash": folder.name.rsplit("-", 1)[-1], **m, "config": config}
    merged = find_from(config["init_from"], folder) if config.get("init_from") else None
    if merged is not None and (merged / "adapter_config.json").is_file():
        out["merge"] = json.loads((merged / "adapter_config.json").read_text()).get("merge")
    attention = fusion_attention(folder / "attention.csv")
    if attention:
        out["fusion_attention"] = attention
    try:   # every scored epoch's per-example predictions (runs since the held-out protocol)
        out["predictions"] = json.loads((folder / "epoch_predictions.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    return out


def fusion_attention(path: Path) -> dict | None:
    """A fusion run's attention.csv (a row per layer, a column per source adapter: the dev-set
    mean of each source's softmax weight) as {source: [weight per layer]}; None without one."""
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError:
        return None
    if len(rows) < 2 or rows[0][:1] != ["layer"]:
        return None
    return {name: [float(r[j]) for r in rows[1:]] for j, name in enumerate(rows[0]) if j > 0}


def find_from(path: str | Path, folder: Path) -> Path | None:
    """A folder a run's config names: absolute, from here, or (a relative path is relative to
    where the study ran, which need not be here) from a folder above the run `folder`."""
    return next((base / path for base in (Path.cwd(), *Path(folder).resolve().parents)
                 if (base / path).is_dir()), None)


def read_log(folder) -> list[dict]:
    """A run folder's log.jsonl records (JSON objects), in order; a line being written, or not
    an object, is skipped; [] without a log."""
    try:
        lines = (Path(folder) / "log.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def scored_epochs(records: list[dict]) -> dict[int, dict]:
    """{epoch: its dev scoring record} from a log's records: the value that picks the best epoch
    (`main`: the main metric, a multi-task run's mean over its tasks) with every task's metrics.
    An epoch scored twice (a run resumed from a checkpoint before its scoring) counts its last scoring."""
    out = {}
    for rec in records:
        try:
            if "dev" in rec and rec.get("main") is not None:
                out[int(rec["epoch"])] = {"epoch": int(rec["epoch"]), "step": rec.get("step"),
                                          "main": float(rec["main"]), "dev": rec["dev"]}
        except (ValueError, KeyError, TypeError):
            continue
    return out


def dev_by_epoch(folder) -> str:
    """'; dev by epoch: 58.38, 60.12' for a run whose log.jsonl holds dev scorings (`scored_epochs`), else ''."""
    by_epoch = scored_epochs(read_log(folder))
    return "; dev by epoch: " + ", ".join(f"{by_epoch[e]['main']:.2f}" for e in sorted(by_epoch)) if by_epoch else ""


def unfinished_record(folder: Path) -> dict | None:
    """What an unfinished run (metrics.json not 'ok': running, interrupted, failed) has shown so
    far, as one line of `archive --unfinished`, or None (finished, or no step logged yet): its
    identity (row label, folder name, config hash, model, tasks, seed, and `attempt`: when this
    folder was created, so a run started again from step 0 is another attempt), its last logged
    step of steps_total, its last checkpoint's step, the machine of every leg, each scored
    epoch's dev metrics (`scored_epochs`), each epoch's last step record (loss and, for a
    multi-task run, each task's share of the epoch's examples so far) and its resolved config.
    A long run's learning curve outlives its folder this way; it is no result: `report` reads
    only finished runs."""
    status = status_of(Path(folder))
    records = read_log(folder) if status not in (None, "ok") else []
    steps = [r for r in records if "step" in r and "samples_per_s" in r]
    if not steps:
        return None
    config = _config(folder)
    last = {}
    for r in steps:
        last[int(r.get("epoch", 0))] = {k: r[k] for k in ("epoch", "step", "loss", "sampling_share") if k in r}
    return {"run": Path(folder).name, "config_hash": Path(folder).name.rsplit("-", 1)[-1], "label": _label(config),
            "task": config.get("task"), "model": (config.get("model") or {}).get("name"), "seed": config.get("seed"),
            "status": status, "attempt": _attempt(folder),
            "snapshot": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": steps[-1]["step"],
            "steps_total": steps[-1].get("steps_total"), "checkpoint_step": checkpoint_step(folder),
            "machines": [r["machine"] for r in records if "machine" in r],
            "history": [v for _, v in sorted(scored_epochs(records).items())],
            "epochs": [v for _, v in sorted(last.items())], "config": config}


def _config(folder) -> dict:
    try:
        config = load_yaml(Path(folder) / "config.yaml")
    except (UserError, OSError):
        return {}
    return config if isinstance(config, dict) else {}


def _label(config: dict) -> str | None:
    return config.get("label") or (config.get("method") or {}).get("name")


def _attempt(folder) -> str | None:
    """When a run folder was created (env.json's time: a resumed run keeps it, a run started again
    from step 0 writes a new one)."""
    try:
        return read_json(Path(folder) / "env.json").get("time")
    except (UserError, OSError):
        return None


def checkpoint_step(folder) -> int | None:
    """The step of a run folder's complete checkpoint, or None. latest.json names it as
    train.save_checkpoint does: step-<steps>-e<epoch>."""
    try:
        name = json.loads((Path(folder) / "checkpoint" / "latest.json").read_text())["checkpoint"]
        return int(name.split("-")[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def recorded_seconds(metrics: dict | RunRecord) -> float:
    """A finished run's time from its metrics (a folder's metrics.json, an archive line or its
    record), as `status.finished_cost` reads it."""
    if isinstance(metrics, RunRecord):
        return max(float(metrics.extras.get("wall_seconds") or 0), metrics.train_seconds)
    return max(float(metrics.get("wall_seconds") or 0), float(metrics.get("train_seconds") or 0))


@dataclass(frozen=True)
class RunRecord:
    """One run as the results and study wings read it: a run folder's metrics.json with its
    resolved config (`archive_record`), or one line of an archive (the same keys). The fields
    every table and statistic needs are typed and checked once, here; the rest of what a run
    recorded (its method's extras: shares of examples, merge and attention records, per-epoch
    predictions, machines) stays in `extras` under the names metrics.json gives them."""
    where: str                     # the folder, or "archive.jsonl:LINE"
    run: str                       # the folder's name: <model>-s<seed>-<hash>
    label: str                     # the row (a study entry's label, else the method)
    method: str
    task: str                      # "rte", or "rte,mrpc,stsb" for a multi-task run
    model: str | None              # None: a record from before runs named their model
    seed: int
    status: str                    # ok | running | failed | interrupted
    main_metric: str | None
    main_value: float | None
    tasks: dict                    # {task: {"dev": {metric: value}, "main_metric", "main_value"}}
    selection: str                 # heldout | dev | last (runs before the protocol: dev)
    best_epoch: int | None
    epochs_run: int | None
    history: list                  # [{"epoch", "main", ...}] per scored epoch
    trainable_percent: float
    train_seconds: float
    config: dict                   # the resolved config.yaml
    extras: dict                   # everything else metrics.json (or the archive line) holds

    @property
    def finished(self) -> bool:
        return self.status == "ok" and self.main_value is not None

    def to_dict(self) -> dict:
        """The archive line this record was read from (with `label` as it is now)."""
        typed = {k: getattr(self, k) for k in RECORD_FIELDS if k != "where"}
        return {**self.extras, **typed}


RECORD_FIELDS = tuple(RunRecord.__dataclass_fields__)


def _typed(raw: dict, key: str, kinds: tuple, where: str, default=None, finite: bool = False):
    """raw[key] when it has one of `kinds` (None: `default`); else one line naming where and what."""
    value = raw.get(key)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and finite and isinstance(value, (int, float)) and not math.isfinite(value):
        ok = False
    if not ok:
        want = " or ".join(k.__name__ for k in kinds) + (" (finite)" if finite else "")
        raise UserError(f"{where}: '{key}' is {value!r}, not a {want}: the run's metrics.json or the archive "
                        f"line is damaged; archive the run folder again, or drop that line")
    return value


def parse_record(raw, where: str) -> RunRecord:
    """A RunRecord from a metrics.json-shaped dict, every typed field checked."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: not a run record (a JSON object): is it an archive written by adapterbench archive?")
    num = (int, float)
    tasks = _typed(raw, "tasks", (dict,), where) or task_results(raw)
    method = _typed(raw, "method", (str,), where, "?")
    return RunRecord(
        where=where, run=_typed(raw, "run", (str,), where, ""), label=_typed(raw, "label", (str,), where) or method,
        method=method, task=_typed(raw, "task", (str,), where, "?"), model=_typed(raw, "model", (str,), where),
        seed=_typed(raw, "seed", (int,), where, 0), status=_typed(raw, "status", (str,), where, "?"),
        main_metric=_typed(raw, "main_metric", (str,), where),
        main_value=None if raw.get("main_value") is None else float(_typed(raw, "main_value", num, where, finite=True)),
        tasks=tasks, selection=_typed(raw, "selection", (str,), where, "dev"),
        best_epoch=_typed(raw, "best_epoch", (int,), where), epochs_run=_typed(raw, "epochs_run", (int,), where),
        history=_typed(raw, "history", (list,), where, []),
        trainable_percent=float(_typed(raw, "trainable_percent", num, where, 0.0, finite=True)),
        train_seconds=float(_typed(raw, "train_seconds", num, where, 0.0, finite=True)),
        config=_typed(raw, "config", (dict,), where, {}),
        extras={k: v for k, v in raw.items() if k not in RECORD_FIELDS})


def read_records(root: Path) -> Iterator[RunRecord]:
    """Every run under `root` (run folders, each read as `archive_record` reads it) or every line
    of a results archive (a .jsonl file), as records; a damaged line or field is one line."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        for i, line in enumerate(root.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{root} line {i}: not valid JSON ({e.msg}): the archive is damaged") from None
                yield parse_record(raw, f"{root}:{i}")
        return
    if not root.is_dir():
        raise UserError(f"runs folder {root} does not exist: pass the folder a study or stage wrote, "
                        f"or a results archive (.jsonl)")
    for folder in iter_runs(root):
        raw = archive_record(folder)    # what an archive line would hold: metrics, config, merge record
        if raw is not None:
            yield parse_record(raw, str(folder))
