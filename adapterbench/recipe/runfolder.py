"""Run folders: `runs/<stage>/<method>/<task>/<model>-s<seed>-<hash>/`, self-describing.

config.yaml (resolved), task.yaml (the task spec used), env.json, log.jsonl, the weights
folder, and metrics.json whose `status` is `running`, `ok` or `failed`. Every file is
written atomically (temp file + rename), so a file is either complete or absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import yaml

from adapterbench.config import StrictLoader, config_hash
from adapterbench.errors import UserError
from adapterbench.fileio import (
    TEMP_NAME,
    _disk_error,
    atomic_write,
    checkpoint_entry,
    is_main_process,
    remove_checkpoints,
    slug,
    write_json,
)
from adapterbench.records import seal, status_of


def run_path(out_dir: str, stage: str, method: str, task: str, model: str, seed: int, h: str) -> Path:
    return Path(out_dir) / stage / method / slug(task) / f"{slug(model)}-s{seed}-{h}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform says), or 'CPU'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or "CPU"
    except OSError:
        pass
    return platform.processor() or "CPU"


def machine_name(device) -> str:
    """What a run's training time was measured on, in a few words: a GPU's name, or a CPU's
    model, the instruction set torch uses on it and its torch threads ('AMD EPYC (AVX2, 1
    thread)'). Times from two machines do not compare; runs record each machine's share of
    their training time (metrics.json `machine_seconds`), and the report names them."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    n = torch.get_num_threads()
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {n} thread{'s' if n != 1 else ''})"


