"""Multi-task training (mtl, mt-a, camtl): one encoder, one head per task, batches drawn by
a task sampler, evaluation per task, the best epoch by the mean of the tasks' main metrics.

Samplers (which task feeds the next batch):
- proportional: p_t ~ n_t;  uniform: p_t = 1/K;  temperature: p_t ~ n_t^(1/T);
- annealed (Stickland & Murray 2019): p_t ~ n_t^alpha, alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch e of E;
- uncertainty (MT-Uncertainty, Pilault et al. 2021): draw one batch from every task, score
  each example by its prediction entropy / log(#labels) times (its task's mean / the largest
  task mean), keep the top b. Regression tasks have no entropy: their examples get the mean
  score of the classification candidates of that step (the reference code borrows MRPC's).
An epoch is sum_t n_t / b steps for every scheme.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from . import __version__
from .config import RunConfig, config_hash, to_dict
from .data import Collator, load_splits
from .errors import UserError
from .methods import get_method, method_config
from .models import ClassificationHead, HeadConfig, count_params, load_encoder
from .runs import Run, RunExists, load_tensors, read_json, run_path, save_tensors, status_of, write_json
from .tasks import TaskSpec, load_task, parse_task
from .train import (autocast, by_length, is_better, load_checkpoint, make_accelerator, param_groups, restore,
                    save_checkpoint, score, scored_epoch, seed_everything, train_step)

SCHEMES = ("proportional", "uniform", "temperature", "annealed", "uncertainty")


def task_probs(sizes: list[int], scheme: str, temperature: float = 2.0, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if scheme == "proportional":
        w = n
    elif scheme == "uniform":
        w = np.ones_like(n)
    elif scheme == "temperature":
        w = n ** (1.0 / temperature)
    elif scheme == "annealed":
        w = n ** (1.0 - 0.8 * epoch / max(epochs - 1, 1))
    else:
        raise UserError(f"sampling.scheme '{scheme}' has no fixed task distribution")
    return w / w.sum()


class TaskStreams:
    """Endless shuffled batches per task (reshuffled each pass), seeded."""

    def __init__(self, items: list[list[dict]], batch_size: int, seed: int):
        self.items, self.b = items, batch_size
        self.rng = random.Random(seed)
        self.order = [[] for _ in items]

    def take(self, t: int, k: int | None = None) -> list[dict]:
        k = k or self.b
        out = []
        while len(out) < k:
            if not self.order[t]:
                self.order[t] = list(range(len(self.items[t])))
                self.rng.shuffle(self.order[t])
            out.append(self.items[t][self.order[t].pop()])
        return out


class MultiTaskModel(nn.Module):
    """Shared encoder; examples routed to their task's head by `task_ids`."""

    def __init__(self, encoder, heads: dict[str, ClassificationHead], tasks: list[TaskSpec], method):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.tasks = tasks
        self.method = method

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None, **_):
        self.method.set_tasks(self.encoder, task_ids)
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(input_ids=input_ids, **kwargs).last_hidden_state
        out = {}
        for i, t in enumerate(self.tasks):
            rows = (task_ids == i).nonzero().squeeze(-1)
            if rows.numel():
                logits = self.heads[t.name](hidden[rows])
                out[i] = (rows, logits.squeeze(-1) if t.regression else logits)
        return out

    def loss(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the tasks present of each task's mean loss (CA-MTL)."""
        losses = []
        for i, (rows, logits) in out.items():
            y = labels[rows]
            if self.tasks[i].regression:
                losses.append(nn.functional.mse_loss(logits.float(), y.float()))
            else:
                losses.append(nn.functional.cross_entropy(logits.float(), y.long()))
        return torch.stack(losses).mean()


class MTCollator(Collator):
    """Pads a mixed-task batch; labels stay float (class ids are cast back in the loss)."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id, regression=True)

    def __call__(self, items):
        batch = super().__call__([{k: v for k, v in it.items() if k not in ("task_id", "uid")} for it in items])
        batch["task_ids"] = torch.tensor([it["task_id"] for it in items])
        return batch


def uncertainty_pick(model, candidates: list[dict], collate, tasks: list[TaskSpec], b: int, device,
                     precision: str = "fp32") -> list[dict]:
    """MT-Uncertainty: keep the b candidates with the highest task-weighted normalised entropy.
    Each task's candidates are scored as one batch padded to its own longest example (not to
    the longest of the pool); regression tasks are not scored (they get the mean score)."""
    rows_of: dict[int, list[int]] = {}
    for j, c in enumerate(candidates):
        rows_of.setdefault(c["task_id"], []).append(j)
    score_ = torch.full((len(candidates),), float("nan"))
    task_means = {}
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        for i, rows in rows_of.items():
            if tasks[i].regression:
                continue
            batch = {k: v.to(device) for k, v in collate([candidates[j] for j in rows]).items()}
            p = model(**batch)[i][1].float().softmax(-1)
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
            score_[rows] = ent.cpu()
            task_means[i] = ent.mean().item()
    model.train()
    top = max(task_means.values()) if task_means else 1.0
    for i, mean in task_means.items():
        score_[rows_of[i]] *= mean / max(top, 1e-12)
    fill = score_[~score_.isnan()].mean() if (~score_.isnan()).any() else torch.tensor(1.0)
    score_ = torch.where(score_.isnan(), fill, score_)
    keep = score_.argsort(descending=True)[:b]
    return [candidates[i] for i in sorted(keep.tolist())]


def train_multitask(model, train_items, dev_items, collate, tasks, cfg: RunConfig, log, show_progress=True,
                    checkpoint_dir: Path | None = None):
    """The multi-task loop; checkpoints after each epoch (and every train.checkpoint_every
    steps) so that an interrupted run resumes to the same result."""
    tc = cfg.train
    accelerator = make_accelerator()
    streams = TaskStreams(train_items, tc.batch_size, cfg.seed)
    sizes = [len(x) for x in train_items]
    steps_per_epoch = max(1, sum(sizes) // tc.batch_size)
    total = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    from transformers import get_linear_schedule_with_warmup
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rng = np.random.default_rng(cfg.seed)
    res = {"epoch": 0, "batch": 0, "steps": 0, "train_seconds": 0.0, "train_samples": 0, "history": [],
           "best_epoch": -1, "best": None, "drawn": 0, "used": [[] for _ in tasks]}
    used = [set() for _ in tasks]
    best_state = None
    if checkpoint_dir is not None and (checkpoint_dir / "latest.json").is_file():
        res, best_state, extra = load_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler)
        used = [set(u) for u in res["used"]]
        rng.bit_generator.state = json.loads(extra["numpy_rng"])
        streams.rng.setstate(_tuple(json.loads(extra["python_rng"])))
        streams.order = json.loads(extra["orders"])
        log({"resumed": True, "epoch": res["epoch"], "step": res["steps"]})

    def checkpoint():
        res["used"] = [sorted(u) for u in used]
        save_checkpoint(checkpoint_dir, accelerator, model, optimizer, scheduler, res, best_state,
                        {"numpy_rng": json.dumps(rng.bit_generator.state), "python_rng": json.dumps(streams.rng.getstate()),
                         "orders": json.dumps(streams.order)})

    with Progress(disable=not show_progress) as progress:
        bar = progress.add_task("multitask", total=total, completed=res["steps"])
        while res["epoch"] < tc.epochs and not (tc.max_steps and res["steps"] >= tc.max_steps):
            epoch = res["epoch"]
            model.train()
            t0 = time.perf_counter()
            while res["batch"] < steps_per_epoch:
                if cfg.sampling.scheme == "uncertainty":
                    cands = [it for t in range(len(tasks)) for it in streams.take(t)]
                    chosen = uncertainty_pick(model, cands, collate, tasks, tc.batch_size, accelerator.device,
                                              tc.precision)
                    res["drawn"] += len(cands)
                else:
                    p = task_probs(sizes, cfg.sampling.scheme, cfg.sampling.temperature, epoch, tc.epochs)
                    chosen = streams.take(int(rng.choice(len(tasks), p=p)))
                    res["drawn"] += len(chosen)
                for it in chosen:
                    used[it["task_id"]].add(it["uid"])
                batch = {k: v.to(accelerator.device) for k, v in collate(chosen).items()}
                loss = train_step(model, batch, optimizer, scheduler, accelerator, tc, res["steps"])
                res["steps"] += 1
                res["batch"] += 1
                res["train_samples"] += len(chosen)
                progress.update(bar, advance=1, description=f"epoch {epoch + 1}/{tc.epochs} loss {loss:.3f}")
                if res["steps"] % tc.log_every == 0:
                    log({"step": res["steps"], "epoch": epoch, "loss": loss})
                if tc.max_steps and res["steps"] >= tc.max_steps:
                    break
                if checkpoint_dir is not None and tc.checkpoint_every and res["steps"] % tc.checkpoint_every == 0:
                    res["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
            res["train_seconds"] += time.perf_counter() - t0
            if scored_epoch(epoch, res["steps"], tc):
                dev = evaluate_tasks(accelerator.unwrap_model(model), dev_items, collate, tasks, tc.eval_batch_size)
                mean = float(np.mean([dev[t.name][t.main_metric] for t in tasks]))
                res["history"].append({"epoch": epoch, "mean_main": mean, **{t: m for t, m in dev.items()}})
                log({"epoch": epoch, "step": res["steps"], "dev": dev, "mean_main": mean})
                if is_better(mean, res["best"], True):
                    res["best"], res["best_epoch"], res["best_dev"] = mean, epoch, dev
                    best_state = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
                                  if p.requires_grad}
            res["epoch"], res["batch"] = epoch + 1, 0
            if checkpoint_dir is not None:
                checkpoint()
    restore(accelerator.unwrap_model(model), best_state)
    res["used"] = used
    return res


def _tuple(x):
    """JSON turned Python's random state tuples into lists; turn them back."""
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


