"""Stages as short recipes: resolve the config, load task + data + model, train, save."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from torch.utils.data import DataLoader

from . import __version__
from .config import RunConfig, build, check_ranges, config_hash, to_dict
from .data import Collator, few_shot, load_splits, subsample, tokenize
from .errors import UserError
from .methods import get_method, method_config
from .models import ClassificationHead, HeadConfig, TaskModel, count_params, head_config_dict, load_encoder
from .runs import (Run, RunExists, atomic_write, load_tensors, read_json, run_path, save_tensors, status_of,
                   write_json)
from .tasks import TaskSpec, load_task, parse_task
from .train import by_length, make_accelerator, predict, score, seed_everything, train

STAGE_DEFAULT_METHOD = {"extract": "pfeiffer", "finetune": "full", "fuse": "fusion", "multitask": "mtl"}
# method kind -> (folder in the run, its JSON description, its weights file)
ARTIFACTS = {"adapter": ("adapter", "adapter_config.json", "adapter.safetensors"),
             "head": ("adapter", "adapter_config.json", None),
             "model": ("model", "model_config.json", "model.safetensors"),
             "fusion": ("fusion", "fusion_config.json", "fusion.safetensors")}


def resolve(user: dict, stage: str) -> RunConfig:
    """Defaults < method defaults < user layers, checked strictly."""
    user = dict(user)
    method = dict(user.get("method") or {})
    method.setdefault("name", STAGE_DEFAULT_METHOD[stage])
    user["method"] = method
    defaults = {"train": dict(get_method(method["name"]).TRAIN_DEFAULTS)}
    merged = {**defaults, **user, "train": {**defaults["train"], **(user.get("train") or {})}}
    cfg = build(RunConfig, merged)
    if not cfg.task:
        raise UserError("no task given: pass --task NAME (see `adapterbench ls tasks`)")
    kind = get_method(method["name"]).KIND
    if (kind == "multitask") != (stage == "multitask"):
        raise UserError(f"method '{method['name']}' is {'a multi-task' if kind == 'multitask' else 'a single-task'} "
                        f"method: use `adapterbench {'multitask --tasks' if kind == 'multitask' else 'extract'} ...`")
    cfg.method = vars(method_config(cfg.method))
    check_ranges(cfg)
    return cfg


def build_model(cfg: RunConfig, task: TaskSpec):
    """Encoder with the method applied (adapter named after the task) + a new head."""
    method = get_method(cfg.method["name"])
    mcfg = method_config(cfg.method)
    encoder, tokenizer = load_encoder(cfg.model.name, cfg.model.trust_remote_code)
    seed_everything(cfg.seed)
    method.apply(encoder, mcfg, task.name)
    if cfg.init_from:
        init_adapter(encoder, cfg, mcfg, method, task.name)
    head = ClassificationHead(HeadConfig(encoder.config.hidden_size, task.num_labels, task.regression,
                                         labels=list(task.labels) or None))
    return set_dropout(TaskModel(encoder, head), cfg.model.dropout), tokenizer


def set_dropout(model, p: float | None):
    """model.dropout: one probability for every dropout module (None keeps the model's own)."""
    if p is not None:
        import torch.nn as nn
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
    return model


def init_adapter(encoder, cfg: RunConfig, mcfg, method, name: str) -> None:
    """Start the adapter from a saved (e.g. merged) adapter folder of the same configuration."""
    from .methods.fusion import adapter_folder, method_shape
    if method.KIND != "adapter":
        raise UserError(f"init_from needs an adapter method (houlsby, pfeiffer), not {cfg.method['name']}")
    folder = adapter_folder(cfg.init_from)
    meta = read_json(folder / "adapter_config.json")
    mine, theirs = method_shape(cfg.method), method_shape(meta.get("method", {}))
    if mine != theirs:
        k = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))[0]
        raise UserError(f"init_from {folder} differs in method.{k}: {theirs.get(k)!r} there, {mine.get(k)!r} "
                        f"here; set method.{k} to match")
    method.load_state(encoder, mcfg, name, load_tensors(folder / "adapter.safetensors"))


def prepare_items(task, splits, tokenizer, cfg: RunConfig) -> dict:
    """Token ids per split; the training split is cut by train.shots and train.limit."""
    items = {}
    data_seed = cfg.data.data_seed if cfg.data.data_seed is not None else cfg.seed
    for name, examples in splits.items():
        tokens = tokenize(examples, tokenizer, cfg.model.max_length)  # the whole split: one cache entry
        position = {id(e): i for i, e in enumerate(examples)}
        if name == "train" and cfg.train.shots:
            examples = few_shot(examples, cfg.train.shots, task.regression, data_seed)
        limit = {"train": cfg.train.limit, "dev": cfg.train.eval_limit}.get(name, 0)
        items[name] = [tokens[position[id(e)]] for e in subsample(examples, limit, data_seed)]
    return items


