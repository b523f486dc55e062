"""One plain training loop on accelerate: AdamW, linear warm-up and decay, gradient
clipping, evaluation on dev after every epoch, the best epoch kept (AdapterFusion protocol),
optional early-stopping patience."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from . import metrics as M
from .config import TrainConfig
from .errors import UserError


@dataclass
class TrainResult:
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


def make_accelerator():
    from accelerate import Accelerator
    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed
    set_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights are excluded."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_better(new: float, old: float | None, higher: bool) -> bool:
    return old is None or (new > old if higher else new < old)


@torch.no_grad()
def predict(model, loader, accelerator, regression: bool):
    """(predictions, labels or None) over a loader, gathered across processes."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(**batch)
        out = logits.float() if regression else logits.argmax(-1)
        preds.append(accelerator.gather_for_metrics(out).cpu())
        if "labels" in batch:
            labels.append(accelerator.gather_for_metrics(batch["labels"]).cpu())
    p = torch.cat(preds).numpy()
    return p, (torch.cat(labels).numpy() if labels else None)


def score(task, preds: np.ndarray, labels: np.ndarray) -> dict:
    return M.compute(task.metrics, labels, preds)


def train(model, train_items, dev_items, collate, task, cfg: TrainConfig, seed: int,
          log=lambda record: None, show_progress: bool = True) -> TrainResult:
    """Train `model` (only parameters with requires_grad) and leave it at its best epoch."""
    from transformers import get_linear_schedule_with_warmup

    accelerator = make_accelerator()
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                              collate_fn=collate)
    dev_loader = DataLoader(dev_items, batch_size=cfg.eval_batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = cfg.epochs * len(train_loader)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer, train_loader, dev_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, dev_loader, scheduler)
    higher = M.METRICS[task.main_metric][1]
    res, best_value, best_state, stale = TrainResult(), None, None, 0
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not (show_progress and accelerator.is_main_process))
    with progress:
        bar = progress.add_task("train", total=total, info="")
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            for batch in train_loader:
                loss = train_step(model, batch, optimizer, scheduler, accelerator, cfg, res.steps)
                res.steps += 1
                res.train_samples += batch["input_ids"].shape[0] * accelerator.num_processes
                elapsed = res.train_seconds + time.perf_counter() - t0
                progress.update(bar, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}",
                                info=f"loss {loss:.4f}  {res.train_samples / max(elapsed, 1e-9):.1f} samples/s")
                if res.steps % cfg.log_every == 0:
                    log({"step": res.steps, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0]})
                if cfg.max_steps and res.steps >= cfg.max_steps:
                    break
            res.train_seconds += time.perf_counter() - t0
            preds, labels = predict(model, dev_loader, accelerator, task.regression)
            dev = score(task, preds, labels)
            res.history.append({"epoch": epoch, **dev})
            log({"epoch": epoch, "step": res.steps, "dev": dev})
            value = dev[task.main_metric]
            if is_better(value, best_value, higher):
                best_value, res.best_epoch, res.best_metrics, stale = value, epoch, dev, 0
                best_state = trainable_snapshot(accelerator.unwrap_model(model))
            else:
                stale += 1
            if (cfg.patience and stale >= cfg.patience) or (cfg.max_steps and res.steps >= cfg.max_steps):
                break
    restore(accelerator.unwrap_model(model), best_state)
    return res


def train_step(model, batch, optimizer, scheduler, accelerator, cfg: TrainConfig, step: int) -> float:
    with accelerator.autocast():
        logits = model(**batch)
    loss = accelerator.unwrap_model(model).loss(logits, batch["labels"])
    if not math.isfinite(loss.item()):
        raise UserError(f"loss became {loss.item()} at step {step + 1}: lower train.lr "
                        f"(now {cfg.lr}) or check the labels")
    accelerator.backward(loss)
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def trainable_snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(model, state: dict | None) -> None:
    if not state:
        return
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)
