"""Recipes, read top to bottom: resolve the config, load tasks + data + model, train with the
one loop (train.py), save, evaluate. `extract`, `finetune`, `fuse` and `multitask` are one
recipe (`train_stage`): a single-task run is a model with one head; a multi-task run has one
head per task and a task sampler as its batch source.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from adapterbench import __version__
from adapterbench.config import RunConfig, build, check_ranges, config_hash, to_dict
from adapterbench.data import Collator, load_splits
from adapterbench.errors import UserError
from adapterbench.fileio import write_json
from adapterbench.methods import get_method, method_config
from adapterbench.models import count_params, default_pooling
from adapterbench.recipe.precision import autocast, bf16_matmul
from adapterbench.recipe.runfolder import Run, RunExists, in_use, run_path
from adapterbench.recipe.runmodel import build_model, save_weights, write_attention
from adapterbench.recipe.sampling import (
    DEFAULT_PROXIES,
    SCHEMES,
    Shuffled,
    TaskMixture,
    Uncertainty,
)
from adapterbench.recipe.splits import prepare_items
from adapterbench.recipe.train import CPU_CHUNK, compact, evaluate, length_chunks, train
from adapterbench.records import status_of
from adapterbench.tasks import TaskSpec, load_task, parse_task

STAGE_DEFAULT_METHOD = {"extract": "pfeiffer", "finetune": "full", "fuse": "fusion", "multitask": "mtl"}


# --- configuration ---------------------------------------------------------------------------

def resolve(user: dict, stage: str) -> RunConfig:
    """Defaults < method defaults < user layers, checked strictly; the method's config becomes
    its dataclass here, once."""
    user = dict(user)
    for key in ("train", "model", "data", "sampling", "method"):
        if user.get(key) is not None and not isinstance(user[key], dict):
            raise UserError(f"config key '{key}' must be a mapping of keys (e.g. {key}: {{...}}), got {user[key]!r}")
    method = dict(user.get("method") or {})
    method.setdefault("name", STAGE_DEFAULT_METHOD[stage])
    user["method"] = method
    module = get_method(method["name"])
    defaults = {"train": dict(module.TRAIN_DEFAULTS)}
    merged = {**defaults, **user, "train": {**defaults["train"], **(user.get("train") or {})}}
    cfg = build(RunConfig, merged)
    if not cfg.task:
        raise UserError("no task given: pass --task NAME (see `adapterbench ls tasks`)")
    multi = module.STAGE == "multitask"
    if multi != (stage == "multitask"):
        raise UserError(f"method '{method['name']}' is {'a multi-task' if multi else 'a single-task'} "
                        f"method: use `adapterbench {'multitask --tasks' if multi else 'extract'} ...`")
    cfg.method = method_config(cfg.method)
    if getattr(cfg.method, "adapters", None):   # one folder, whatever directory named it
        cfg.method.adapters = [str(Path(p).resolve()) if Path(p).exists() else p for p in cfg.method.adapters]
    if cfg.model.pooling == "auto":
        cfg.model.pooling = default_pooling(cfg.model.name)
    if multi and cfg.sampling.scheme not in SCHEMES:
        raise UserError(f"sampling.scheme '{cfg.sampling.scheme}' must be one of {', '.join(SCHEMES)}")
    check_ranges(cfg)
    from adapterbench.recipe.tracking import check_trackers
    check_trackers(cfg.train.log_with)
    return cfg


def tasks_of(cfg: RunConfig) -> list[TaskSpec]:
    """The run's tasks: one, or several joined by commas (multi-task)."""
    names = [n.strip() for n in cfg.task.split(",") if n.strip()]
    if not names:
        raise UserError(f"no task given ({cfg.task!r}): pass --task NAME or --task PATH.yaml (adapterbench ls tasks)")
    if get_method(cfg.method.name).STAGE == "multitask" and len(names) < 2:
        raise UserError(f"multitask needs at least two tasks, got '{cfg.task}': pass --tasks rte,mrpc")
    tasks = [load_task(n) for n in names]
    twice = sorted({t.name for t in tasks if [u.name for u in tasks].count(t.name) > 1})
    if twice:
        raise UserError(f"task '{twice[0]}' is given twice in '{cfg.task}': name each task once")
    return tasks


