"""Head only: the encoder stays frozen and only the task head is trained (the "Head"
column of the AdapterFusion table, Pfeiffer et al. 2021, Table 1)."""

from dataclasses import dataclass

KIND = "head"
TRAIN_DEFAULTS = {"lr": 1e-3, "epochs": 10}


@dataclass
class Config:
    name: str = "head"


def apply(encoder, cfg: Config, name: str) -> None:
    encoder.requires_grad_(False)


def trainable_state(encoder, cfg: Config, name: str) -> dict:
    return {}


def load_state(encoder, cfg: Config, name: str, state: dict) -> None:
    return None
