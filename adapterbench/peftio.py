"""peft's on-disk LoRA format, both ways (Hu et al. 2021's LoRA as the `peft` library saves it).

A peft LoRA folder: adapter_config.json ({"peft_type": "LORA", "r", "lora_alpha",
"lora_dropout", "target_modules", "base_model_name_or_path", ...}) and adapter_model.safetensors
with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`. Our export writes
exactly that (loadable with `PeftModel.from_pretrained(AutoModel.from_pretrained(base), DIR)`),
plus our head as head.safetensors/head_config.json beside it (peft has no place for a head on
a bare encoder). Target names map through the architecture table (query/key/value rows).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError
from .runs import load_tensors, read_json, save_tensors, staged, write_json


def _targets(model_type: str) -> dict[str, str]:
    """our target name -> the module path inside a layer, from the architecture table."""
    from .methods.lora import TARGETS
    from .models import ARCHITECTURES
    if model_type not in ARCHITECTURES:
        raise UserError(f"architecture '{model_type}' is not in models.ARCHITECTURES")
    arch = ARCHITECTURES[model_type]
    return {t: getattr(arch, f) for t, f in TARGETS.items() if getattr(arch, f)}, arch.layers


@staged
def export(src: str | Path, out: Path, force: bool = False) -> Path:
    """Write a LoRA run's (or adapter folder's) weights in peft's format."""
    from .artifacts import adapter_folder
    from .runs import prepare_out
    folder = adapter_folder(str(src))
    meta = read_json(folder / "adapter_config.json")
    method = meta.get("method", {})
    if method.get("name") != "lora":
        raise UserError(f"{folder}: --format peft exports LoRA adapters, not {method.get('name')!r} "
                        f"(use --format adapterhub for pfeiffer and houlsby)")
    paths, layers = _targets(meta["model_type"])
    out = prepare_out(Path(out), force)
    state = {}
    for key, value in load_tensors(folder / "adapter.safetensors").items():
        layer, target, part = key.split(".")
        state[f"base_model.model.{layers}.{layer}.{paths[target]}.{part}.weight"] = value
    save_tensors(out / "adapter_model.safetensors", state, {"format": "pt"})
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": None, "r": method["rank"], "lora_alpha": method["alpha"],
        "lora_dropout": method["dropout"], "target_modules": [paths[t].split(".")[-1] for t in method["target_modules"]],
        "base_model_name_or_path": _model_path(meta["base_model"]), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False})
    for name in ("head.safetensors", "head_config.json"):
        if (folder / name).is_file():
            (out / name).write_bytes((folder / name).read_bytes())
    return out


def _model_path(name: str) -> str:
    from .models import resolve_model_path
    try:
        return resolve_model_path(name)
    except UserError:
        return name


@staged
def import_lora(src: Path, out: Path, base_model: str | None = None, force: bool = False) -> Path:
    """Read a peft LoRA folder into an adapterbench adapter folder (method lora)."""
    from .adapterhub import _load_weights
    from .runs import prepare_out
    src = Path(src)
    cfg = read_json(src / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{src}/adapter_config.json is a peft '{cfg.get('peft_type')}' adapter; only LORA imports")
    for key, want in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, want) != want:
            raise UserError(f"peft config sets {key}={cfg.get(key)!r}, which adapterbench's LoRA does not model")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("peft config has per-module rank or alpha patterns, which adapterbench's LoRA does not model")
    model = base_model or cfg.get("base_model_name_or_path")
    if not model:
        raise UserError(f"{src} names no base model: pass --model")
    from .models import load_encoder
    encoder, _ = load_encoder(model)
    kind = encoder.config.model_type
    paths, layers = _targets(kind)
    by_path = {p: t for t, p in paths.items()}
    pattern = re.compile(rf"{re.escape(layers)}\.(\d+)\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")
    state, found = {}, set()
    for key, value in _load_weights(src, "adapter_model.safetensors", "adapter_model.bin").items():
        m = pattern.search(key)
        if not m or m.group(2) not in by_path:
            raise UserError(f"{src}: weight '{key}' is not a LoRA factor of a query/key/value/output projection")
        state[f"{m.group(1)}.{by_path[m.group(2)]}.{m.group(3)}"] = value
        found.add(by_path[m.group(2)])
    order = [t for t in ("query", "key", "value", "attn_output", "ffn_output") if t in found]
    out = prepare_out(Path(out), force)
    save_tensors(out / "adapter.safetensors", state, {"format": "pt"})
    write_json(out / "adapter_config.json", {
        "method": {"name": "lora", "rank": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]),
                   "dropout": float(cfg.get("lora_dropout", 0.0)), "target_modules": order},
        "base_model": model, "model_type": kind, "hidden_size": encoder.config.hidden_size,
        "num_layers": encoder.config.num_hidden_layers, "task": None, "imported_from": str(src.resolve()),
        "peft_version": cfg.get("peft_version")})
    return out