def run_identity(cfg: RunConfig, tasks: list[TaskSpec]) -> dict:
    """Everything that decides a run's result: the resolved config, with each task given by its
    identity (definition + data content) instead of the name or path it was given by."""
    from adapterbench.data import task_identity
    resolved = to_dict(cfg)
    resolved["task"] = "+".join(t.name for t in tasks)
    resolved["task_identity"] = [task_identity(t, cfg.data.data_dir)["digest"] for t in tasks]
    return resolved


def planned_folder(stage: str, cfg: RunConfig, tasks: list[TaskSpec] | None = None) -> Path:
    """The run folder a config trains into (known before anything runs): named by the hash of
    its identity. Finished folders that earlier versions named otherwise are still found and
    used: hashed with other runs' folders as full paths (before identities were portable), or
    by the config alone (before tasks had an identity; used when its stored task definition
    equals the current one, its data cannot be checked: it recorded none)."""
    tasks = tasks or tasks_of(cfg)
    where = lambda h: run_path(cfg.out_dir, stage, cfg.method.name, "+".join(t.name for t in tasks), cfg.model.name,
                               cfg.seed, h)
    identity = run_identity(cfg, tasks)
    folder = where(config_hash(identity))
    if folder.exists():
        return folder
    for legacy in (where(config_hash(identity, portable_paths=False)),
                   where(config_hash(to_dict(cfg), portable_paths=False))):
        if legacy != folder and status_of(legacy) == "ok" and same_tasks(legacy, tasks):
            return legacy
    return folder


def same_tasks(folder: Path, tasks: list[TaskSpec]) -> bool:
    """Whether a run folder's stored task definitions equal these (every field but path/include)."""
    from dataclasses import asdict
    try:
        stored = ([parse_task(folder / "task.yaml", stored=True)] if (folder / "task.yaml").is_file() else
                  [parse_task(folder / "tasks" / f"{i}.yaml", stored=True) for i in range(len(tasks))])
    except (UserError, OSError):
        return False
    strip = lambda t: {k: v for k, v in asdict(t).items() if k not in ("path", "include")}
    return [strip(t) for t in stored] == [strip(t) for t in tasks]


# --- model and data ---------------------------------------------------------------------------


def batch_source(cfg: RunConfig, tasks: list[TaskSpec], train_items: list[list[dict]], model):
    """What feeds the loop: a seeded shuffle (one task), a task sampler or MT-Uncertainty."""
    seed = cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.seed
    b = cfg.train.batch_size
    if len(tasks) == 1:
        return Shuffled(train_items[0], b, seed, cfg.train.group_by_length)
    if cfg.sampling.scheme != "uncertainty":
        source = TaskMixture(train_items, b, seed, cfg.sampling.scheme, cfg.sampling.temperature, cfg.train.epochs,
                             grouped=cfg.sampling.group_by_length)
    else:
        proxies = {**DEFAULT_PROXIES, **cfg.sampling.uncertainty_proxy}
        source = Uncertainty(train_items, b, seed, tasks, proxies, uncertainty_scorer(model, tasks, cfg, seed),
                             grouped=cfg.sampling.group_by_length)
    if cfg.sampling.epoch == "reference":   # CA-MTL's trainer: len(longest task's loader) x number of tasks
        source.steps_per_epoch = max(math.ceil(len(x) / b) for x in train_items) * len(train_items)
    return source


def uncertainty_scorer(model, tasks, cfg: RunConfig, seed: int, chunk: int = CPU_CHUNK):
    """candidates -> normalised prediction entropy per candidate (NaN for regression tasks).
    Train mode as the reference (dropout on), with the dropout masks drawn from a seed of their
    own (run seed, position in the stream), so every process picks the same batch, a resumed
    run picks as the uninterrupted one, and the training RNG is untouched. Each task's candidates
    are one batch on an accelerator; on a CPU, where padded tokens cost as much as real ones,
    they are scored in length-sorted chunks of `chunk`, each padded to its own longest:
    without dropout the same entropies as one batch (padding is masked), with it other masks
    are drawn; about a third less scoring time on the study's five tasks (docs/performance.md)."""
    import math

    import torch
    collate = Collator(0)

    @torch.no_grad()
    def score(cands: list[dict], position: int = 0) -> torch.Tensor:
        device = next(model.parameters()).device
        out = torch.full((len(cands),), float("nan"))
        by_task: dict[int, list[int]] = {}
        for j, c in enumerate(cands):
            by_task.setdefault(c["task_id"], []).append(j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + position)
            for i, rows in by_task.items():
                if tasks[i].regression:
                    continue
                size = chunk if device.type == "cpu" else len(rows)
                for part in length_chunks(rows, [len(cands[j]["input_ids"]) for j in rows], size):
                    batch = {k: v.to(device) for k, v in collate([cands[j] for j in part]).items()}
                    with autocast(cfg.train.precision, device):
                        p = model(**batch)[i][1].float().softmax(-1)
                    out[part] = (-(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])).cpu()
        return out
    return score