def environment() -> dict:
    import torch
    versions = {}
    for pkg in ("adapterbench", "torch", "transformers", "datasets", "accelerate", "safetensors",
                "scikit-learn", "scipy", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": git_commit(), "device": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "machine": machine_name("cuda" if torch.cuda.is_available() else "cpu"),
            "cpu_count": os.cpu_count(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Run:
    """One run folder being written (by the main process only; other ranks get a reader)."""

    def __init__(self, folder: Path, writer: bool = True):
        self.folder = Path(folder)
        self.resumed = False
        self.writer = writer

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoint"

    @classmethod
    def create(cls, folder: Path, resolved: dict, tasks: list, force: bool, identity: dict | None = None) -> "Run":
        folder = Path(folder)
        if not is_main_process():
            run = cls(folder, writer=False)
            run.resumed = resumable(folder, resolved) and not force
            return run
        if folder.exists():
            if status_of(folder) == "ok" and not force:
                raise RunExists(folder)
            if not force and resumable(folder, resolved):
                run = cls(folder)
                run.resumed = True
                write_json(folder / "metrics.json", {"status": "running", "started": time.time(), "resumed": True})
                return run
            clear_run_folder(folder)  # a failed attempt without a checkpoint, or --force
        folder.mkdir(parents=True)
        run = cls(folder)
        atomic_write(folder / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        specs = [{k: v for k, v in asdict(t).items() if k != "include"} for t in tasks]
        if len(specs) == 1:
            atomic_write(folder / "task.yaml", yaml.safe_dump(specs[0], sort_keys=False))
        else:   # a multi-task run: one spec per task, in task-id order
            for i, spec in enumerate(specs):
                atomic_write(folder / "tasks" / f"{i}.yaml", yaml.safe_dump(spec, sort_keys=False))
        write_json(folder / "env.json", environment())
        if identity is not None:
            write_json(folder / "identity.json", identity)
        write_json(folder / "metrics.json", {"status": "running", "started": time.time()})
        return run

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        try:
            with open(self.folder / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:   # full disk, read-only folder: one line, the run stops
            raise _disk_error(e, self.folder / "log.jsonl") from None

    def finish(self, metrics: dict) -> None:
        """Mark the run ok (last, once every other file is complete); drop its checkpoint."""
        if not self.writer:
            return
        write_json(self.folder / "metrics.json", {"status": "ok", **metrics, "sealed": seal(self.folder)})
        remove_checkpoints(self.checkpoint_dir)

    def fail(self, error: BaseException) -> None:
        if not self.writer:
            return
        # Ctrl-C, or a SLURM worker preempted / out of time (submitit exits after requeueing it):
        # the run resumes from its checkpoint, it did not fail
        kind = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        try:
            write_json(self.folder / "metrics.json", {"status": kind, "error": f"{type(error).__name__}: {error}"})
        except (UserError, OSError):
            pass  # e.g. the disk is full: the status stays `running`, never `ok`


# What adapterbench (and the trackers it starts) write into a run folder, at every depth, as
# paths inside the folder. A weights folder holds the method's files (`<method>/<name>.safetensors`,
# `<name>_config[-<task>].json`, sources.json, tasks.json), MT-A's per-task adapters and its
# unwrapped base model (written whole by save_pretrained); tracking/ holds TensorBoard's event files
# and its hparams folders; wandb/ W&B's run folders and the links to them. Anything else is a
# user's, and clearing the folder stops before deleting anything.
_WEIGHTS = r"(?:adapter|model|fusion|multitask)"
_OWN_FILE = r"[^/]+\.safetensors|[^/]*_config(?:-[^/]+)?\.json|sources\.json|tasks\.json"
RUN_LAYOUT = re.compile("|".join([
    r"config\.yaml|task\.yaml|env\.json|identity\.json|log\.jsonl|metrics\.json|epoch_predictions\.json",
    r"attention\.(?:csv|png)|eval_(?:dev|test)\.json",
    r"tasks|tasks/\d+\.yaml",
    r"predictions|predictions/[^/]+\.tsv",
    rf"{_WEIGHTS}|{_WEIGHTS}/(?:{_OWN_FILE})",
    r"multitask/adapters(?:/[^/]+(?:/(?:adapter\.safetensors|adapter_config\.json))?)?",
    r"multitask/base_model(?:/.*)?",
    r"tracking|tracking/events\.out\.tfevents\.[^/]+|tracking/\d+(?:\.\d+)?(?:/(?:hparams\.yml|events\.out\.tfevents\.[^/]+))?",
    r"wandb|wandb/(?:debug|debug-internal)\.log|wandb/latest-run|wandb/(?:offline-)?run-[^/]+(?:/.*)?",
    r"checkpoint",
]))

def written_by_us(inside: str) -> bool:
    """Whether a path inside a run folder ('adapter/head.safetensors') is one adapterbench or its
    trackers write (RUN_LAYOUT), or a temporary file of an interrupted write."""
    return bool(RUN_LAYOUT.fullmatch(inside) or TEMP_NAME.match(inside.rsplit("/", 1)[-1]))


def foreign_files(folder: Path) -> list[str]:
    """The paths inside a run folder, at every depth, that adapterbench did not write; links are
    looked at, never followed (checkpoint/ is looked at in its target: its own rule)."""
    out = []
    for path in sorted(folder.rglob("*")):   # rglob does not descend into linked folders
        inside = path.relative_to(folder).as_posix()
        if inside.startswith("checkpoint/") or written_by_us(inside):
            continue
        if not any(inside.startswith(f + "/") for f in out):    # a foreign folder is named once, not its files
            out.append(inside)
    checkpoint = folder / "checkpoint"
    if checkpoint.is_dir():
        out += [f"checkpoint/{p.name}" for p in sorted(checkpoint.resolve().iterdir()) if not checkpoint_entry(p.name)]
    return out


def clear_run_folder(folder: Path) -> None:
    """Remove an unfinished or failed run folder before training it again, only when it holds
    nothing but what adapterbench writes, at every depth (RUN_LAYOUT: its files, its trackers',
    temporary files, checkpoints); otherwise one line naming what is in the way, and nothing is
    deleted. Links are removed as links: a checkpoint/ on a scratch disk loses only its
    checkpoints there."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UserError(f"{folder} is a link to {folder.resolve()}: adapterbench does not clear a run folder "
                        f"through a link; remove the link or choose another --out")
    foreign = foreign_files(folder)
    if foreign:
        raise UserError(f"{folder} holds files adapterbench did not write ({', '.join(foreign[:3])}): move them "
                        f"out or choose another --out; the folder is left as it is")
    remove_checkpoints(folder / "checkpoint")
    for item in folder.iterdir():
        if item.is_symlink() or not item.is_dir():
            item.unlink()
        else:
            shutil.rmtree(item)
    folder.rmdir()


def resumable(folder: Path, resolved: dict) -> bool:
    """An unfinished run with a complete checkpoint whose config computes the same run: the same
    config hash, so keys that never change a result (checkpoint_every/_minutes, log_with) may
    differ and keys added since it started may be missing (its config.yaml stays as written)."""
    if not (folder / "checkpoint" / "latest.json").is_file():
        return False
    try:
        stored = yaml.load((folder / "config.yaml").read_text(), Loader=StrictLoader)  # noqa: S506
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(stored, dict) and config_hash(stored) == config_hash(resolved)


class RunExists(Exception):
    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder




@contextlib.contextmanager
def in_use(folder: Path, shared: bool = False):
    """Hold a run folder for one command: training holds it alone, `evaluate` shares it with
    other readers; a second command on the same folder stops with one line instead of two
    writers interleaving. The lock (flock on a file named by the folder's path under the cache
    folder: nothing is added to the runs tree) ends with the process, so a crash never leaves
    the folder held; other ranks of a multi-process run pass."""
    if not is_main_process():
        yield
        return
    import hashlib

    from adapterbench.data import cache_root
    locks = cache_root() / "busy"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder} is in use by another adapterbench command ({'training' if shared else 'training or evaluating'}"
                        f" it): wait for that command to end, then run this one again") from None
    try:
        yield
    finally:
        os.close(fd)
