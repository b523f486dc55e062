"""Full fine-tuning: every encoder weight and the head are trained (the "Full" column)."""

from dataclasses import dataclass

from adapterbench.errors import UserError
from adapterbench.methods.contract import Artifact

KIND = "model"
STAGE = "finetune"
ARTIFACT = Artifact("model", "model_config.json", "model.safetensors", optional=True)
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.1}  # BERT's GLUE recipe
IDENTITY_AT_INIT = None  # inserts nothing


@dataclass
class Config:
    name: str = "full"


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    encoder.requires_grad_(True)


def trainable_state(encoder, cfg: Config, names: list[str]) -> dict:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def load_state(encoder, cfg: Config, names: list[str], state: dict) -> None:
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(f"model weights do not match the base model ('{key}' "
                        f"{'missing' if missing else 'unexpected'}): the run used another model")
