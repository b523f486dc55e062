"""Methods, one module each, registered by name in METHODS. `Method` (contract.py) is the
contract every module satisfies (checked for every registered method in tests/test_methods.py).

A method module provides:
- KIND: a one-word description ("adapter", "model", "head", "fusion", "multitask", "lora").
- STAGE: the command that trains it: "extract", "finetune", "fuse" or "multitask".
- ARTIFACT: where a run keeps what it trained (folder, its JSON description, weights file;
  `optional`: written only with train.save_model).
- SUPPORTS: what else it can do, from FEATURES.
- TRAIN_DEFAULTS: train.* defaults of the method (the user's values win).
- IDENTITY_AT_INIT: the method.* settings under which the model equals the base model at
  step 0 (tested), or None where the method promises no such thing.
- Config: a dataclass of its method.* keys, with `name`; resolved once by stages.resolve.
- apply(encoder, cfg, names, sources=()): insert its modules into the encoder and set what
  trains. `names`: the run's task names (one for a single-task run). `sources`: adapters read
  by artifacts.load_sources (fusion only; other methods ignore them).
- trainable_state(encoder, cfg, names) -> {key: tensor} and load_state(encoder, cfg, names,
  state): what the run saves and reads back (name-free keys).
Optional hooks: `set_tasks(encoder, task_ids)` (multi-task methods: route each example by its
task), `bottleneck(cfg)` (bottleneck adapters: the BottleneckConfig they insert),
`finalize(out, encoder, tokenizer, cfg, tasks, model_name)` (extra files after training).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from adapterbench.config import build
from adapterbench.errors import UserError
from adapterbench.methods import (
    camtl,
    full,
    fusion,
    head,
    houlsby,
    lora,
    mta,
    mtl,
    pfeiffer,
)
from adapterbench.methods.contract import FEATURES, Artifact, Method  # noqa: F401  (the contract, re-exported)

METHODS: dict[str, ModuleType] = {
    "houlsby": houlsby,
    "pfeiffer": pfeiffer,
    "lora": lora,
    "full": full,
    "head": head,
    "fusion": fusion,
    "mtl": mtl,
    "mt-a": mta,
    "camtl": camtl,
}


def get_method(name: str) -> Any:
    """A registered method: shipped, a plug-in named on the command line, or an installed entry point."""
    from adapterbench.methods import plugins
    if not isinstance(name, str) or not name:
        raise UserError(f"method {name!r} is not a method's name: give one name, e.g. method=pfeiffer "
                        f"(adapterbench ls methods)")
    if name not in METHODS:
        plugins.load_entry_points(METHODS)
    if name not in METHODS:
        if isinstance(name, str) and plugins.looks_like_plugin(name):
            raise UserError(f"method '{name}' is a plug-in that is not loaded: pass --plugin {name} (or "
                            f"--method {name}) on the command line; a module named by a config, study or run "
                            f"folder is never imported by itself")
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(METHODS)} (a module of your own: "
                        f"--plugin PATH.py)")
    return METHODS[name]


def register_plugin(spec: str) -> str:
    """Load a user's method module (a .py file or an importable module) named on the command line."""
    from adapterbench.methods import plugins
    return plugins.register(spec, METHODS)


def supporting(feature: str) -> list[str]:
    """The registered methods that declare `feature`."""
    return [n for n, m in METHODS.items() if feature in m.SUPPORTS]


def require(method_name: str, feature: str, what: str) -> None:
    """One line when a method lacks a feature, naming the methods that have it."""
    if feature not in get_method(method_name).SUPPORTS:
        raise UserError(f"{what} works with {', '.join(supporting(feature))}, not with '{method_name}'")


def method_config(data: dict):
    """The method's Config from the `method:` mapping (unknown keys are errors)."""
    if not isinstance(data, dict):
        return data   # already resolved
    name = data.get("name")
    if not isinstance(name, str):
        raise UserError("config key 'method.name' is missing: name a method "
                        f"({', '.join(METHODS)})")
    return build(get_method(name).Config, data, where="method")
