"""One plain training loop on accelerate: AdamW, linear warm-up and decay, gradient
clipping, evaluation on dev after every epoch, the best epoch kept (AdapterFusion protocol),
optional early-stopping patience, and checkpoints from which an interrupted run resumes to
the same result (trainable weights, optimizer, scheduler, RNG and sampler position)."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from . import metrics as M
from .config import TrainConfig
from .errors import UserError


@dataclass
class TrainResult:
    """Where the loop is (a checkpoint stores this) and what it found."""
    epoch: int = 0                 # current epoch
    batch: int = 0                 # batches done in the current epoch
    steps: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    history: list = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    stale: int = 0                 # epochs since the best one

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


def make_accelerator():
    """One process, or several under `accelerate launch` / `torchrun`: each global batch is
    split across the processes (split_batches), so N processes train as one does."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, dataloader_config=DataLoaderConfiguration(split_batches=True))


def autocast(precision: str, device):
    """train.precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = bf16 autocast on
    either (fast on CPUs with avx512_bf16/AMX); fp32 = no autocast. Weights stay fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision '{precision}' must be one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    on = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


PRECISIONS = ("auto", "fp32", "bf16")


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
def predict(model, loader, accelerator, regression: bool, precision: str = "auto"):
    """(predictions, labels or None) over a loader, gathered across processes."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with autocast(precision, accelerator.device):
            logits = model(**batch)
        out = logits.float() if regression else logits.argmax(-1)
        preds.append(accelerator.gather_for_metrics(out).cpu())
        if "labels" in batch:
            labels.append(accelerator.gather_for_metrics(batch["labels"]).cpu())
    p = torch.cat(preds).numpy()
    return p, (torch.cat(labels).numpy() if labels else None)


def by_length(items: list) -> tuple[list, np.ndarray]:
    """Items sorted by length (evaluation batches then carry little padding) and the inverse
    permutation that puts predictions made in that order back in the items' order."""
    order = np.argsort([len(it["input_ids"]) for it in items], kind="stable")
    return [items[i] for i in order], np.argsort(order, kind="stable")


def score(task, preds: np.ndarray, labels: np.ndarray) -> dict:
    return M.compute(task.metrics, labels, preds)


def train(model, train_items, dev_items, collate, task, cfg: TrainConfig, seed: int,
          log=lambda record: None, show_progress: bool = True, checkpoint_dir: Path | None = None) -> TrainResult:
    """Train `model` (only parameters with requires_grad) and leave it at its best epoch.
    With `checkpoint_dir`, a checkpoint found there is resumed and new ones are written."""
    from transformers import get_linear_schedule_with_warmup

    accelerator = make_accelerator()
    gen = torch.Generator().manual_seed(seed)
    if cfg.group_by_length:
        from .data import LengthGroupedBatches
        sampler = LengthGroupedBatches([len(it["input_ids"]) for it in train_items], cfg.batch_size, gen)
        train_loader = DataLoader(train_items, batch_sampler=sampler, collate_fn=collate)
    else:
        train_loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                  collate_fn=collate)
    dev_loader = DataLoader(by_length(dev_items)[0], batch_size=cfg.eval_batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = cfg.epochs * len(train_loader)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.num_processes > 1:  # shard the data; one process keeps the plain loaders (exact resume)
        for key, b in (("train.batch_size", cfg.batch_size), ("train.eval_batch_size", cfg.eval_batch_size)):
            if b % accelerator.num_processes:
                raise UserError(f"{key}={b} is not a multiple of the {accelerator.num_processes} processes: "
                                f"each batch is split across them; choose a multiple")
        train_loader, dev_loader = accelerator.prepare(train_loader, dev_loader)
    higher = M.METRICS[task.main_metric][1]
    res, best_state = TrainResult(), None
    epoch_gen = gen.get_state()
    if checkpoint_dir is not None and (checkpoint_dir / "latest.json").is_file():
        state, best_state, extra = load_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer,
                                                    scheduler)
        res, epoch_gen = TrainResult(**state), extra["epoch_gen"]
        log({"resumed": True, "epoch": res.epoch, "batch": res.batch, "step": res.steps})
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not (show_progress and accelerator.is_main_process))
    with progress:
        bar = progress.add_task("train", total=total, completed=res.steps, info="")
        while res.epoch < cfg.epochs and not (cfg.max_steps and res.steps >= cfg.max_steps):
            model.train()
            gen.set_state(epoch_gen)         # the epoch's order, also when resuming mid-epoch
            t0 = time.perf_counter()
            for i, batch in enumerate(train_loader):
                if i < res.batch:
                    continue
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                loss = train_step(model, batch, optimizer, scheduler, accelerator, cfg, res.steps)
                res.steps += 1
                res.batch += 1
                res.train_samples += batch["input_ids"].shape[0] * accelerator.num_processes
                elapsed = res.train_seconds + time.perf_counter() - t0
                progress.update(bar, advance=1, description=f"epoch {res.epoch + 1}/{cfg.epochs}",
                                info=f"loss {loss:.4f}  {res.train_samples / max(elapsed, 1e-9):.1f} samples/s")
                if res.steps % cfg.log_every == 0:
                    log({"step": res.steps, "epoch": res.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0]})
                if cfg.max_steps and res.steps >= cfg.max_steps:
                    break
                if checkpoint_dir is not None and cfg.checkpoint_every and res.steps % cfg.checkpoint_every == 0:
                    res.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint(checkpoint_dir, accelerator, model, optimizer, scheduler, asdict(res),
                                    best_state, {"epoch_gen": epoch_gen})
            res.train_seconds += time.perf_counter() - t0
            if scored_epoch(res.epoch, res.steps, cfg):
                preds, labels = predict(model, dev_loader, accelerator, task.regression, cfg.precision)
                dev = score(task, preds, labels)
                res.history.append({"epoch": res.epoch, **dev})
                log({"epoch": res.epoch, "step": res.steps, "dev": dev})
                if is_better(dev[task.main_metric], res.best_value, higher):
                    res.best_value, res.best_epoch, res.best_metrics, res.stale = dev[task.main_metric], res.epoch, dev, 0
                    best_state = trainable_snapshot(accelerator.unwrap_model(model))
                else:
                    res.stale += 1
            res.epoch, res.batch = res.epoch + 1, 0
            epoch_gen = gen.get_state()
            if cfg.patience and res.stale >= cfg.patience:
                break
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, accelerator, model, optimizer, scheduler, asdict(res), best_state,
                                {"epoch_gen": epoch_gen})
    restore(accelerator.unwrap_model(model), best_state)
    return res


