"""Multi-task baseline: one shared encoder, fully fine-tuned on all tasks, one head per
task (the multi-task row of the AdapterFusion comparison)."""

from dataclasses import dataclass

from adapterbench.errors import UserError
from adapterbench.methods.contract import Artifact
from adapterbench.methods.full import load_state, trainable_state  # noqa: F401  (the whole encoder is saved)
from adapterbench.models import arch_of, get_sub

KIND = "multitask"
STAGE = "multitask"
ARTIFACT = Artifact("multitask", "multitask_config.json", "encoder.safetensors")
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.1}
IDENTITY_AT_INIT = None  # inserts nothing


@dataclass
class Config:
    name: str = "mtl"
    freeze_layers: int | None = None   # None: all trains; else as CA-MTL's: the embeddings and layers
                                       # 0..n-1 frozen, -1 the lower half (a control for CA-MTL's freezing)


def frozen_layers(value: int, n: int) -> int:
    """How many of `n` layers a `method.freeze_layers` value freezes (-1: the lower half, the rule
    of CA-MTL's reference code); out of range is one line."""
    freeze = n // 2 if value < 0 else value
    if not 0 <= freeze <= n:
        raise UserError(f"method.freeze_layers {value} must be between 0 and {n} (or -1)")
    return freeze


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    encoder.requires_grad_(True)
    if cfg.freeze_layers is not None:
        layers = get_sub(encoder, arch_of(encoder).layers)
        encoder.embeddings.requires_grad_(False)
        for layer in layers[:frozen_layers(cfg.freeze_layers, len(layers))]:
            layer.requires_grad_(False)