@torch.no_grad()
def evaluate_tasks(model, dev_items, collate, tasks, batch_size: int) -> dict:
    """Each task's dev metrics; examples go in length order (less padding)."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for i, t in enumerate(tasks):
        preds, labels = [], []
        items = by_length(dev_items[i])[0]
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[s:s + batch_size]).items()}
            rows, logits = model(**batch)[i]
            preds.append((logits.float() if t.regression else logits.argmax(-1)).cpu())
            labels.append(batch["labels"].cpu())
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        out[t.name] = score(t, p, y if t.regression else y.astype(np.int64))
    return out


def build(cfg: RunConfig, tasks: list[TaskSpec]):
    method = get_method(cfg.method["name"])
    mcfg = method_config(cfg.method)
    encoder, tokenizer = load_encoder(cfg.model.name, cfg.model.trust_remote_code)
    seed_everything(cfg.seed)
    method.apply(encoder, mcfg, [t.name for t in tasks])
    heads = {t.name: ClassificationHead(HeadConfig(encoder.config.hidden_size, t.num_labels, t.regression,
                                                   labels=list(t.labels) or None)) for t in tasks}
    return MultiTaskModel(encoder, heads, tasks, method), tokenizer, method, mcfg


def items_for(tasks, splits, tokenizer, cfg: RunConfig, split: str) -> list[list[dict]]:
    from .stages import prepare_items
    out = []
    for i, t in enumerate(tasks):
        its = prepare_items(t, {split: splits[i][split]}, tokenizer, cfg)[split]
        for j, it in enumerate(its):
            it["task_id"], it["uid"] = i, j
        out.append(its)
    return out


def multitask_folder(cfg: RunConfig, tasks: list[TaskSpec] | None = None) -> Path:
    """The run folder of a multi-task config (tasks joined by '+')."""
    tasks = tasks or [load_task(n.strip()) for n in cfg.task.split(",") if n.strip()]
    return run_path(cfg.out_dir, "multitask", cfg.method["name"], "+".join(t.name for t in tasks), cfg.model.name,
                    cfg.seed, config_hash(to_dict(cfg)))


def multitask_stage(cfg: RunConfig, force: bool = False, show_progress: bool = True) -> Path:
    """Train one encoder on several tasks and write its run folder."""
    names = [t.strip() for t in cfg.task.split(",") if t.strip()]
    if len(names) < 2:
        raise UserError(f"multitask needs at least two tasks, got '{cfg.task}': pass --tasks rte,mrpc")
    if cfg.sampling.scheme not in SCHEMES:
        raise UserError(f"sampling.scheme '{cfg.sampling.scheme}' must be one of {', '.join(SCHEMES)}")
    tasks = [load_task(n) for n in names]
    folder = multitask_folder(cfg, tasks)
    if status_of(folder) == "ok" and not force:
        raise RunExists(folder)
    splits = [load_splits(t, cfg.data.data_dir, ("train", "dev")) for t in tasks]
    model, tokenizer, method, mcfg = build(cfg, tasks)
    train_items = items_for(tasks, splits, tokenizer, cfg, "train")
    dev_items = items_for(tasks, splits, tokenizer, cfg, "dev")
    run = Run.create(folder, to_dict(cfg), tasks[0], force)
    try:
        collate = MTCollator(tokenizer.pad_token_id or 0)
        res = train_multitask(model, train_items, dev_items, collate, tasks, cfg, run.log, show_progress,
                              checkpoint_dir=run.checkpoint_dir)
        # the model is left at its best scored epoch, whose per-task dev metrics the loop kept
        dev = res.get("best_dev") or evaluate_tasks(model, dev_items, collate, tasks, cfg.train.eval_batch_size)
        save_tensors(run.folder / "multitask" / "encoder.safetensors",
                     method.trainable_state(model.encoder, mcfg, names))
        for t in tasks:
            save_tensors(run.folder / "multitask" / f"head-{t.name}.safetensors", model.heads[t.name].state_dict())
        write_json(run.folder / "multitask" / "tasks.json", [t.path for t in tasks])
        if cfg.method["name"] == "mt-a":
            export_mta(run.folder / "multitask", model.encoder, tokenizer, cfg, tasks)
        trainable, total = count_params(model)
        used = sum(len(u) for u in res["used"]) / sum(len(x) for x in train_items)
        run.finish({
            "stage": "multitask", "tasks": {t.name: {"dev": dev[t.name], "main_metric": t.main_metric,
                                                     "main_value": dev[t.name][t.main_metric]} for t in tasks},
            "task": "+".join(names), "method": cfg.method["name"], "label": cfg.label or cfg.method["name"],
            "model": cfg.model.name, "seed": cfg.seed, "sampling": cfg.sampling.scheme,
            "main_metric": "mean of main metrics",
            "main_value": float(np.mean([dev[t.name][t.main_metric] for t in tasks])),
            "best_epoch": res["best_epoch"], "epochs_run": res["epoch"], "history": res["history"],
            "steps": res["steps"], "fraction_of_examples_used": round(used, 4),
            "fraction_used_per_task": {t.name: round(len(u) / max(len(x), 1), 4)
                                       for t, u, x in zip(tasks, res["used"], train_items)},
            "examples_drawn": res["drawn"], "examples_trained": res["train_samples"],
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / total, 4),
            "train_seconds": round(res["train_seconds"], 3),
            "samples_per_second": round(res["train_samples"] / max(res["train_seconds"], 1e-9), 3),
            "adapterbench_version": __version__})
    except BaseException as e:
        run.fail(e)
        raise
    return run.folder


def export_mta(out: Path, encoder, tokenizer, cfg: RunConfig, tasks: list[TaskSpec]) -> None:
    """For "Fusion w/ MT-A" (Pfeiffer et al. 2021): the jointly fine-tuned encoder without its
    adapters as a model folder (`base_model/`), and each task's adapter as an adapter folder
    (`adapters/<task>/`) whose base model is that folder, so `fuse --adapters .../adapters/*` works."""
    from transformers import AutoModel
    from .methods.bottleneck import adapter_state
    from .methods.mta import bottleneck
    from .models import resolve_model_path
    base_dir = out / "base_model"
    plain = {k.replace(".base.", "."): v for k, v in encoder.state_dict().items() if ".adapters." not in k}
    fresh = AutoModel.from_pretrained(resolve_model_path(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    missing, unexpected = fresh.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # unused; kept as pretrained so loading is quiet
    if missing or unexpected:
        raise UserError(f"cannot unwrap the MT-A encoder ({(missing or unexpected)[0]})")
    fresh.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    mcfg = method_config(cfg.method)
    bcfg = bottleneck(mcfg)
    adapter_method = vars(method_config({"name": "pfeiffer", "reduction_factor": bcfg.reduction_factor,
                                         "activation": bcfg.activation, "init": bcfg.init}))
    for t in tasks:
        folder = out / "adapters" / t.name
        save_tensors(folder / "adapter.safetensors", adapter_state(encoder, bcfg, t.name), {"format": "pt"})
        write_json(folder / "adapter_config.json", {
            "method": adapter_method, "base_model": str(base_dir.resolve()), "model_type": encoder.config.model_type,
            "hidden_size": encoder.config.hidden_size, "num_layers": encoder.config.num_hidden_layers,
            "task": t.name, "trained_as": "mt-a", "adapterbench_version": __version__})


def evaluate_multitask(folder: Path, data_dir: str | None = None) -> dict:
    """Rebuild a multitask run from its folder; recompute every task's dev metrics."""
    from .config import build as build_cfg, load_yaml
    cfg = build_cfg(RunConfig, load_yaml(folder / "config.yaml"))
    tasks = [parse_task(Path(p)) if Path(p).is_file() else load_task(Path(p).stem)
             for p in read_json(folder / "multitask" / "tasks.json")]
    model, tokenizer, method, mcfg = build(cfg, tasks)
    method.load_state(model.encoder, mcfg, [t.name for t in tasks],
                      load_tensors(folder / "multitask" / "encoder.safetensors"))
    for t in tasks:
        model.heads[t.name].load_state_dict(load_tensors(folder / "multitask" / f"head-{t.name}.safetensors"))
    splits = [load_splits(t, data_dir or cfg.data.data_dir, ("dev",)) for t in tasks]
    dev_items = items_for(tasks, splits, tokenizer, cfg, "dev")
    dev = evaluate_tasks(model, dev_items, MTCollator(tokenizer.pad_token_id or 0), tasks,
                         cfg.train.eval_batch_size)
    stored = read_json(folder / "metrics.json")["tasks"]
    return {"split": "dev", "tasks": dev, "reproduced": all(dev[t] == stored[t]["dev"] for t in dev)}
