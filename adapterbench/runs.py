"""Run folders: `runs/<stage>/<method>/<task>/<model>-s<seed>-<hash>/`, self-describing.

config.yaml (resolved), task.yaml (the task spec used), env.json, log.jsonl, the weights
folder, and metrics.json whose `status` is `running`, `ok` or `failed`. Every file is
written atomically (temp file + rename), so a file is either complete or absent.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import yaml

from .config import config_hash
from .errors import UserError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _disk_error(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600: files a colleague reads follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _disk_error(e, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_error(e: OSError, path: Path) -> Exception:
    """Disk full / quota / read-only: one line; the previous version of the file is untouched."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return UserError(f"cannot write {path} ({os.strerror(e.errno)}): free space or fix permissions and "
                         f"rerun; files written before are intact")
    return e


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: is this a run folder?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}): the file is corrupted") from None


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save
    blob = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, blob)


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise UserError(f"weights file {path} is missing: the run did not finish or the folder was changed")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is corrupted ({str(e)[:100]}): rerun the stage") from None


def prepare_out(out: Path, force: bool = False, create: bool = True) -> Path:
    """An output folder for export/import/merge: created if absent; a folder that already holds
    files is refused (one line naming it) unless `force`, which replaces only the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise UserError(f"{out} is not empty ({shown}...): choose a new --out, or pass --force to overwrite "
                        f"the files this command writes there (others are kept)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def staged(fn):
    """Decorator for commands that write an output folder (`out` and `force` arguments): the
    folder is written as a hidden temporary sibling and moved into place only when the command
    completes, so a failure (a bad file, a full disk) leaves no folder that looks finished and
    the rerun the error recommends is not refused. A non-empty `out` is refused unless `force`."""
    import functools
    import inspect
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out = prepare_out(Path(bound.arguments["out"]), bound.arguments.get("force", False), create=False)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bound.arguments["out"] = tmp
        try:
            fn(*bound.args, **bound.kwargs)
            if not out.exists():
                os.rename(tmp, out)          # complete: into place in one step
                return out
            for item in tmp.iterdir():
                if (out / item.name).is_dir():
                    shutil.rmtree(out / item.name)
                os.replace(item, out / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    return wrapper


def slug(text: str) -> str:
    base = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"


def run_path(out_dir: str, stage: str, method: str, task: str, model: str, seed: int, h: str) -> Path:
    return Path(out_dir) / stage / method / slug(task) / f"{slug(model)}-s{seed}-{h}"


def status_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metrics.json").read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


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


def is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch` / `torchrun`: they train, rank 0 writes."""
    return int(os.environ.get("RANK", "0")) == 0


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
        write_json(self.folder / "metrics.json", {"status": "ok", **metrics})
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

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


# what adapterbench writes into a run folder; a folder holding anything else is not deleted
RUN_FILES = {"config.yaml", "task.yaml", "tasks", "env.json", "identity.json", "log.jsonl", "metrics.json",
             "checkpoint", "adapter", "model", "fusion", "multitask", "tracking", "predictions", "attention.csv",
             "attention.png", "eval_dev.json", "eval_test.json", "epoch_predictions.json",
             "wandb"}


def clear_run_folder(folder: Path) -> None:
    """Remove an unfinished or failed run folder before training it again, only when it holds
    nothing but what adapterbench writes; otherwise one line naming what is in the way."""
    foreign = sorted(p.name for p in Path(folder).iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
    if foreign:
        raise UserError(f"{folder} holds files adapterbench did not write ({', '.join(foreign[:3])}): move them "
                        f"out or choose another --out; the folder is left as it is")
    shutil.rmtree(folder)


def task_results(metrics: dict) -> dict:
    """{task: {"dev", "main_metric", "main_value"}} of any run's metrics.json, also of folders
    written before every run had per-task metrics (single-task `metrics.dev`)."""
    if "tasks" in metrics:
        return metrics["tasks"]
    dev = metrics.get("metrics", {}).get("dev", {})
    return {metrics.get("task", "task"): {"dev": dev, "main_metric": metrics.get("main_metric"),
                                          "main_value": metrics.get("main_value")}}


def resumable(folder: Path, resolved: dict) -> bool:
    """An unfinished run with a complete checkpoint whose config computes the same run: the same
    config hash, so keys that never change a result (checkpoint_every/_minutes, log_with) may
    differ and keys added since it started may be missing (its config.yaml stays as written)."""
    if not (folder / "checkpoint" / "latest.json").is_file():
        return False
    try:
        stored = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(stored, dict) and config_hash(stored) == config_hash(resolved)


class RunExists(Exception):
    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder


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
    try:   # a folder without a readable config.yaml still reports its scores
        config = yaml.safe_load((folder / "config.yaml").read_text())
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


def relative_to(value, bases: tuple[Path, ...]):
    """`value` (a record: dicts, lists, strings) with every absolute path inside one of `bases`
    written relative to it, so that an archive names no machine's folders; `find_from` still
    finds them from any run folder below the base."""
    if isinstance(value, dict):
        return {k: relative_to(v, bases) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to(v, bases) for v in value]
    if isinstance(value, str):
        base = next((str(b) for b in bases if value.startswith(f"{b}{os.sep}")), None)
        return value[len(base) + 1:] if base else value
    return value


def write_archive(root: Path, out: Path, replace: bool = False) -> tuple[int, int]:
    """Every finished run under `root` as one JSON line each, in a stable order. An existing
    archive at `out` is updated, not overwritten: its lines for runs `root` does not hold (a
    study folder that was lost or moved, runs archived from another machine) are kept, and a run
    in both is written from `root`. `replace` writes `root`'s runs alone. Returns (runs from
    `root`, lines kept). Paths inside the study are written relative to the folder above `root`
    ('reproduce_full/...')."""
    bases = (Path(root).absolute().parent, Path(root).resolve().parent)   # as configs wrote it, or resolved
    folders = list(iter_runs(root))
    if not folders:
        raise UserError(f"no run folder under {root} (none holds a metrics.json): pass the folder a study "
                        f"or stage wrote, e.g. runs/<study>")
    fresh = {archive_key(r): json.dumps(relative_to(r, bases), sort_keys=True, default=str)
             for r in map(archive_record, folders) if r}
    if replace and not fresh and Path(out).is_file() and Path(out).read_text().strip():
        raise UserError(f"--replace would empty {out}: {root} has no finished run yet; leave out --replace, "
                        f"or pass the folder whose runs should replace the archive's")
    kept = {} if replace else {k: line for k, line in read_archive_lines(out).items() if k not in fresh}
    atomic_write(out, "".join(line + "\n" for line in sorted([*fresh.values(), *kept.values()])))
    return len(fresh), len(kept)


def archive_key(record: dict) -> tuple:
    """What makes two archive lines the same run: its row label and its folder name (model,
    seed and config hash)."""
    return record.get("label") or record.get("method"), record.get("run")


def read_archive_lines(path: Path, key=archive_key, fix: str = "pass --replace to write only this folder's runs"
                       ) -> dict[tuple, str]:
    """An archive's lines by `key` (`archive_key`; none when the file does not exist yet); a bad
    line is named, with `fix` as the way out."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i}: not valid JSON ({e.msg}): mend or delete that line, or "
                            f"{fix}") from None
        if not isinstance(record, dict) or "run" not in record:
            raise UserError(f"{path} line {i}: not an archive record (no 'run'): is {path} an archive? "
                            f"Name another file, or {fix}")
        out[key(record)] = line
    return out
