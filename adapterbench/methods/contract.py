"""The method contract (see methods/__init__.py for what each member means)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FEATURES = frozenset({
    "fusion_source",      # its adapter folders can be fused (artifacts.load_sources)
    "merge",              # its adapter folders can be merged (adapterbench merge)
    "init_from",          # a run can start from a saved adapter folder of the same config
    "export:adapterhub",  # adapterbench export --format adapterhub
    "export:peft",        # adapterbench export --format peft
    "bench",              # adapterbench bench can build it
})


@dataclass(frozen=True)
class Artifact:
    folder: str            # inside the run folder
    config: str            # its JSON description
    weights: str | None    # trainable_state as safetensors (None: nothing but the head)
    optional: bool = False  # weights only with train.save_model=true


@runtime_checkable
class Method(Protocol):
    KIND: str
    STAGE: str
    ARTIFACT: Artifact
    SUPPORTS: frozenset
    TRAIN_DEFAULTS: dict
    IDENTITY_AT_INIT: dict | None
    Config: type

    def apply(self, encoder, cfg, names: list[str], sources: tuple = ()) -> None: ...
    def trainable_state(self, encoder, cfg, names: list[str]) -> dict: ...
    def load_state(self, encoder, cfg, names: list[str], state: dict) -> None: ...


