"""Live tracking organised for a comparison (accelerate's trackers, built here).

Every tracker of `train.log_with` sees one run as a researcher would file it: the project is the
study's name (`train.tracker_project`; outside a study `adapterbench`), the run name is the run
folder's name, the group is the row label, the tags are method, task, model and seed, and the
configuration is the whole resolved config, logged once. Each tracker writes inside the run
folder (TensorBoard `tracking/`, W&B `wandb/`) or, for MLflow, into one store for the whole
output root (`sqlite:///<out_dir>/mlflow.db`, unless MLFLOW_TRACKING_URI names another), so a
study's runs are found side by side. When training ends the final dev (and held-out) metrics are
logged as the run's summary; TensorBoard gets them as its hparams table in the run's own event
file (no second, timestamped run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterbench.errors import UserError


@dataclass
class RunInfo:
    """What a tracker files a run under."""
    folder: Path                  # the run folder
    project: str = "adapterbench"
    group: str = ""               # the row label
    tags: dict = field(default_factory=dict)     # method, task, model, seed, stage
    config: dict = field(default_factory=dict)   # the whole resolved config
    store: Path | None = None     # where an MLflow store without MLFLOW_TRACKING_URI goes (the output root)

    @property
    def name(self) -> str:
        return Path(self.folder).name


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {'train.lr': 0.001, ...}; lists and None as text."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def mlflow_uri(info: RunInfo) -> str:
    """The MLflow store: the user's MLFLOW_TRACKING_URI, else an SQLite file in the output root.
    A file store (MLflow 3 refuses it unless told otherwise) is one line naming both ways out."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(info.store or info.folder).resolve() / 'mlflow.db'}"
    is_file_store = uri.startswith("file:") or "://" not in uri
    if is_file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true", "yes"):
        raise UserError(f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 refuses: set "
                        f"MLFLOW_ALLOW_FILE_STORE=true, or use sqlite:///PATH/mlflow.db (or unset it: the "
                        f"runs then go to <out_dir>/mlflow.db)")
    return uri


def build(names: list[str], info: RunInfo) -> list:
    """accelerate tracker objects for `names` (train.log_with), filed as `info` says."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
    tags = {k: str(v) for k, v in info.tags.items()}
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker("tracking", str(info.folder)))
        elif name == "wandb":
            os.environ.setdefault("WANDB_DIR", str(info.folder))   # its cache and settings, not the cwd
            out.append(WandBTracker(info.project, name=info.name, group=info.group or None, dir=str(info.folder),
                                    tags=[f"{k}:{v}" for k, v in tags.items()], config=flat(info.config),
                                    job_type=tags.get("stage")))
        elif name == "mlflow":
            import mlflow
            mlflow.set_tracking_uri(mlflow_uri(info))
            out.append(MLflowTracker(experiment_name=info.project, run_name=info.name,
                                     tags={**tags, "group": info.group}))
        elif name != "none":
            out.append(name)          # any other accelerate tracker, as accelerate builds it
    return out


def start(accelerator, info: RunInfo) -> None:
    """Start the trackers; the configuration goes to each once (W&B took it at init)."""
    try:
        accelerator.init_trackers(info.project)
    except UserError:
        raise
    except Exception as e:   # a tracker that cannot start (a full disk, a refused store) is one line
        raise UserError(f"tracker could not start ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        f"fix it, or train with train.log_with=[none]") from None
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow
            params = flat(info.config)
            items = list(params.items())
            for i in range(0, len(items), 100):           # MLflow takes at most 100 params per call
                mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})


def finish(accelerator, info: RunInfo, final: dict) -> None:
    """Log the final metrics once, as each tracker keeps a run's summary, and close the trackers
    (not accelerator.end_training(): it would end the process group that other ranks still meet)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from torch.utils.tensorboard.summary import hparams
            writer = tracker.writer
            hp = {k: v for k, v in flat(info.config).items() if isinstance(v, (int, float, str, bool))}
            for summary in hparams(hp, final):
                writer._get_file_writer().add_summary(summary)
            for k, v in final.items():
                writer.add_scalar(k, v)
        elif tracker.name == "wandb":
            tracker.run.summary.update(final)
        elif tracker.name == "mlflow":
            import mlflow
            mlflow.log_metrics(final)
        tracker.finish()


def make_accelerator(find_unused: bool = False, trackers: list | None = None, project_dir: Path | None = None):
    """One process, or several under `accelerate launch` / `torchrun` (DDP). `find_unused`:
    multi-task runs, where a head or adapter may get no gradient in some step. `trackers`:
    accelerate trackers (`tracking.build`). Mixed precision is always "no" here: the run's own
    `train.precision` decides autocast (precision.py), so an `accelerate launch --mixed_precision`
    or a saved `accelerate config` can never train a different run under the same identity."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused else []
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=kwargs, log_with=trackers or None,
                       project_dir=str(project_dir) if project_dir and trackers else None, mixed_precision="no")


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio", "none": None}


def check_trackers(log_with: list[str]) -> None:
    """A requested tracker that is unknown or not installed is one line (accelerate only warns)."""
    import importlib.util
    for t in log_with:
        if t not in TRACKERS:
            raise UserError(f"train.log_with '{t}' must be one of {', '.join(TRACKERS)}")
        if TRACKERS[t] and importlib.util.find_spec(TRACKERS[t]) is None:
            raise UserError(f"train.log_with asks for {t}, which is not installed: pip install {TRACKERS[t]} "
                            f"(or train.log_with=[none])")


def scalars(record: dict, prefix: str = "") -> dict:
    """The numbers of a log record, flattened ('dev/rte/accuracy'), for the trackers."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "steps_total"):
            out[f"{prefix}{k}"] = float(v)
    return out