# --- the recipe -------------------------------------------------------------------------------

def train_stage(stage: str, cfg: RunConfig, force: bool = False, console=None, show_progress=True,
                save_attention: bool = False, epoch_hook=None) -> Path:
    """`extract`, `finetune`, `fuse` and `multitask`: train one method and write its run folder.
    `epoch_hook(epoch, held-out value)` is called after each scored epoch (tune's pruner)."""
    tasks = tasks_of(cfg)
    folder = planned_folder(stage, cfg, tasks)
    if status_of(folder) == "ok" and not force:
        raise RunExists(folder)
    with in_use(folder):
        return _train_run(stage, cfg, tasks, folder, force, show_progress, save_attention, epoch_hook)


def _train_run(stage: str, cfg: RunConfig, tasks: list, folder: Path, force: bool, show_progress: bool,
               save_attention: bool, epoch_hook) -> Path:
    """train_stage's body, while this command holds the run folder."""
    if status_of(folder) == "ok" and not force:       # finished by another command while this one waited
        raise RunExists(folder)
    splits = [load_splits(t, cfg.data.data_dir, ("train", "dev")) for t in tasks]
    model, tokenizer = build_model(cfg, tasks)
    items = [prepare_items(t, s, tokenizer, cfg, i) for i, (t, s) in enumerate(zip(tasks, splits))]
    train_items, dev_items = [x["train"] for x in items], [x["dev"] for x in items]
    heldout_items = [x["heldout"] for x in items] if cfg.train.selection == "heldout" else None
    run = Run.create(folder, to_dict(cfg), tasks, force, identity=run_identity(cfg, tasks))
    try:
        collate = Collator(tokenizer.pad_token_id or 0)
        source = batch_source(cfg, tasks, train_items, model)
        started = time.time()
        log = run.log
        if epoch_hook is not None:
            def log(record: dict) -> None:   # noqa: F811  (the run's log, and the held-out score to the hook)
                run.log(record)
                if "heldout_main" in record:
                    epoch_hook(record["epoch"], record["heldout_main"])
        res = train(model, source, dev_items, tasks, collate, cfg.train, log=log, show_progress=show_progress,
                    checkpoint_dir=run.checkpoint_dir, heldout_sets=heldout_items,
                    tracking=tracking_info(stage, cfg, tasks, run.folder) if run.writer else None)
        # the model is left at the scored epoch selection chose, whose dev metrics the loop already has
        dev = res.best_metrics or evaluate(model, dev_items, tasks, collate, cfg.train.eval_batch_size,
                                           cfg.train.precision)[0]
        if not run.writer:   # another rank of a multi-process run: rank 0 writes the folder
            return run.folder
        save_weights(run.folder, cfg, tasks, model, tokenizer)
        write_json(run.folder / PREDICTIONS_FILE, epoch_predictions(cfg, tasks, res, dev_items, heldout_items))
        if save_attention:
            write_attention(run.folder, model, dev_items[0], collate, tasks[0], cfg)
        run.finish(run_metrics(stage, cfg, tasks, model, res, dev, train_items, dev_items, source, started,
                               heldout_items))
    except BaseException as e:
        run.fail(e)
        raise
    return run.folder


def tracking_info(stage: str, cfg: RunConfig, tasks, folder: Path):
    """How the trackers file this run: project = the study (train.tracker_project), name = the
    run folder, group = the row label, tags = stage/method/task/model/seed, the whole config."""
    from adapterbench.recipe.tracking import RunInfo
    return RunInfo(Path(folder), cfg.train.tracker_project or "adapterbench", run_label(cfg),
                   {"stage": stage, "method": cfg.method.name, "task": "+".join(t.name for t in tasks),
                    "model": cfg.model.name, "seed": cfg.seed}, to_dict(cfg), Path(cfg.out_dir))


