"""Where a study's workers run: in this process (the default), through submitit's local
executor, or as a SLURM job array through submitit (no hand-written sbatch scripts).

Every worker is the same `StudyWorker`: it plans the study and takes runs through the lock
files until nothing is left, so any number of workers on any number of nodes share one study
folder. A worker that SLURM preempts or whose time limit comes is requeued by submitit (its
`checkpoint` hook); its run resumes from the run's own checkpoint, and its lock, without a
heartbeat, is taken over."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from adapterbench.errors import UserError

LAUNCHERS = ("local", "submitit-local", "slurm")


@dataclass
class Resources:
    workers: int = 1                  # array size: how many workers take runs
    array_parallelism: int = 0        # SLURM: at most this many at once (0: all)
    partition: str | None = None
    time_min: int | None = None       # per worker (requeued when it runs out); None: the partition's limit
    cpus: int = 1                     # per worker
    gpus: int = 0                     # per worker (each run uses them through accelerate)
    mem_gb: float = 0.0               # per worker; 0: the partition's default
    extra: dict = field(default_factory=dict)   # any other sbatch option, e.g. {"qos": "high"}


class StudyWorker:
    """One study worker (a submitit job): runs of the study until nothing is left."""

    def __init__(self, study_path: str, out_dir: str, data_dir: str | None, retry_failed: bool,
                 only: list[str] | None):
        self.study_path, self.out_dir, self.data_dir = study_path, out_dir, data_dir
        self.retry_failed, self.only = retry_failed, only

    def __call__(self, worker: int = 0) -> dict:
        from adapterbench.methods import METHODS
        from adapterbench.methods.plugins import register_from_env
        from adapterbench.study import plan as S
        from adapterbench.study.execute import execute
        register_from_env(METHODS)     # the plug-ins the submitting command named (ADAPTERBENCH_PLUGINS)
        st = S.load_study(self.study_path)
        st.out_dir = self.out_dir
        if self.data_dir:
            st.defaults = {**st.defaults, "data": {**st.defaults.get("data", {}), "data_dir": self.data_dir}}
        nodes = S.plan(st)
        keep = S.selected(nodes, self.only) if self.only else None
        say = lambda node, what: print(f"#{node.index} {node.stage} {node.label} {node.task} s{node.seed}: {what}",
                                       flush=True)
        res = execute(st, nodes, retry_failed=self.retry_failed, on_event=say, only=keep)
        return {k: len(v) for k, v in res.items()}

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or timeout: requeue the same worker."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def executor(launcher: str, folder: Path, res: Resources):
    import submitit
    if launcher not in ("submitit-local", "slurm"):
        raise UserError(f"--launcher '{launcher}' must be one of {', '.join(LAUNCHERS)}")
    ex = submitit.AutoExecutor(folder=str(folder), cluster="local" if launcher == "submitit-local" else "slurm")
    params = {"timeout_min": res.time_min, "cpus_per_task": res.cpus, "name": "adapterbench"}
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if launcher == "slurm":
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.array_parallelism:
            params["slurm_array_parallelism"] = res.array_parallelism
        if res.extra:
            params["slurm_additional_parameters"] = dict(res.extra)
    ex.update_parameters(**params)
    return ex


def submit(launcher: str, worker: StudyWorker, res: Resources, out_dir: Path) -> tuple[list, Path]:
    """Submit `res.workers` workers; record the job ids and log folder in <out_dir>/launch.json."""
    res = replace(res, time_min=time_limit(launcher, res.partition, res.time_min))
    if res.workers < 1 or res.cpus < 1 or res.time_min < 1 or res.gpus < 0 or res.mem_gb < 0:
        raise UserError("--workers, --cpus-per-worker and --time must be at least 1; --gpus-per-worker and --mem "
                        "0 or more")
    if launcher == "slurm":
        import shutil
        if shutil.which("sbatch") is None:
            raise UserError("--launcher slurm needs SLURM's sbatch on PATH: run it on a cluster's login node "
                            "(or install slurm-wlm and munge for a one-node SLURM), or use --launcher local")
    logs = private_folder(Path(out_dir) / "slurm" if launcher == "slurm" else Path(out_dir) / "submitit")
    ex = executor(launcher, logs, res)
    try:
        jobs = ex.map_array(worker, list(range(res.workers)))
    except Exception as e:     # sbatch refused it: a partition, GPUs or memory it does not have
        said = next((line.strip() for line in str(e).splitlines() if "error" in line.lower()), str(e).strip()[:200])
        raise UserError(f"{launcher} did not take the job: {said}; check --partition, --gpus-per-worker, --mem "
                        f"and --time against `sinfo`") from None
    record = {"launcher": launcher, "jobs": [j.job_id for j in jobs], "log_folder": str(logs.resolve()),
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resources": asdict(res)}
    from adapterbench.fileio import read_json, write_json
    path = Path(out_dir) / "launch.json"
    history = read_json(path)["history"] if path.is_file() else []
    write_json(path, {**record, "history": history + [record]})
    return jobs, logs


def private_folder(folder: Path) -> Path:
    """submitit's folder (the pickled jobs and results the launcher unpickles): created owner-only
    (0700) inside a study folder that may be shared group-writable, and refused when another
    user owns it or could have written into it, so a swapped pickle never runs code here."""
    import os
    import stat
    folder.mkdir(parents=True, exist_ok=True)
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        raise UserError(f"{folder} is not a folder of yours (a link, or owned by another user): the launcher "
                        f"keeps pickled jobs there; remove it or choose another --out")
    if st.st_mode & 0o077:       # others could enter it (made by an earlier version): trust nothing they could write
        for item in folder.rglob("*"):
            mode = item.lstat()
            if mode.st_uid != os.getuid() or stat.S_ISLNK(mode.st_mode) or mode.st_mode & 0o022:
                raise UserError(f"{item} in the launcher's folder is not yours alone (another owner, a link, or "
                                f"writable by others): remove {folder} (it holds only job state) and submit again")
    os.chmod(folder, 0o700)
    return folder


def time_limit(launcher: str, partition: str | None, asked: int | None) -> int:
    """Minutes per worker: what was asked, checked against the partition's limit (a job asking more
    pends forever), or that limit when nothing was asked (24 h where there is none, or no SLURM)."""
    limit = partition_minutes(partition) if launcher == "slurm" else None
    if asked is None:
        return limit or 24 * 60
    if limit and asked > limit:
        raise UserError(f"--time {asked} is more than the {limit} minutes partition "
                        f"{partition or '(the default)'} allows: a job asking more would never start; "
                        f"give --time {limit} or less (a worker that runs out is requeued)")
    return asked


def partition_minutes(partition: str | None) -> int | None:
    """A SLURM partition's time limit in minutes (`sinfo`; the default partition when None);
    None when it has none or sinfo cannot say."""
    import subprocess
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, limit = line.strip().partition(" ")
        if (partition is None and name.endswith("*")) or name.rstrip("*") == partition:
            return slurm_minutes(limit.strip())
    if partition is not None and out.strip():
        known = ", ".join(sorted({line.split()[0].rstrip("*") for line in out.splitlines() if line.strip()}))
        raise UserError(f"--partition {partition} is not a SLURM partition here (sinfo shows: {known})")
    return None


def slurm_minutes(text: str) -> int | None:
    """SLURM's time format ('infinite', 'D-HH:MM:SS', 'HH:MM:SS', 'MM:SS', 'MM') in minutes."""
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 24 * 60 + h * 60 + m + (1 if sec else 0)


def job_states(jobs: list[str]) -> dict[str, str]:
    """SLURM's word on recorded jobs (`squeue`): 'RUNNING', 'PENDING (Resources)', ...; a job
    squeue no longer lists is absent (finished, cancelled or purged); {} without SLURM."""
    import subprocess
    ids = sorted({j.split("_")[0] for j in jobs})
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, state, reason = (line.split(None, 2) + ["", ""])[:3]
        states[job] = state + (f" ({reason})" if reason and reason != "None" else "")
    return states


def parse_params(pairs: list[str]) -> dict:
    """--slurm-param key=value (repeatable) -> {key: value} for sbatch."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm-param '{p}' must be key=value (an sbatch option without its dashes)")
        out[key] = value
    return out


def wait(jobs: list) -> list[dict]:
    """Wait for every job; their results (per-worker counts), or one line naming a failed job."""
    out = []
    for j in jobs:
        try:
            out.append(j.result())
        except Exception as e:
            raise UserError(f"worker job {j.job_id} failed ({type(e).__name__}); its log: {j.paths.stderr}") from None
    return out


def summary(results: list[dict]) -> str:
    return json.dumps(results)