def evaluate_items(model, items, collate, task, batch_size: int, precision: str = "auto"):
    """(metrics, predictions) on one split; the same path for training-time and `evaluate`."""
    accelerator = make_accelerator()
    ordered, back = by_length(items)   # the training loop scores dev in the same order
    loader = accelerator.prepare(DataLoader(ordered, batch_size=batch_size, collate_fn=collate))
    model = accelerator.prepare(model)
    preds, labels = predict(model, loader, accelerator, task.regression, precision)
    return (score(task, preds, labels) if labels is not None else {}), preds[back]


def planned_folder(stage: str, cfg: RunConfig, task: TaskSpec | None = None) -> Path:
    """The run folder a config trains into (known before anything runs)."""
    task = task or load_task(cfg.task)
    return run_path(cfg.out_dir, stage, cfg.method["name"], task.name, cfg.model.name, cfg.seed,
                    config_hash(to_dict(cfg)))


def train_stage(stage: str, cfg: RunConfig, force: bool = False, console=None, show_progress=True,
                save_attention: bool = False) -> Path:
    """`extract`, `finetune` and `fuse`: train one method on one task and write its run folder."""
    task = load_task(cfg.task)
    folder = planned_folder(stage, cfg, task)
    if status_of(folder) == "ok" and not force:
        raise RunExists(folder)
    splits = load_splits(task, cfg.data.data_dir, ("train", "dev"))
    model, tokenizer = build_model(cfg, task)
    items = prepare_items(task, splits, tokenizer, cfg)
    run = Run.create(folder, to_dict(cfg), task, force)
    try:
        collate = Collator(tokenizer.pad_token_id or 0, task.regression)
        started = time.time()
        res = train(model, items["train"], items["dev"], collate, task, cfg.train,
                    cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.seed,
                    log=run.log, show_progress=show_progress, checkpoint_dir=run.checkpoint_dir)
        # the model is left at its best scored epoch, whose dev metrics the loop already has
        dev = res.best_metrics or evaluate_items(model, items["dev"], collate, task, cfg.train.eval_batch_size,
                                                  cfg.train.precision)[0]
        if not run.writer:   # another rank of a multi-process run: rank 0 writes the folder
            return run.folder
        save_weights(run.folder, cfg, task, model)
        if save_attention:
            write_attention(run.folder, model, items["dev"], collate, task, cfg)
        trainable, total = count_params(model)
        run.finish({
            "stage": stage, "task": task.name, "method": cfg.method["name"], "model": cfg.model.name,
            "seed": cfg.seed, "label": run_label(cfg), "metrics": {"dev": dev},
            "shots": cfg.train.shots, "data_seed": cfg.data.data_seed if cfg.data.data_seed is not None else cfg.seed, "main_metric": task.main_metric,
            "main_value": dev.get(task.main_metric), "best_epoch": res.best_epoch,
            "epochs_run": res.epoch, "history": res.history, "steps": res.steps,
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / total, 4),
            "train_examples": len(items["train"]), "dev_examples": len(items["dev"]),
            "train_seconds": round(res.train_seconds, 3), "samples_per_second": round(res.samples_per_second, 3),
            "wall_seconds": round(time.time() - started, 3), "adapterbench_version": __version__,
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
        })
    except BaseException as e:
        run.fail(e)
        raise
    return run.folder


def run_label(cfg: RunConfig) -> str:
    """The report row: the study entry's label or the method; few-shot runs add ' k=N'."""
    label = cfg.label or cfg.method["name"]
    return f"{label} k={cfg.train.shots}" if cfg.train.shots and " k=" not in label else label


def save_weights(folder: Path, cfg: RunConfig, task: TaskSpec, model: TaskModel) -> None:
    """adapter/ (adapter_config.json, adapter.safetensors, head), model/ for `full`, fusion/."""
    method = get_method(cfg.method["name"])
    mcfg = method_config(cfg.method)
    dirname, config_name, weights_name = ARTIFACTS[method.KIND]
    out = folder / dirname
    enc = model.encoder
    if weights_name and (method.KIND != "model" or cfg.train.save_model):
        save_tensors(out / weights_name, method.trainable_state(enc, mcfg, task.name), {"format": "pt"})
    if method.KIND == "fusion":
        write_json(out / "sources.json", method.sources_record(mcfg))
    write_json(out / config_name, {
        "method": cfg.method, "base_model": cfg.model.name, "model_type": enc.config.model_type,
        "hidden_size": enc.config.hidden_size, "num_layers": enc.config.num_hidden_layers,
        "task": task.name, "adapterbench_version": __version__})
    save_tensors(out / "head.safetensors", model.head.state_dict())
    write_json(out / "head_config.json", head_config_dict(model.head))


