"""Checkpoints of the training loop: where it is (`TrainResult`), the trainable weights, the
optimizer, scheduler, RNG and batch-source state, written on a schedule or when SIGUSR1/SIGTERM
asks (`CheckpointRequests`), and restored so a resumed run ends where an unbroken one would."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterbench.errors import UserError


@dataclass
class TrainResult:
    """Where the loop is (a checkpoint stores this) and what it found."""
    epoch: int = 0                 # current epoch
    steps: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    history: list = field(default_factory=list)   # [{"epoch", "main", "dev": {task: metrics}}]
    best_value: float | None = None
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)   # {task: dev metrics} of the epoch selection chose
    best_heldout: dict = field(default_factory=dict)   # {task: held-out metrics} of that epoch
    predictions: list = field(default_factory=list)    # per scored epoch: {"epoch", split: {task: [per example]}}
    stale: int = 0                 # scorings since the best one
    machine_seconds: dict = field(default_factory=dict)   # train_seconds per machine (`runs.machine_name`)
    earlier_wall_seconds: float = 0.0   # wall time of the legs before this one, to the checkpoint resumed from

    def __post_init__(self):
        if self.train_seconds and not self.machine_seconds:   # a checkpoint from before machines were recorded
            self.machine_seconds = {"not recorded": self.train_seconds}

    def clock(self, seconds: float, machine: str) -> None:
        """Count training time, and which machine spent it (a run resumed elsewhere has two)."""
        self.train_seconds += seconds
        self.machine_seconds[machine] = self.machine_seconds.get(machine, 0.0) + seconds

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


class Stopped(KeyboardInterrupt):
    """SIGTERM stopped training at a step boundary, after a checkpoint: the run is interrupted
    (resumable), not failed."""

    @classmethod
    def after(cls, where: str, checkpointed: bool, why: str = "SIGTERM") -> "Stopped":
        return cls(f"{why}: stopped after {where}" + (", checkpointed; the same command resumes"
                                                      if checkpointed else ""))


class CheckpointRequests:
    """When the loop owes a mid-epoch checkpoint: every `every` steps, every `minutes` minutes
    since the last checkpoint, or once after SIGUSR1; and whether a signal asked it to stop
    (`stopping`: checkpoint at the next step boundary, then stop). SIGTERM stops a run nothing
    else handles (a second SIGTERM ends the process at once). A handler someone else installed
    for SIGTERM or SIGUSR2 (submitit's: requeue on preemption or a time limit) is deferred, not
    replaced: the loop first checkpoints at the current step, then `hand_over` calls it, so a
    preempted run loses nothing. Signals are caught while the loop runs, in the main thread, and
    only in a one-process run (`catch_term`: ranks that stop one by one would leave the others
    waiting in a collective). The previous handlers come back afterwards. `due(step)` says why a
    checkpoint is owed, or ''. `continued` counts SIGCONTs: the process was stopped (SIGSTOP,
    Ctrl-Z; a worker paused while something else takes the cores) and goes on, so the step that
    was under way is not timed by the clock (`train_epoch`)."""

    def __init__(self, every: int = 0, minutes: float = 0.0, catch_term: bool = True):
        self.every, self.minutes, self.catch_term = every, minutes, catch_term
        self.last = time.monotonic()
        self.signalled = self.stopping = False
        self.why = ""
        self.continued = 0
        self.previous: dict = {}
        self.deferred: list = []          # (handler, signum, frame) to call once the checkpoint is written

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if hasattr(signal, "SIGUSR1"):
                self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._ask)
            if hasattr(signal, "SIGCONT"):
                self.previous[signal.SIGCONT] = signal.signal(signal.SIGCONT, self._continued)
            if self.catch_term:
                for signum in (signal.SIGTERM, getattr(signal, "SIGUSR2", None)):
                    current = signum and signal.getsignal(signum)
                    if signum == signal.SIGTERM and current is signal.SIG_DFL:
                        self.previous[signum] = signal.signal(signum, self._stop)
                    elif callable(current):
                        self.previous[signum] = signal.signal(signum, self._defer)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _ask(self, signum, frame):
        self.signalled = True

    def _continued(self, signum, frame):
        self.continued += 1
        if callable(self.previous.get(signum)):
            self.previous[signum](signum, frame)

    def _stop(self, signum, frame):
        self.stopping, self.why = True, signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _defer(self, signum, frame):
        self.stopping, self.why = True, signal.Signals(signum).name
        self.deferred.append((self.previous[signum], signum, frame))

    def hand_over(self) -> None:
        """After the stopping checkpoint: give the deferred signals to their own handlers
        (submitit requeues the job and exits here); returns when there were none."""
        waiting, self.deferred = self.deferred, []
        self.__exit__()
        for handler, signum, frame in waiting:
            handler(signum, frame)

    def due(self, step: int) -> str:
        return (self.why if self.stopping else "SIGUSR1" if self.signalled else
                f"every {self.every} steps" if self.every and step % self.every == 0 else
                f"every {self.minutes:g} min" if self.minutes and time.monotonic() - self.last >= 60 * self.minutes
                else "")

    def reset(self) -> None:
        """A checkpoint was written (mid-epoch or at an epoch's end): count from now."""
        self.signalled, self.last = False, time.monotonic()


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
# <run>/checkpoint/step-N-eE/ holds weights.safetensors (trainable weights), best.safetensors,
# optim.pt (optimizer, scheduler, rank 0's generators, the batch source's position), state.json
# and, in a run of several processes, rng-rank<R>.pt for every other rank; latest.json names the
# newest complete one and is written last, atomically, so a kill at any moment leaves a usable one.

def save_checkpoint(root: Path, accelerator, model, optimizer, scheduler, state: dict, best_state,
                    extra: dict | None = None) -> None:
    """Write a complete checkpoint, then point latest.json at it. Rank 0 writes the weights and
    the optimizer; every other rank writes its own generators (`rng-rank<R>.pt`: each rank draws
    its own dropout masks), and latest.json is written only after every rank has written."""
    from adapterbench.fileio import (
        atomic_write,
        remove_checkpoints,
        save_tensors,
        write_json,
    )
    name = f"step-{state['steps']}-e{state['epoch']}"
    folder = root / name
    if accelerator.is_main_process:
        save_tensors(folder / "weights.safetensors", trainable_snapshot(model))
        if best_state:
            save_tensors(folder / "best.safetensors", best_state)
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **rng_state(), **(extra or {})}, buf)
        atomic_write(folder / "optim.pt", buf.getvalue())
        write_json(folder / "state.json", state)
    elif accelerator.num_processes > 1:
        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        atomic_write(folder / f"rng-rank{accelerator.process_index}.pt", buf.getvalue())
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()          # every rank's generators are on disk
    if accelerator.is_main_process:
        write_json(root / "latest.json", {"checkpoint": name, "processes": accelerator.num_processes})
        remove_checkpoints(root, keep=name)      # older checkpoints of this run; nothing else there