def scored_epoch(epoch: int, steps: int, cfg: TrainConfig) -> bool:
    """train.eval_every: dev is scored after every N-th epoch and after the last one."""
    last = epoch + 1 >= cfg.epochs or bool(cfg.max_steps and steps >= cfg.max_steps)
    return last or (epoch + 1) % cfg.eval_every == 0


def train_step(model, batch, optimizer, scheduler, accelerator, cfg: TrainConfig, step: int) -> float:
    with autocast(cfg.precision, accelerator.device):
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


# --- checkpoints ---------------------------------------------------------------------------
# <run>/checkpoint/step-N/ holds weights.safetensors (trainable weights), best.safetensors,
# optim.pt (optimizer, scheduler, RNG states) and state.json; latest.json names the newest
# complete one and is written last, atomically, so a kill at any moment leaves a usable one.

def save_checkpoint(root: Path, accelerator, model, optimizer, scheduler, state: dict, best_state,
                    extra: dict | None = None) -> None:
    """Write a complete checkpoint, then point latest.json at it. `state` is JSON (the loop's
    position and results); `extra` holds tensors and plain values (RNG states)."""
    from .runs import save_tensors, write_json
    if not accelerator.is_main_process:
        return
    name = f"step-{state['steps']}-e{state['epoch']}"
    folder = root / name
    save_tensors(folder / "weights.safetensors", trainable_snapshot(accelerator.unwrap_model(model)))
    if best_state:
        save_tensors(folder / "best.safetensors", best_state)
    import io
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **(extra or {})}, buf)
    from .runs import atomic_write
    atomic_write(folder / "optim.pt", buf.getvalue())
    write_json(folder / "state.json", state)
    write_json(root / "latest.json", {"checkpoint": name})
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(root: Path, model, optimizer, scheduler):
    """Restore weights, optimizer, scheduler and torch RNG; returns (state, best state, extra)."""
    from .runs import load_tensors
    folder = root / json.loads((root / "latest.json").read_text())["checkpoint"]
    restore(model, load_tensors(folder / "weights.safetensors"))
    best = load_tensors(folder / "best.safetensors") if (folder / "best.safetensors").is_file() else None
    try:
        extra = torch.load(folder / "optim.pt", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {folder} is unreadable ({type(e).__name__}): delete {root} to start over") from None
    optimizer.load_state_dict(extra.pop("optimizer"))
    scheduler.load_state_dict(extra.pop("scheduler"))
    torch.set_rng_state(extra.pop("torch_rng"))
    return json.loads((folder / "state.json").read_text()), best, extra
