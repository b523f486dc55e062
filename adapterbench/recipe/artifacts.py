"""Adapter folders, in one place: find them, read them as sources (for fusion, merging and
init_from), hash them, check that several agree, and verify that a fusion's sources are the
ones it was trained on.

An adapter folder holds adapter_config.json ({"method": {...}, "base_model", "model_type",
"hidden_size", "num_layers", "task", ...}), adapter.safetensors and, from a run, the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterbench.errors import UserError
from adapterbench.fileio import file_sha256, load_tensors, read_json
from adapterbench.methods import get_method, method_config
from adapterbench.records import check_seal, status_of


@dataclass
class Source:
    """One adapter read from its folder."""
    path: str                 # the adapter folder, resolved
    name: str                 # unique within a set of sources (the task name, '_' appended on clashes)
    meta: dict                # adapter_config.json
    state: dict = field(default_factory=dict, repr=False)   # its weights (name-free keys)

    @property
    def weights(self) -> Path:
        return Path(self.path) / "adapter.safetensors"

    def bottleneck(self):
        """The BottleneckConfig this adapter was trained with."""
        method = get_method(self.meta["method"]["name"])
        return method.bottleneck(method_config(self.meta["method"]))


def adapter_folder(src: str | Path) -> Path:
    """A run folder or an adapter folder -> the folder holding adapter_config.json."""
    p = Path(src)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            run = cand.parent if cand.name == "adapter" else cand
            status = status_of(run) if (run / "metrics.json").is_file() else "ok"
            if status != "ok":      # a failed or unfinished run's adapter is not a result to build on
                raise UserError(f"source {src} is a run whose status is {status!r}, not 'ok': finish it "
                                f"(rerun its command) or pass another source")
            check_seal(run)          # its config.yaml and task.yaml still say what trained it
            return cand
    raise UserError(f"source {src} is neither an adapter folder nor an extract run folder "
                    f"(no adapter_config.json): pass the run folder of `adapterbench extract`")


def file_hash(path: Path) -> str:
    return file_sha256(path)


def read_sources(paths: list[str], feature: str = "fusion_source", allow_trained_norms: bool = False,
                 load: bool = False) -> list[Source]:
    """Each source's folder, config and name (and weights with `load`); all must share the base
    model and the adapter configuration, and their method must declare `feature`."""
    if not paths:
        raise UserError("no source adapters given: pass --adapters RUN_DIR [RUN_DIR ...]")
    sources, names, seen = [], set(), {}
    for src in paths:
        folder = adapter_folder(src)
        if folder.resolve() in seen:
            raise UserError(f"source adapter {src} is given twice (also as {seen[folder.resolve()]}): name each "
                            f"source once")
        seen[folder.resolve()] = src
        meta = read_json(folder / "adapter_config.json")
        if "method" not in meta:
            raise UserError(f"{folder} holds an AdapterHub or peft adapter: convert it first with "
                            f"`adapterbench import {folder} --out DIR`")
        name = meta.get("task") or folder.parent.name
        while name in names:
            name += "_"
        names.add(name)
        s = Source(str(folder.resolve()), name, meta)
        if load:
            s.state = load_tensors(s.weights)
        sources.append(s)
    check_compatible(sources, feature, allow_trained_norms)
    return sources


def method_shape(method: dict) -> dict:
    """The adapter's architecture-defining keys (what must agree to fuse, merge or load)."""
    return {k: v for k, v in method.items() if k not in ("adapters", "init", "init_seed")}


def check_compatible(sources: list[Source], feature: str, allow_trained_norms: bool = False) -> None:
    first = sources[0]
    m0 = first.meta
    name = m0["method"].get("name")
    if name not in [n for n in _registered() if feature in get_method(n).SUPPORTS]:
        raise UserError(f"source {first.path} is a '{name}' run, which cannot be used here "
                        f"({feature.replace('_', ' ')})")
    for s in sources[1:]:
        m = s.meta
        for key in ("base_model", "model_type", "hidden_size", "num_layers"):
            if m.get(key) != m0.get(key):
                raise UserError(f"source {s.path} differs in {key}: {m.get(key)!r} vs "
                                f"{m0.get(key)!r} in {first.path}; use adapters of one base model")
        a, b = method_shape(m["method"]), method_shape(m0["method"])
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"source {s.path} differs in adapter config method.{k}: {a.get(k)!r} vs "
                            f"{b.get(k)!r} in {first.path}; use adapters of one configuration")
    if m0["method"].get("train_layer_norms") and not allow_trained_norms:
        raise UserError(f"source {first.path} trained its own LayerNorms (houlsby default), which "
                        f"N sources cannot share here: use adapters extracted with method.train_layer_norms=false")


def _registered() -> list[str]:
    from adapterbench.methods import METHODS
    return list(METHODS)


def load_sources(paths: list[str]) -> list[Source]:
    """Fusion sources with their weights, ready for `fusion.apply`."""
    return read_sources(paths, "fusion_source", load=True)


def sources_record(sources: list[Source]) -> list[dict]:
    """Written to fusion/sources.json: each source's name, path, task and content hash."""
    return [{"name": s.name, "path": s.path, "task": s.meta.get("task"), "sha256": file_hash(s.weights)}
            for s in sources]


def verify_sources(record: list[dict], configured: list[str]) -> None:
    """Refuse to rebuild a fusion whose source adapters changed since training, or whose
    config.yaml names other sources than the ones it was trained on."""
    if [str(adapter_folder(p).resolve()) for p in configured] != [s["path"] for s in record]:
        raise UserError("the fusion's config.yaml names other source adapters than fusion/sources.json "
                        "records: the run folder was edited; restore config.yaml or rerun fuse")
    for s in record:
        weights = Path(s["path"]) / "adapter.safetensors"
        if not weights.is_file():
            raise UserError(f"fusion source {s['path']} is gone: restore it or rerun fuse")
        if file_hash(weights) != s["sha256"]:
            raise UserError(f"fusion source {s['path']} changed since this fusion was trained "
                            f"(sha256 differs): rerun fuse")


def check_init_from(folder: Path, method: dict) -> dict:
    """The weights of a saved adapter folder a run starts from, after checking it has the run's
    adapter configuration."""
    folder = adapter_folder(folder)
    meta = read_json(folder / "adapter_config.json")
    mine, theirs = method_shape(method), method_shape(meta.get("method", {}))
    if mine != theirs:
        k = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))[0]
        raise UserError(f"init_from {folder} differs in method.{k}: {theirs.get(k)!r} there, {mine.get(k)!r} "
                        f"here; set method.{k} to match")
    return load_tensors(folder / "adapter.safetensors")