def load_checkpoint(root: Path, model, optimizer, scheduler, rank: int = 0, processes: int = 1):
    """Restore weights, optimizer, scheduler and this rank's generators (torch, CUDA); returns
    (state, best state, extra). A checkpoint written by another number of processes is refused:
    its ranks' generators would not line up with these."""
    from adapterbench.fileio import load_tensors
    latest = json.loads((root / "latest.json").read_text())
    folder = root / latest["checkpoint"]
    written_by = latest.get("processes", 1)
    if written_by != processes:
        raise UserError(f"checkpoint {folder} was written by {written_by} process(es), this run has {processes}: "
                        f"resume it with {written_by}, or delete {root} to start over")
    restore(model, load_tensors(folder / "weights.safetensors"))
    best = load_tensors(folder / "best.safetensors") if (folder / "best.safetensors").is_file() else None
    try:
        extra = torch.load(folder / "optim.pt", weights_only=True)
        state = json.loads((folder / "state.json").read_text())
        state = {k: v for k, v in state.items() if k in TrainResult.__dataclass_fields__}
        mine = {k: extra.pop(k) for k in ("torch_rng", "cuda_rng") if k in extra}   # rank 0's
        own = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True) if rank else mine
    except Exception as e:
        raise UserError(f"checkpoint {folder} is unreadable ({type(e).__name__}): delete {root} to start over") from None
    if "source" not in extra:
        raise UserError(f"checkpoint {folder} was written by an older adapterbench: delete {root} to start over")
    optimizer.load_state_dict(extra.pop("optimizer"))
    scheduler.load_state_dict(extra.pop("scheduler"))
    torch.set_rng_state(own["torch_rng"])
    restore_cuda_rng(own.get("cuda_rng"))
    return state, best, extra


def rng_state() -> dict:
    """This process's generators: torch's CPU generator and every CUDA device's."""
    return {"torch_rng": torch.get_rng_state(), **cuda_rng()}


def cuda_rng() -> dict:
    """Every CUDA device's generator (dropout on a GPU draws from it), so a resumed run on a GPU
    continues the same draws; {} on a machine without CUDA."""
    return {"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}


def restore_cuda_rng(states: list | None) -> None:
    """Put back what `cuda_rng` saved, when this machine has the same CUDA devices; a checkpoint
    from a CPU (none saved) or another device count leaves the generators as seeded."""
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)
