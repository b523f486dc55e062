"""The one training loop, for every method and for single- and multi-task runs alike.

A run is a `TaskModel` (encoder + one head per task; a single-task run has one head) fed by a
batch source (`sampling.py`: a seeded shuffle for one task, a task sampler or MT-Uncertainty for
several). The loop is plain: AdamW, linear warm-up and decay, gradient clipping, dev scored
after every `train.eval_every`-th epoch, the best scoring kept (AdapterFusion protocol;
several tasks: the mean of their main metrics), optional early-stopping patience, and
checkpoints from which an interrupted run resumes to the same result (trainable weights,
optimizer, scheduler, torch RNG and the batch source's position): after every epoch, every
`train.checkpoint_every` steps, every `train.checkpoint_minutes` minutes, and at the next step
after the process gets SIGUSR1 (`kill -USR1 PID`: before a machine or a job's time ends) or
SIGTERM (`kill PID`, `scancel`: then it stops, resumable).
A batch trains in parts when that saves a quarter of the padding (`split_batch`): one part
per task where it mixes tasks (MT-Uncertainty's), on a CPU also length-sorted chunks of
CPU_CHUNK; the parts' gradients add up to the whole batch's.

Several processes (`torchrun`, `accelerate launch`): every process draws the same global batch
from the source and takes its contiguous share; each example's loss is weighted so that the
summed gradient equals the one-process gradient (`example_weights`), so N processes train as
one does. Dev is scored by every process on the whole dev set (identical results, no gather);
the recipe lets only rank 0 write.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from adapterbench import metrics as M
from adapterbench.config import TrainConfig
from adapterbench.errors import UserError
from adapterbench.recipe import tracking as TR
from adapterbench.recipe.checkpoint import (
    CheckpointRequests,
    Stopped,
    TrainResult,
    load_checkpoint,
    restore,
    save_checkpoint,
    trainable_snapshot,
)
from adapterbench.recipe.precision import (
    accelerate_setting_ignored,
    autocast,
    bf16_matmul,
)
from adapterbench.recipe.runfolder import machine_name
from adapterbench.recipe.tracking import check_trackers, make_accelerator, scalars


def sampling_share(source, epoch: int, tasks) -> dict:
    """{"sampling_share": {task: share}} of the examples a multi-task source has fed this epoch
    so far (what MT-Uncertainty is choosing, live in log.jsonl and the trackers); {} for a
    single-task source or before the epoch's first batch."""
    picks = getattr(source, "picks", None)
    if not picks or len(picks) <= epoch or not sum(picks[epoch]):
        return {}
    n = sum(picks[epoch])
    return {"sampling_share": {t.name: picks[epoch][i] / n for i, t in enumerate(tasks)}}


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


def by_length(items: list) -> tuple[list, np.ndarray]:
    """Items sorted by length (evaluation batches then carry little padding) and the inverse
    permutation that puts predictions made in that order back in the items' order."""
    order = np.argsort([len(it["input_ids"]) for it in items], kind="stable")
    return [items[i] for i in order], np.argsort(order, kind="stable")


def example_weights(items: list[dict]) -> torch.Tensor:
    """w_i with sum_i w_i l_i = the batch loss: the mean over the tasks present of each task's
    mean loss (CA-MTL's multi-task loss; one task: the plain mean)."""
    tasks = [it.get("task_id", 0) for it in items]
    counts = {t: tasks.count(t) for t in set(tasks)}
    return torch.tensor([1.0 / (len(counts) * counts[t]) for t in tasks])


def shard(items: list[dict], rank: int, world: int) -> tuple[list[dict], torch.Tensor]:
    """This process's contiguous share of a global batch and its examples' loss weights (times
    the number of processes: DDP averages the processes' gradients)."""
    w = example_weights(items) * world
    per = math.ceil(len(items) / world)
    lo, hi = rank * per, min(len(items), (rank + 1) * per)
    if lo >= hi:   # fewer examples than processes: take one with weight 0 (DDP needs a backward)
        return items[:1], torch.zeros(1)
    return items[lo:hi], w[lo:hi]


