"""Multi-task baseline: one shared encoder, fully fine-tuned on all tasks, one head per
task (the multi-task row of the AdapterFusion comparison)."""

from dataclasses import dataclass

from ..errors import UserError

KIND = "multitask"
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.1}


@dataclass
class Config:
    name: str = "mtl"


def apply(encoder, cfg: Config, tasks: list[str]) -> None:
    encoder.requires_grad_(True)


def set_tasks(encoder, task_ids) -> None:
    return None


def trainable_state(encoder, cfg: Config, tasks) -> dict:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def load_state(encoder, cfg: Config, tasks, state: dict) -> None:
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights do not match the model ({(missing or unexpected)[0]}): the run used another model")