PREDICTIONS_FILE = "epoch_predictions.json"


def epoch_predictions(cfg: RunConfig, tasks, res, dev_items, heldout_items) -> dict:
    """epoch_predictions.json: every scored epoch's per-example predictions on dev and the
    held-out slice, with the labels, so any selection protocol can be recomputed from the run
    (or its archive line) and example-level paired tests made."""
    labels = lambda part: {t.name: compact([it["labels"] for it in x], t.regression) for t, x in zip(tasks, part)}
    return {"selection": cfg.train.selection, "best_epoch": res.best_epoch,
            "labels": {"dev": labels(dev_items), **({"heldout": labels(heldout_items)} if heldout_items else {})},
            "epochs": res.predictions}


def run_metrics(stage, cfg: RunConfig, tasks, model, res, dev, train_items, dev_items, source, started,
                heldout_items=None) -> dict:
    """metrics.json, one schema for every run: per-task dev metrics under `tasks` (at the epoch
    the selection protocol chose; with `heldout`, that epoch's held-out metrics beside them), the
    main value (a task's main metric, or the mean of the tasks' main metrics), the protocol
    (`selection`, the held-out slice's size), the training record."""
    trainable, total = count_params(model)
    single = len(tasks) == 1
    heldout_n = {t.name: len(x) for t, x in zip(tasks, heldout_items)} if heldout_items else {}
    out = {
        "schema": 2, "stage": stage, "task": "+".join(t.name for t in tasks), "method": cfg.method.name,
        "model": cfg.model.name, "seed": cfg.seed, "label": run_label(cfg),
        "tasks": {t.name: {"dev": dev[t.name], "main_metric": t.main_metric, "main_value": dev[t.name][t.main_metric],
                           "train_examples": len(x), "dev_examples": len(y),
                           **({"heldout": res.best_heldout[t.name], "heldout_examples": heldout_n[t.name]}
                              if t.name in res.best_heldout else {})}
                  for t, x, y in zip(tasks, train_items, dev_items)},
        "selection": cfg.train.selection,
        "main_metric": tasks[0].main_metric if single else "mean of main metrics",
        "main_value": float(np.mean([dev[t.name][t.main_metric] for t in tasks])),
        "shots": cfg.train.shots, "data_seed": cfg.data.data_seed if cfg.data.data_seed is not None else cfg.seed,
        "pooling": cfg.model.pooling, "best_epoch": res.best_epoch, "epochs_run": res.epoch,
        "history": res.history, "steps": res.steps,
        "trainable_params": trainable, "total_params": total, "trainable_percent": round(100.0 * trainable / total, 4),
        "train_seconds": round(res.train_seconds, 3), "samples_per_second": round(res.samples_per_second, 3),
        "machine_seconds": {k: round(v, 3) for k, v in res.machine_seconds.items()},
        "wall_seconds": round(res.earlier_wall_seconds + time.time() - started, 3), "adapterbench_version": __version__,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if how := bf16_matmul(cfg.train.precision, next(model.parameters()).device):
        out["bf16_matmul"] = how
    from adapterbench.methods.plugins import origin
    if plugin := origin(cfg.method.name):   # a method from outside the package: where it came from
        out["plugin"] = plugin
    if not single:
        seen = [sum(ep[i] for ep in source.picks) for i in range(len(tasks))]
        used = [len(u) for u in source.used]
        out.update({"sampling": cfg.sampling.scheme,
                    "picks_per_epoch": {t.name: [ep[i] for ep in source.picks] for i, t in enumerate(tasks)},
                    "share_of_examples": {t.name: round(s / max(sum(seen), 1), 4) for t, s in zip(tasks, seen)},
                    "fraction_used_per_task": {t.name: round(u / max(len(x), 1), 4)
                                               for t, u, x in zip(tasks, used, train_items)},
                    "fraction_of_examples_used": round(sum(used) / max(sum(len(x) for x in train_items), 1), 4),
                    "examples_drawn": source.drawn, "examples_trained": res.train_samples})
    return out


def run_label(cfg: RunConfig) -> str:
    """The report row: the study entry's label or the method; few-shot runs add ' k=N'."""
    label = cfg.label or cfg.method.name
    return f"{label} k={cfg.train.shots}" if cfg.train.shots and " k=" not in label else label


# --- saving and rebuilding ----------------------------------------------------------------------

