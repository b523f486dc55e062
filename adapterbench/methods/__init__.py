"""Methods, one module each, registered by name.

Each module provides: KIND ("adapter" | "model" | "head" | "fusion" | "multitask"), TRAIN_DEFAULTS, a `Config`
dataclass, `apply(encoder, cfg, name)` (insert modules, set what trains),
`trainable_state(encoder, cfg, name)` and `load_state(encoder, cfg, name, state)`.
"""

from __future__ import annotations

from types import ModuleType

from ..config import build
from ..errors import UserError
from . import camtl, full, fusion, head, houlsby, mta, mtl, pfeiffer

METHODS: dict[str, ModuleType] = {
    "houlsby": houlsby,
    "pfeiffer": pfeiffer,
    "full": full,
    "head": head,
    "fusion": fusion,
    "mtl": mtl,
    "mt-a": mta,
    "camtl": camtl,
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(data: dict):
    """The method's Config from the `method:` mapping (unknown keys are errors)."""
    name = data.get("name")
    if not isinstance(name, str):
        raise UserError("config key 'method.name' is missing: name a method "
                        f"({', '.join(METHODS)})")
    return build(get_method(name).Config, data, where="method")
