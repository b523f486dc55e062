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

from adapterbench.errors import UserError
from adapterbench.fileio import (
    load_tensors,
    read_json,
    save_tensors,
    staged,
    write_json,
)


def _targets(model_type: str) -> dict[str, str]:
    """our target name -> the module path inside a layer, from the architecture table."""
    from adapterbench.methods.lora import TARGETS
    from adapterbench.models import ARCHITECTURES
    if model_type not in ARCHITECTURES:
        raise UserError(f"architecture '{model_type}' is not in models.ARCHITECTURES")
    arch = ARCHITECTURES[model_type]
    return {t: getattr(arch, f) for t, f in TARGETS.items() if getattr(arch, f)}, arch.layers


# Where a sequence-classification model of each architecture keeps the encoder and which of its
# head modules our head maps onto (first-token pooling: dense + tanh, then the output layer;
# `pooler`: the pretrained pooler, then the output layer). AutoModelForSequenceClassification of
# another architecture (ELECTRA's GELU head, DistilBERT's ReLU head) or a mean-pooled head
# computes something else, so those export the encoder alone with the head beside it.
SEQ_CLS = {
    "bert": {"prefix": "bert", "class": ("BertModel", "transformers.models.bert.modeling_bert"),
             "cls": {"dense": "bert.pooler.dense", "out": "classifier"}, "pooler": {"out": "classifier"},
             "save": ["classifier", "pooler"]},
    "roberta": {"prefix": "roberta", "class": ("RobertaModel", "transformers.models.roberta.modeling_roberta"),
                "cls": {"dense": "classifier.dense", "out": "classifier.out_proj"}, "save": ["classifier"]},
    "xlm-roberta": {"prefix": "roberta",
                    "class": ("XLMRobertaModel", "transformers.models.xlm_roberta.modeling_xlm_roberta"),
                    "cls": {"dense": "classifier.dense", "out": "classifier.out_proj"}, "save": ["classifier"]},
}


def head_mapping(kind: str, head_cfg: dict | None) -> tuple[dict | None, str]:
    """(our head module -> the HF sequence-classification module, '') when AutoModelForSequence-
    Classification of this architecture computes our head's function, else (None, why not)."""
    if head_cfg is None:
        return None, "the run has no head file"
    pooling = head_cfg.get("pooling", "cls")
    spec = SEQ_CLS.get(kind, {})
    if pooling not in spec:
        return None, (f"AutoModelForSequenceClassification of '{kind}' does not compute this head "
                      f"({pooling} pooling); train with model.pooling=cls for a peft classifier")
    return spec[pooling], ""


def plan_export(src: str | Path, head: bool | None = None) -> tuple[Path, dict, dict | None, dict | None, str]:
    """(adapter folder, its metadata, its head config, the head mapping or None, a sentence on what
    the export holds). `head`: None = with the head where the architecture's classification head
    computes ours; True = with the head or one line why not; False = the encoder alone."""
    from adapterbench.recipe.artifacts import adapter_folder
    folder = adapter_folder(str(src))
    meta = read_json(folder / "adapter_config.json")
    method = meta.get("method", {})
    if method.get("name") != "lora":
        raise UserError(f"{folder}: --format peft exports LoRA adapters, not {method.get('name')!r} "
                        f"(use --format adapterhub for pfeiffer and houlsby)")
    head_cfg = read_json(folder / "head_config.json") if (folder / "head_config.json").is_file() else None
    mapping, why = head_mapping(meta["model_type"], head_cfg) if head is not False else (None, "--no-head")
    if head and mapping is None:
        raise UserError(f"{folder}: cannot export the head for peft: {why}; or pass --no-head (the encoder, "
                        f"with head.safetensors beside it)")
    if mapping:
        labels = head_cfg["num_labels"]
        what = ("LoRA with its classification head: AutoPeftModelForSequenceClassification.from_pretrained(DIR"
                + (f", num_labels={labels}" if labels != 2 else "") + ")")
    else:
        what = ("LoRA on the encoder (AutoPeftModel.from_pretrained(DIR)), our head files beside it"
                + (f"; no peft head: {why}" if head_cfg is not None and head is None else ""))
    return folder, meta, head_cfg, mapping, what


@staged
def export(src: str | Path, out: Path, force: bool = False, head: bool | None = None) -> Path:
    """Write a LoRA run's (or adapter folder's) weights in peft's format: with its head as a
    sequence-classification model (task_type SEQ_CLS, the head in modules_to_save, so that
    `AutoPeftModelForSequenceClassification.from_pretrained(DIR)` loads the trained classifier),
    or the encoder alone (auto_mapping to the bare model class; our head files beside it); see
    `plan_export` for which."""
    from adapterbench.fileio import prepare_out
    folder, meta, head_cfg, mapping, _ = plan_export(src, head)
    method, kind = meta["method"], meta["model_type"]
    paths, layers = _targets(kind)
    out = prepare_out(Path(out), force)
    prefix = f"{SEQ_CLS[kind]['prefix']}." if mapping else ""
    state = {}
    for key, value in load_tensors(folder / "adapter.safetensors").items():
        layer, target, part = key.split(".")
        state[f"base_model.model.{prefix}{layers}.{layer}.{paths[target]}.{part}.weight"] = value
    config = {"peft_type": "LORA", "task_type": None, "r": method["rank"], "lora_alpha": method["alpha"],
              "lora_dropout": method["dropout"],
              "target_modules": [paths[t].split(".")[-1] for t in method["target_modules"]],
              "base_model_name_or_path": portable_base(meta["base_model"]), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False}
    if mapping:
        weights = load_tensors(folder / "head.safetensors")
        for ours, theirs in mapping.items():
            for p in ("weight", "bias"):
                state[f"base_model.model.{theirs}.{p}"] = weights[f"{ours}.{p}"]
        config.update(task_type="SEQ_CLS", modules_to_save=SEQ_CLS[kind]["save"])
    else:
        if kind in SEQ_CLS:
            cls, module = SEQ_CLS[kind]["class"]
            config["auto_mapping"] = {"base_model_class": cls, "parent_library": module}
        for name in ("head.safetensors", "head_config.json"):
            if (folder / name).is_file():
                (out / name).write_bytes((folder / name).read_bytes())
    save_tensors(out / "adapter_model.safetensors", state, {"format": "pt"})
    write_json(out / "adapter_config.json", config)
    return out


def portable_base(name: str) -> str:
    """The base model as another machine names it: an alias's hub id (registered in this machine's
    Hugging Face cache, so it loads by that id offline here too), a hub id as it is; a local
    folder that records no hub id keeps its path (nothing else names it)."""
    from adapterbench.models import ALIAS_HUB_IDS, register_alias_in_hf_cache
    if name in ALIAS_HUB_IDS:
        register_alias_in_hf_cache(name)
        return ALIAS_HUB_IDS[name]
    if not Path(name).exists():
        return name
    return str(Path(name).resolve())


@staged
def import_lora(src: Path, out: Path, base_model: str | None = None, force: bool = False) -> Path:
    """Read a peft LoRA folder into an adapterbench adapter folder (method lora)."""
    from adapterbench.fileio import prepare_out
    from adapterbench.interop.adapterhub import _load_weights
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
    from adapterbench.models import load_encoder
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

