"""A run's model: built from its config (encoder, method, heads), saved into its run folder,
rebuilt from that folder alone (`load_run_model`), and scored again by `evaluate`."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from adapterbench import __version__
from adapterbench.config import RunConfig, build, to_dict
from adapterbench.data import Collator, load_splits
from adapterbench.errors import UserError
from adapterbench.fileio import (
    atomic_write,
    load_tensors,
    read_json,
    save_tensors,
    writable_inside,
    write_json,
)
from adapterbench.methods import get_method, method_config
from adapterbench.models import (
    ClassificationHead,
    HeadConfig,
    TaskModel,
    head_config_dict,
    load_encoder,
)
from adapterbench.recipe.runfolder import in_use
from adapterbench.recipe.splits import prepare_items
from adapterbench.recipe.train import evaluate, seed_everything
from adapterbench.tasks import TaskSpec, load_task, parse_task


def build_model(cfg: RunConfig, tasks: list[TaskSpec]):
    """(TaskModel, tokenizer): the encoder with the method applied and one new head per task.
    `model.dropout` sets the encoder's and heads' dropouts, never those a method sets itself."""
    from adapterbench.recipe.artifacts import check_init_from, load_sources
    method = get_method(cfg.method.name)
    encoder, tokenizer = load_encoder(cfg.model.name, cfg.model.trust_remote_code, cfg.model.pooling == "pooler")
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit and encoder.config.model_type in ("roberta", "xlm-roberta", "mpnet"):
        limit -= 2                    # their positions start after the padding index
    if limit and cfg.model.max_length > limit:
        raise UserError(f"model.max_length={cfg.model.max_length} is more than {cfg.model.name} can read ({limit} "
                        f"tokens): use model.max_length={limit} or less")
    set_dropout(encoder, cfg.model.dropout)
    sources = load_sources(cfg.method.adapters) if "adapters" in vars(cfg.method) else ()
    names = [t.name for t in tasks]
    seed_everything(init_seed(cfg, names))
    method.apply(encoder, cfg.method, names, sources)
    if cfg.init_from:
        if "init_from" not in method.SUPPORTS:
            from adapterbench.methods import supporting
            raise UserError(f"init_from needs one of {', '.join(supporting('init_from'))}, not {cfg.method.name}")
        method.load_state(encoder, cfg.method, names, check_init_from(cfg.init_from, to_dict(cfg)["method"]))
    seed_everything(cfg.seed)
    dropout = 0.1 if cfg.model.dropout is None else cfg.model.dropout
    heads = {t.name: ClassificationHead(HeadConfig(encoder.config.hidden_size, t.num_labels, t.regression, dropout,
                                                   list(t.labels) or None, cfg.model.pooling)) for t in tasks}
    return TaskModel(encoder, heads, getattr(method, "set_tasks", None)), tokenizer


def init_seed(cfg: RunConfig, names: list[str]) -> int:
    """The seed the method's new modules are drawn with: the run seed and, for single-task
    runs, the task (MerA needs source adapters of one seed to start from different points;
    `method.init_seed` is not a key: the rule is fixed, and the same task + seed reproduce)."""
    if len(names) != 1:
        return cfg.seed
    import zlib
    return (cfg.seed * 1_000_003 + zlib.crc32(names[0].encode())) % (2 ** 31)


def set_dropout(module, p: float | None):
    """model.dropout: one probability for every dropout module of `module` (None keeps them)."""
    if p is not None:
        import torch.nn as nn
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
    return module


def head_files(out: Path, tasks: list[TaskSpec]) -> dict[str, tuple[Path, Path]]:
    """task -> (weights, config): head.safetensors for one task, head-<task>.safetensors for several."""
    if len(tasks) == 1:
        return {tasks[0].name: (out / "head.safetensors", out / "head_config.json")}
    return {t.name: (out / f"head-{t.name}.safetensors", out / f"head_config-{t.name}.json") for t in tasks}


def save_weights(folder: Path, cfg: RunConfig, tasks: list[TaskSpec], model: TaskModel, tokenizer) -> None:
    """The method's ARTIFACT folder: its JSON description, its weights, one head per task."""
    from adapterbench.recipe.artifacts import sources_record
    method = get_method(cfg.method.name)
    art = method.ARTIFACT
    out = folder / art.folder
    enc = model.encoder
    names = [t.name for t in tasks]
    if art.weights and (not art.optional or cfg.train.save_model):
        save_tensors(out / art.weights, method.trainable_state(enc, cfg.method, names), {"format": "pt"})
    if "adapters" in vars(cfg.method):   # hashes only: the sources' weights are not read again
        from adapterbench.recipe.artifacts import read_sources
        write_json(out / "sources.json", sources_record(read_sources(cfg.method.adapters)))
    write_json(out / art.config, {
        "method": to_dict(cfg)["method"], "base_model": getattr(cfg.method, "encoder", None) or cfg.model.name,
        "model_type": enc.config.model_type,
        "hidden_size": enc.config.hidden_size, "num_layers": enc.config.num_hidden_layers,
        "task": names[0] if len(names) == 1 else None, "tasks": names, "adapterbench_version": __version__})
    for t, (weights, config) in head_files(out, tasks).items():
        save_tensors(weights, model.heads[t].state_dict())
        write_json(config, head_config_dict(model.heads[t]))
    if len(tasks) > 1:
        write_json(out / "tasks.json", [t.path for t in tasks])
    if hasattr(method, "finalize"):
        method.finalize(out, enc, tokenizer, cfg, tasks)


