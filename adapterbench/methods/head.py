"""Head only: the encoder stays frozen and only the task head is trained (the "Head"
column of the AdapterFusion table, Pfeiffer et al. 2021, Table 1)."""

from dataclasses import dataclass

from adapterbench.methods.contract import Artifact

KIND = "head"
STAGE = "extract"
ARTIFACT = Artifact("adapter", "adapter_config.json", None)
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 1e-3, "epochs": 10}
IDENTITY_AT_INIT = None  # inserts nothing


@dataclass
class Config:
    name: str = "head"


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    encoder.requires_grad_(False)


def trainable_state(encoder, cfg: Config, names: list[str]) -> dict:
    return {}


def load_state(encoder, cfg: Config, names: list[str], state: dict) -> None:
    return None