# On a CPU padded tokens cost as much as real ones: batches of mixed lengths are trained, and
# MT-Uncertainty's candidates scored, in length-sorted chunks of this many (docs/performance.md).
CPU_CHUNK = 8


def length_chunks(rows: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """`rows` sorted by length (stable) and cut into chunks of `size`, each to be padded to its
    own longest (32 random SST-2 sentences padded as one batch are 3x their real tokens; in
    length-sorted chunks of 8, 1.4x)."""
    order = [r for _, r in sorted(zip(lengths, rows), key=lambda x: x[0])]
    return [order[k:k + size] for k in range(0, len(order), size)]


def split_batch(items: list[dict], weights: torch.Tensor,
                chunk: int | None = None) -> list[tuple[list[dict], torch.Tensor]]:
    """A training batch as parts, each padded to its own longest, whose gradients add up to the
    batch's step (every example keeps its loss weight). A batch that mixes tasks
    (MT-Uncertainty's: RTE pairs beside SST-2 sentences) goes one part per task; with `chunk`
    (on a CPU, where padded tokens cost as much as real ones) each task's part is cut further
    into length-sorted chunks of `chunk`, single-task batches too (a multi-task sampler's 32
    random SST-2 sentences). The split is taken when it removes at least a quarter of the padded
    tokens, else the batch stays whole: a rule on token counts, so every process splits alike."""
    groups: dict[int, list[int]] = {}
    for j, it in enumerate(items):
        groups.setdefault(it.get("task_id", 0), []).append(j)
    split = list(groups.values())
    if chunk:
        split = [part for rows in split
                 for part in length_chunks(rows, [len(items[j]["input_ids"]) for j in rows], chunk)]
    width = lambda rows: max(len(items[j]["input_ids"]) for j in rows)
    if len(split) < 2 or sum(len(rows) * width(rows) for rows in split) > 0.75 * len(items) * width(range(len(items))):
        return [(items, weights)]
    return [([items[j] for j in rows], weights[rows]) for rows in split]


@torch.no_grad()
def evaluate(model, dev_sets: list[list[dict]], tasks, collate, batch_size: int, precision: str = "auto"):
    """({task: metrics}, {task: predictions in item order}) of every task's split; examples go
    in length order (less padding). Metrics are empty for a split without labels."""
    model.eval()
    device = next(model.parameters()).device
    metrics, predictions = {}, {}
    for i, (task, items) in enumerate(zip(tasks, dev_sets)):
        ordered, back = by_length(items)
        preds, labels = [], []
        for s in range(0, len(ordered), batch_size):
            batch = {k: v.to(device) for k, v in collate(ordered[s:s + batch_size], task_id=i).items()}
            with autocast(precision, device):
                logits = model(**batch)[i][1]
            preds.append((logits.float() if task.regression else logits.argmax(-1)).cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
        p = torch.cat(preds).numpy()
        predictions[task.name] = p[back]
        if labels:
            y = torch.cat(labels).numpy()
            metrics[task.name] = M.compute(task.metrics, y if task.regression else y.astype(np.int64), p)
    return metrics, predictions


def main_value(dev: dict, tasks) -> float:
    """A split's summary: the main metric, or the mean of the tasks' main metrics."""
    return float(np.mean([dev[t.name][t.main_metric] for t in tasks]))


def compact(preds, regression: bool) -> list:
    """Per-example predictions as a run keeps them: class ids, or scores to 4 decimals."""
    return [round(float(p), 4) for p in preds] if regression else [int(p) for p in preds]


def train(model, source, dev_sets, tasks, collate, cfg: TrainConfig, log=lambda record: None,
          show_progress: bool = True, checkpoint_dir: Path | None = None, track_dir: Path | None = None,
          heldout_sets: list | None = None, tracking=None) -> TrainResult:
    """Train `model` (only parameters with requires_grad) on `source`'s batches and leave it at
    the scored epoch `cfg.selection` chose: the best on `heldout_sets` (slices of the training
    split it never trains on), the best on dev, or the last. Dev is scored every time for the
    curves and the result, but under `heldout` nothing reads it to decide. With
    `checkpoint_dir`, a checkpoint found there is resumed and new ones are written; with
    `track_dir` (or `tracking`, a `tracking.RunInfo`: how trackers file the run), every logged
    number also goes to the trackers of `train.log_with` (TensorBoard event files in the run folder)."""
    if cfg.selection == "heldout" and not (heldout_sets and all(heldout_sets)):
        raise UserError("train.selection=heldout needs the held-out slice of each task's training split "
                        "(prepare_items cuts it): pass heldout_sets, or use train.selection=dev")
    if tracking is None and track_dir is not None:
        tracking = TR.RunInfo(Path(track_dir))
    lp = start_loop(model, source, tasks, collate, cfg, log, tracking, checkpoint_dir)
    if cfg.batch_size % lp.world:
        raise UserError(f"train.batch_size={cfg.batch_size} is not a multiple of the {lp.world} processes: "
                        f"each batch is split across them; choose a multiple")
    higher = all(M.METRICS[t.main_metric][1] for t in tasks)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not (show_progress and lp.accelerator.is_main_process))
    with progress, lp.requests:
        lp.progress, lp.bar = progress, progress.add_task("train", total=lp.total, completed=lp.res.steps, info="")
        res = lp.res
        while res.epoch < cfg.epochs and not (cfg.max_steps and res.steps >= cfg.max_steps):
            train_epoch(lp)
            if scored_epoch(res.epoch, res.steps, cfg):
                lp.best_state = score_epoch(lp.plain, dev_sets, heldout_sets, tasks, collate, cfg, res, lp.best_state,
                                            higher, lp.log)
            if share := sampling_share(source, res.epoch, tasks):      # multi-task: who fed this epoch
                lp.log({"step": res.steps, "epoch": res.epoch, **share})
            res.epoch += 1
            if cfg.patience and res.stale >= cfg.patience:
                break
            if checkpoint_dir is not None:
                lp.checkpoint()
            if lp.requests.stopping:       # a signal during the epoch's dev scoring
                stop(lp, f"epoch {res.epoch}")
    restore(lp.plain, lp.best_state)
    if lp.wanted:
        TR.finish(lp.accelerator, tracking, final_metrics(res, tasks))
    return res


@dataclass
class Loop:
    """What one training loop holds: the prepared model and optimizer, where it is (`res`), the
    best weights so far, its log (log.jsonl and the trackers) and its checkpoint requests."""
    model: torch.nn.Module
    plain: torch.nn.Module           # the model without accelerate's wrapper
    source: object                   # the batches (sampling.Shuffled / TaskMixture)
    tasks: list
    collate: object
    cfg: TrainConfig
    accelerator: object
    optimizer: object
    scheduler: object
    total: int                       # steps of the whole run
    log: object
    wanted: list
    here: str                        # machine_name of this leg
    requests: CheckpointRequests
    checkpoint_dir: Path | None
    res: TrainResult = field(default_factory=TrainResult)
    best_state: dict | None = None
    progress: object = None
    bar: object = None
    leg_started: float = field(default_factory=time.time)   # when this process took the run up

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def checkpoint(self) -> None:
        """Save the loop; its wall time so far (earlier legs' and this one's) goes with it."""
        state = asdict(self.res)
        state["earlier_wall_seconds"] += time.time() - self.leg_started
        save_checkpoint(self.checkpoint_dir, self.accelerator, self.plain, self.optimizer, self.scheduler,
                        state, self.best_state, {"source": json.dumps(self.source.state())})
        self.requests.reset()

    def due(self, step: int) -> str:
        """Why a checkpoint is owed at this step ('' if none), the same answer on every rank: rank
        0's (its clock, its SIGUSR1), since every rank writes its generators into a checkpoint."""
        why = self.requests.due(step)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            box = [why]
            broadcast_object_list(box, from_process=0)
            why = box[0]
        return why


def start_loop(model, source, tasks, collate, cfg: TrainConfig, log, tracking, checkpoint_dir) -> Loop:
    """The accelerator (with the trackers `train.log_with` asks for), AdamW with a linear warm-up
    schedule, and the state of a checkpoint in `checkpoint_dir` when there is one."""
    from transformers import get_linear_schedule_with_warmup
    check_trackers(cfg.log_with)
    wanted = [t for t in cfg.log_with if t != "none"] if tracking is not None else []
    accelerator = make_accelerator(len(tasks) > 1, TR.build(wanted, tracking) if wanted else None,
                                   tracking.folder if wanted else None)
    if wanted:
        TR.start(accelerator, tracking)
    if (note := accelerate_setting_ignored(cfg.precision, accelerator.device)) and accelerator.is_main_process:
        print(note, file=sys.stderr)
        log({"warning": note})
    log = logger(log, accelerator, wanted)
    here = machine_name(accelerator.device)
    log({"machine": here})                              # every leg of the run says where it ran
    if how := bf16_matmul(cfg.precision, accelerator.device):
        log({"bf16_matmul": how})
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = cfg.epochs * source.steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer = accelerator.prepare(model, optimizer)   # the scheduler steps once per global step
    requests = CheckpointRequests(cfg.checkpoint_every, cfg.checkpoint_minutes, catch_term=accelerator.num_processes == 1)
    lp = Loop(model, accelerator.unwrap_model(model), source, tasks, collate, cfg, accelerator, optimizer, scheduler,
              total, log, wanted, here, requests, checkpoint_dir)
    if checkpoint_dir is not None and (checkpoint_dir / "latest.json").is_file():
        state, lp.best_state, extra = load_checkpoint(checkpoint_dir, lp.plain, optimizer, scheduler,
                                                          accelerator.process_index, accelerator.num_processes)
        lp.res = TrainResult(**state)
        source.restore(json.loads(extra["source"]))
        log({"resumed": True, "epoch": lp.res.epoch, "step": lp.res.steps})
    return lp


def logger(to_file, accelerator, wanted: list):
    """log.jsonl and the trackers, the same numbers (a record with a step goes to both)."""
    def log(record: dict) -> None:
        to_file(record)
        if wanted and "step" in record:
            accelerator.log(scalars(record), step=record["step"])
    return log


def stop(lp: Loop, where: str) -> None:
    """A signal asked the run to stop and its checkpoint is written: hand the signal to whoever
    else handles it (submitit requeues the job), else stop as interrupted."""
    lp.requests.hand_over()
    raise Stopped.after(where, lp.checkpoint_dir is not None, lp.requests.why)


def train_epoch(lp: Loop) -> None:
    """One epoch of steps (each batch cut as `split_batch` cuts it on this device), logged every
    `log_every` steps, checkpointed when a request is due; stops at `max_steps` or on a signal."""
    res, cfg, acc = lp.res, lp.cfg, lp.accelerator
    chunk = CPU_CHUNK if acc.device.type == "cpu" else None   # split_batch's rule on this device
    lp.model.train()
    t0, spent, seen = time.perf_counter(), 0.0, lp.requests.continued
    for items in lp.source.epoch(res.epoch):
        mine, weights = shard(items, acc.process_index, lp.world)
        # a penalty (fusion's) counts once per step: such a model's batch is never split
        parts = split_batch(mine, weights, chunk) if not lp.plain.aux else [(mine, weights)]
        batches = [{**{k: v.to(acc.device) for k, v in lp.collate(its).items()},
                    "weights": w.to(acc.device)} for its, w in parts]
        loss, grad_norm = train_step(lp.model, lp.plain, batches, lp.optimizer, lp.scheduler, acc, cfg, res.steps)
        res.steps += 1
        res.train_samples += len(items)
        now = time.perf_counter()
        took, t0 = now - t0, now
        if lp.requests.continued != seen:   # stopped (SIGSTOP) during this step: its length is no training time
            seen, took = lp.requests.continued, (res.train_seconds + spent) / max(res.steps - 1, 1)
        spent += took
        pace = res.train_samples / max(res.train_seconds + spent, 1e-9)
        lp.progress.update(lp.bar, advance=1, description=f"epoch {res.epoch + 1}/{cfg.epochs}",
                           info=f"loss {loss:.4f}  {pace:.1f} samples/s")
        if res.steps % cfg.log_every == 0:
            lp.log({"step": res.steps, "epoch": res.epoch, "loss": loss, "lr": lp.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "samples_per_s": round(pace, 3), "steps_total": lp.total,
                    **sampling_share(lp.source, res.epoch, lp.tasks)})
        if cfg.max_steps and res.steps >= cfg.max_steps:
            break
        if lp.checkpoint_dir is not None and (why := lp.due(res.steps)):
            res.clock(spent, lp.here)
            lp.checkpoint()
            lp.log({"checkpoint": res.steps, "epoch": res.epoch, "why": why})
            t0, spent, seen = time.perf_counter(), 0.0, lp.requests.continued
        if lp.requests.stopping:
            stop(lp, f"step {res.steps}")
    res.clock(spent, lp.here)


def final_metrics(res: TrainResult, tasks) -> dict:
    """The selected epoch's dev (and held-out) metrics, as the trackers' run summary."""
    out = {f"final/dev/{t}/{k}": float(v) for t, m in res.best_metrics.items() for k, v in m.items()}
    out.update({f"final/heldout/{t}/{k}": float(v) for t, m in res.best_heldout.items() for k, v in m.items()})
    if res.best_metrics:
        out["final/dev/main"] = main_value(res.best_metrics, tasks)
        out["final/best_epoch"] = float(res.best_epoch)
    return out


def score_epoch(model, dev_sets, heldout_sets, tasks, collate, cfg: TrainConfig, res: TrainResult, best_state,
                higher, log):
    """Score dev (and the held-out slices), record both with every example's prediction (and
    what the method's modules report about dev, e.g. fusion attention per layer), and keep the
    weights if the selection value is the best so far (`last`: always)."""
    recorders = [m for m in model.modules() if hasattr(m, "start_recording")]
    for m in recorders:
        m.start_recording()
    dev, dev_preds = evaluate(model, dev_sets, tasks, collate, cfg.eval_batch_size, cfg.precision)
    extra = {}
    for i, m in enumerate(recorders):
        extra.update({f"site{i}/{k}": v for k, v in m.stop_recording().items()})
    held, held_preds = (evaluate(model, heldout_sets, tasks, collate, cfg.eval_batch_size, cfg.precision)
                        if heldout_sets else ({}, {}))
    record = {"epoch": res.epoch, "main": main_value(dev, tasks), "dev": dev}
    if held:
        record.update(heldout=held, heldout_main=main_value(held, tasks))
    value = record["heldout_main"] if cfg.selection == "heldout" else record["main"]
    res.history.append(record)
    res.predictions.append({"epoch": res.epoch, **{split: {t.name: compact(preds[t.name], t.regression) for t in tasks}
                                                   for split, preds in (("dev", dev_preds), ("heldout", held_preds))
                                                   if preds}})
    log({**record, "step": res.steps, "selection": cfg.selection, **({"modules": extra} if extra else {})})
    if cfg.selection == "last" or is_better(value, res.best_value, higher):
        res.best_value, res.best_epoch, res.stale = value, res.epoch, 0
        res.best_metrics, res.best_heldout = dev, held
        return trainable_snapshot(model)
    res.stale += 1
    return best_state


def scored_epoch(epoch: int, steps: int, cfg: TrainConfig) -> bool:
    """train.eval_every: dev is scored after every N-th epoch and after the last one."""
    last = epoch + 1 >= cfg.epochs or bool(cfg.max_steps and steps >= cfg.max_steps)
    return last or (epoch + 1) % cfg.eval_every == 0


def train_step(model, plain, batches: list[dict], optimizer, scheduler, accelerator, cfg: TrainConfig, step: int):
    """One optimizer step over this process's batch, given as one or more parts (`split_batch`)
    whose gradients add up (processes synchronise on the last part only); returns (this
    process's loss, gradient norm before clipping)."""
    total = 0.0
    for j, batch in enumerate(batches):
        with accelerator.no_sync(model) if j < len(batches) - 1 else contextlib.nullcontext():
            with autocast(cfg.precision, accelerator.device):
                out = model(**batch)
            loss = plain.loss(out, batch["labels"], batch["weights"])
            if not math.isfinite(loss.item()):
                raise UserError(f"loss became {loss.item()} at step {step + 1}: lower train.lr "
                                f"(now {cfg.lr}) or check the labels")
            accelerator.backward(loss)
        total += loss.item()
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, float(norm)