def run_tasks(folder: Path, cfg: RunConfig) -> list[TaskSpec]:
    """The task specs a run was trained with (task.yaml; a multi-task run's tasks.json)."""
    if (folder / "task.yaml").is_file() and "," not in cfg.task:
        return [parse_task(folder / "task.yaml", stored=True)]
    if (folder / "tasks").is_dir():
        names = [n.strip() for n in cfg.task.split(",")]
        return [parse_task(folder / "tasks" / f"{i}.yaml", stored=True) for i in range(len(names))]
    paths = read_json(folder / get_method(cfg.method.name).ARTIFACT.folder / "tasks.json")  # older folders
    return [parse_task(Path(p)) if Path(p).is_file() else load_task(Path(p).stem) for p in paths]


def stored_config(folder: Path, trust_remote_code: bool = False) -> RunConfig:
    """The RunConfig a run folder's config.yaml records (finished or not), method defaults applied."""
    from adapterbench.records import run_config
    tree = run_config(folder)
    if isinstance(tree.get("train"), dict):   # folders from before the held-out protocol selected on dev
        tree["train"].setdefault("selection", "dev")
    cfg = build(RunConfig, tree)
    cfg.method = method_config(cfg.method)
    cfg.model.trust_remote_code = trust_remote_code
    if cfg.model.pooling == "auto":
        cfg.model.pooling = "cls"     # folders from before model.pooling existed read the first token
    return cfg


def load_run_model(folder: Path, trust_remote_code: bool = False):
    """Rebuild (cfg, tasks, model, tokenizer, stored metrics) from a run folder alone.
    `trust_remote_code` comes from the command line only, never from the folder's config."""
    from adapterbench.recipe.artifacts import verify_sources
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: see `adapterbench ls runs`")
    metrics = read_json(folder / "metrics.json")
    if metrics.get("status") != "ok":
        raise UserError(f"run {folder} has status '{metrics.get('status')}', not ok: rerun its stage")
    cfg = stored_config(folder, trust_remote_code)
    tasks = run_tasks(folder, cfg)
    method = get_method(cfg.method.name)
    art = method.ARTIFACT
    wdir = folder / art.folder
    if art.optional and not (wdir / art.weights).is_file():
        raise UserError(f"{folder} holds no model weights (finetune saves them only with "
                        f"train.save_model=true): rerun finetune with that override")
    if (wdir / "sources.json").is_file():
        verify_sources(read_json(wdir / "sources.json"), cfg.method.adapters)
    model, tokenizer = build_model(cfg, tasks)
    names = [t.name for t in tasks]
    if art.weights:
        method.load_state(model.encoder, cfg.method, names, load_tensors(wdir / art.weights))
    for t, (weights, _) in head_files(wdir, tasks).items():
        try:
            model.heads[t].load_state_dict(load_tensors(weights))
        except RuntimeError:
            raise UserError(f"{weights} does not fit the task head: the file was changed") from None
    return cfg, tasks, model, tokenizer, metrics


