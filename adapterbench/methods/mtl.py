"""Multi-task baseline: one shared encoder, fully fine-tuned on all tasks, one head per
task (the multi-task row of the AdapterFusion comparison)."""

from dataclasses import dataclass

from .contract import Artifact
from .full import load_state, trainable_state  # noqa: F401  (the whole encoder is saved)

KIND = "multitask"
STAGE = "multitask"
ARTIFACT = Artifact("multitask", "multitask_config.json", "encoder.safetensors")
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.1}
IDENTITY_AT_INIT = None  # inserts nothing


@dataclass
class Config:
    name: str = "mtl"


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    encoder.requires_grad_(True)
