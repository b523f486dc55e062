"""Methods from outside the package: a module file (`--method ./my_method.py`, registered under
its file stem), an importable module (`--plugin my_package.my_method`, registered under that
dotted name), or an installed package's entry point in the group `adapterbench.methods`
(`name = module`). A user's module is code the user chose to run, so it is imported only when
named on the command line (`--plugin`, `--method`, a `method=` override; `ADAPTERBENCH_PLUGINS`
carries them to a study's workers) or installed as an entry point, never because a config,
study or run folder names it: such a name that is not loaded is one line saying how to load it.
A module that breaks the contract (methods/contract.py) is one line naming what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from adapterbench.errors import UserError
from adapterbench.methods.contract import FEATURES, Artifact

GROUP = "adapterbench.methods"
ENV = "ADAPTERBENCH_PLUGINS"
STAGES = ("extract", "finetune")       # plug-ins train single-task, as extract or finetune runs
_ORIGINS: dict[str, dict] = {}          # registered name -> {"source", "sha256"}


def looks_like_plugin(name: str) -> bool:
    return name.endswith(".py") or "/" in name or ("." in name and not name.replace(".", "").isdigit())


def contract_problems(module: ModuleType) -> list[str]:
    """What of the method contract `module` lacks or gets wrong, one phrase each."""
    out = []
    want = {"KIND": str, "STAGE": str, "ARTIFACT": Artifact, "SUPPORTS": frozenset, "TRAIN_DEFAULTS": dict}
    for member, kind in want.items():
        if not hasattr(module, member):
            out.append(f"no {member} ({kind.__name__})")
        elif not isinstance(getattr(module, member), kind):
            out.append(f"{member} must be a {kind.__name__}, not {type(getattr(module, member)).__name__}")
    if not hasattr(module, "IDENTITY_AT_INIT"):
        out.append("no IDENTITY_AT_INIT (a dict of method.* settings, or None)")
    elif module.IDENTITY_AT_INIT is not None and not isinstance(module.IDENTITY_AT_INIT, dict):
        out.append("IDENTITY_AT_INIT must be a dict or None")
    cfg = getattr(module, "Config", None)
    if not (isinstance(cfg, type) and dataclasses.is_dataclass(cfg)):
        out.append("no Config dataclass")
    elif "name" not in {f.name for f in dataclasses.fields(cfg)}:
        out.append("Config has no 'name' field")
    for fn in ("apply", "trainable_state", "load_state"):
        if not callable(getattr(module, fn, None)):
            out.append(f"no {fn}() function")
    if isinstance(getattr(module, "STAGE", None), str) and module.STAGE not in STAGES:
        out.append(f"STAGE must be one of {', '.join(STAGES)} for a plug-in, not {module.STAGE!r}")
    if isinstance(getattr(module, "SUPPORTS", None), frozenset) and not module.SUPPORTS <= FEATURES:
        out.append(f"SUPPORTS names unknown features {sorted(module.SUPPORTS - FEATURES)} (known: {sorted(FEATURES)})")
    return out


def _import(spec: str) -> tuple[str, ModuleType, str]:
    """(registered name, module, source) of a file path or an importable module name."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file() or path.suffix != ".py":
            raise UserError(f"method file {spec} {'is not a .py file' if path.is_file() else 'does not exist'}: "
                            f"give a method module's .py path")
        name = path.stem
        mod_name = f"adapterbench_plugin_{name}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise UserError(f"method file {path} failed to import ({type(e).__name__}: {e}): fix the module") from None
        return name, module, str(path.resolve())
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
        raise UserError(f"method {spec!r} is neither a .py file nor a module name (dotted identifiers): "
                        f"give a registered method (adapterbench ls methods), a .py path or a module")
    try:
        module = importlib.import_module(spec)
    except ImportError as e:
        raise UserError(f"method module '{spec}' cannot be imported ({e}): install it, or give a .py file path") \
            from None
    return spec, module, getattr(module, "__file__", None) or spec


def register(spec: str, registry: dict) -> str:
    """Import a user's method module, check its contract and add it to `registry`; returns its
    name. The same module twice is one registration."""
    name, module, source = _import(spec)
    if name in registry and registry[name] is not module and name not in _ORIGINS:
        raise UserError(f"plug-in '{spec}' would be registered as '{name}', a shipped method: rename the file")
    problems = contract_problems(module)
    if problems:
        raise UserError(f"method module {source} breaks the method contract: {'; '.join(problems)} "
                        f"(see adapterbench/methods/contract.py and docs/methods.md)")
    registry[name] = module
    from adapterbench.fileio import file_sha256
    digest = file_sha256(Path(source)) if Path(source).is_file() else None
    _ORIGINS[name] = {"source": source, "sha256": digest}
    carried = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    if spec not in carried:               # a study's workers (subprocesses, SLURM jobs) load it too
        os.environ[ENV] = os.pathsep.join([*carried, source if Path(source).is_file() else spec])
    return name


def register_from_env(registry: dict) -> None:
    """The plug-ins a parent command named (ADAPTERBENCH_PLUGINS), in a worker process."""
    for spec in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        register(spec, registry)


_ENTRY_POINTS_LOADED = False


def load_entry_points(registry: dict) -> None:
    """Installed packages' methods (entry points in the group `adapterbench.methods`), once."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=GROUP):
        if ep.name in registry:
            continue
        try:
            module = ep.load()
        except Exception as e:
            raise UserError(f"installed method '{ep.name}' ({ep.value}) failed to import ({type(e).__name__}: "
                            f"{e}): fix or uninstall its package") from None
        problems = contract_problems(module)
        if problems:
            raise UserError(f"installed method '{ep.name}' ({ep.value}) breaks the method contract: "
                            f"{'; '.join(problems)}")
        registry[ep.name] = module
        _ORIGINS[ep.name] = {"source": f"entry point {ep.value}", "sha256": None}


def origin(name: str) -> dict | None:
    """Where a plug-in method came from (None for a shipped one)."""
    return _ORIGINS.get(name)