def load_run_model(folder: Path):
    """Rebuild (cfg, task, model, tokenizer) from a run folder alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: see `adapterbench ls runs`")
    metrics = read_json(folder / "metrics.json")
    if metrics.get("status") != "ok":
        raise UserError(f"run {folder} has status '{metrics.get('status')}', not ok: rerun its stage")
    from .config import load_yaml
    cfg = build(RunConfig, load_yaml(folder / "config.yaml"))
    task = parse_task(folder / "task.yaml")
    method = get_method(cfg.method["name"])
    mcfg = method_config(cfg.method)
    dirname, _, weights_name = ARTIFACTS[method.KIND]
    wdir = folder / dirname
    if method.KIND == "model" and not (wdir / weights_name).is_file():
        raise UserError(f"{folder} holds no model weights (finetune saves them only with "
                        f"train.save_model=true): rerun finetune with that override")
    if method.KIND == "fusion":
        method.verify_sources(read_json(wdir / "sources.json"))
    model, tokenizer = build_model(cfg, task)
    if weights_name:
        method.load_state(model.encoder, mcfg, task.name, load_tensors(wdir / weights_name))
    head_state = load_tensors(wdir / "head.safetensors")
    try:
        model.head.load_state_dict(head_state)
    except RuntimeError:
        raise UserError(f"{wdir / 'head.safetensors'} does not fit the task head: the file was changed") from None
    return cfg, task, model, tokenizer, metrics


def write_attention(folder: Path, model, items, collate, task, cfg: RunConfig) -> Path:
    """Fusion attention per layer, averaged over the dev set's tokens: CSV and heatmap PNG."""
    from .methods import fusion
    from .plots import attention_heatmap
    mixers = fusion.mixers(model.encoder)
    if not mixers:
        raise UserError("--save-attention needs a fusion run")
    for mx in mixers:
        mx.record = []
    evaluate_items(model, items, collate, task, cfg.train.eval_batch_size, cfg.train.precision)
    names, rows = fusion.attention_table(model.encoder)
    for mx in mixers:
        mx.record = None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", *names])
    for i, row in enumerate(rows):
        w.writerow([i, *(f"{v:.6f}" for v in row)])
    atomic_write(Path(folder) / "attention.csv", buf.getvalue())
    attention_heatmap(rows, names, Path(folder) / "attention.png", title=f"AdapterFusion attention, target {task.name}")
    return Path(folder) / "attention.csv"


def evaluate_stage(folder: Path, split: str = "dev", data_dir: str | None = None,
                   save_attention: bool = False) -> dict:
    """Recompute a run's metrics from its folder; `test` writes GLUE-style predictions."""
    if split not in ("dev", "test"):
        raise UserError(f"--split '{split}' must be dev or test")
    if (Path(folder) / "multitask").is_dir():
        from .multitask import evaluate_multitask
        if split != "dev":
            raise UserError("multitask runs are evaluated on dev only for now")
        result = evaluate_multitask(Path(folder), data_dir)
        write_json(Path(folder) / "eval_dev.json", result)
        return result
    cfg, task, model, tokenizer, stored = load_run_model(folder)
    splits = load_splits(task, data_dir or cfg.data.data_dir, (split,))
    items = prepare_items(task, splits, tokenizer, cfg)[split]
    collate = Collator(tokenizer.pad_token_id or 0, task.regression)
    metrics, preds = evaluate_items(model, items, collate, task, cfg.train.eval_batch_size, cfg.train.precision)
    result = {"split": split, "metrics": metrics}
    if save_attention:
        result["attention"] = str(write_attention(folder, model, items, collate, task, cfg))
    if split == "dev":
        want = stored.get("metrics", {}).get("dev", {}).get(task.main_metric)
        result.update(stored=want, reproduced=metrics.get(task.main_metric) == want)
    else:
        path = Path(folder) / "predictions" / f"{task.name}.tsv"
        write_predictions(path, task, splits[split], preds)
        result["predictions"] = str(path)
    write_json(Path(folder) / f"eval_{split}.json", result)
    return result


def write_predictions(path: Path, task: TaskSpec, examples: list[dict], preds) -> None:
    """GLUE submission style: `index<TAB>prediction`, label names for classification."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "prediction"])
    for i, (ex, p) in enumerate(zip(examples, preds)):
        ident = ex["id"] if task.id_column else i
        w.writerow([ident, f"{float(p):.4f}" if task.regression else task.labels[int(p)]])
    atomic_write(path, buf.getvalue())