# --- evaluation ---------------------------------------------------------------------------------

def write_attention(folder: Path, model, items, collate, task, cfg: RunConfig) -> Path:
    """Fusion attention per layer, averaged over the dev set's tokens: CSV and heatmap PNG."""
    from adapterbench.methods import fusion
    mixers = fusion.mixers(model.encoder)
    if not mixers:
        raise UserError("--save-attention needs a fusion run")
    for mx in mixers:
        mx.record = []
    evaluate(model, [items], [task], collate, cfg.train.eval_batch_size, cfg.train.precision)
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


def evaluate_stage(folder: Path, split: str = "dev", data_dir: str | None = None, save_attention: bool = False,
                   trust_remote_code: bool = False) -> dict:
    """Recompute a run's metrics from its folder; `test` writes GLUE-style predictions."""
    if split not in ("dev", "test"):
        raise UserError(f"--split '{split}' must be dev or test")
    with in_use(Path(folder), shared=True):
        return _evaluate(Path(folder), split, data_dir, save_attention, trust_remote_code)


def _evaluate(folder: Path, split: str, data_dir: str | None, save_attention: bool, trust_remote_code: bool) -> dict:
    """evaluate_stage's body, while this command shares the run folder with other readers."""
    from adapterbench.records import task_results
    cfg, tasks, model, tokenizer, stored = load_run_model(folder, trust_remote_code)
    splits = [load_splits(t, data_dir or cfg.data.data_dir, (split,)) for t in tasks]
    items = [prepare_items(t, s, tokenizer, cfg, i)[split] for i, (t, s) in enumerate(zip(tasks, splits))]
    collate = Collator(tokenizer.pad_token_id or 0)
    metrics, preds = evaluate(model, items, tasks, collate, cfg.train.eval_batch_size, cfg.train.precision)
    result = {"split": split, "tasks": metrics}
    if save_attention:
        for name in ("attention.csv", "attention.png"):
            writable_inside(Path(folder), name)
        result["attention"] = str(write_attention(folder, model, items[0], collate, tasks[0], cfg))
    if split == "dev":
        want = {t: r["dev"] for t, r in task_results(stored).items()}
        result.update(stored=want, reproduced=all(metrics[t] == want.get(t) for t in metrics))
    else:
        paths = []
        for t, s in zip(tasks, splits):
            path = writable_inside(Path(folder), "predictions", f"{t.name}.tsv")
            write_predictions(path, t, s[split], preds[t.name])
            paths.append(str(path))
        result["predictions"] = paths
    write_json(writable_inside(Path(folder), f"eval_{split}.json"), result)
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


def attention_heatmap(rows: list[list[float]], names: list[str], path: Path, title: str = "",
                      row_names: list[str] | None = None) -> None:
    """Layers (rows; or `row_names`, e.g. target tasks) x source adapters (columns), mean attention in each cell."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False      # a label with "$" is text, not TeX math
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(len(names), 1), 1.2 + 0.45 * max(len(rows), 1)))
    im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=float(np.nanmax(rows)) if rows else 1.0, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), row_names or [f"layer {i}" for i in range(len(rows))])
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
