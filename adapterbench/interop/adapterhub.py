"""AdapterHub (`adapters` library) on-disk format: export our adapters, import theirs.

Their bottleneck adapter folder: adapter_config.json ({"config": BnConfig fields,
"hidden_size", "model_class", "model_name", "model_type", "name", "version"}), weights under
`<prefix>.encoder.layer.<i>.<attention.output|output>.adapters.<name>.adapter_down.0.*` and
`...adapter_up.*` (adapter.safetensors, or pytorch_adapter.bin), and for a head
head_config.json + model_head.safetensors (`heads.<name>.1.*` dense, `heads.<name>.4.*` out).
Pfeiffer = their seq_bn, Houlsby = their double_seq_bn. Only the BERT-like layouts
(BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa) map one to one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adapterbench.errors import UserError
from adapterbench.fileio import (
    load_tensors,
    plain_name,
    prepare_out,
    read_json,
    save_tensors,
    staged,
    write_json,
)

VERSION = "adapters.1.3.0"
MODEL_CLASS = {"bert": "BertAdapterModel", "roberta": "RobertaAdapterModel", "xlm-roberta": "XLMRobertaAdapterModel",
               "electra": "ElectraAdapterModel", "deberta": "DebertaAdapterModel",
               "deberta-v2": "DebertaV2AdapterModel"}
PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra",
          "deberta": "deberta", "deberta-v2": "deberta"}
SITE_MODULE = {"attn": "attention.output", "ffn": "output"}
PLACEMENT = {  # our method -> their placement switches
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, original_ln_before=True, original_ln_after=True,
                     residual_before_ln=True),
    "houlsby": dict(mh_adapter=True, output_adapter=True, original_ln_before=False, original_ln_after=True,
                    residual_before_ln=True),
}
BN_DEFAULTS = dict(adapter_residual_before_ln=False, cross_adapter=False, dropout=0.0, factorized_phm_W=True,
                   factorized_phm_rule=False, hypercomplex_nonlinearity="glorot-uniform", init_weights="bert",
                   init_weights_seed=None, inv_adapter=None, inv_adapter_reduction_factor=None, is_parallel=False,
                   learn_phm=True, leave_out=[], ln_after=False, ln_before=False, phm_bias=True,
                   phm_c_init="normal", phm_dim=4, phm_init_range=0.0001, phm_layer=False, phm_rank=1,
                   scaling=1.0, shared_W_phm=False, shared_phm_rule=True, stochastic_depth=0.0, use_gating=False)
INIT = {"bert": "bert", "houlsby": "houlsby", "zero": "mam_adapter"}


def _check_layout(model_type: str) -> None:
    if model_type not in PREFIX:
        raise UserError(f"AdapterHub export/import maps BERT-like layouts only ({', '.join(PREFIX)}), "
                        f"not '{model_type}'")


@staged
def export(src: str | Path, out: Path, name: str | None = None, force: bool = False, with_head: bool = True) -> Path:
    """Write an extract run's (or adapter folder's) adapter, and unless `with_head` is False its
    head, in AdapterHub's format (a source for the library's fusion needs no head)."""
    from adapterbench.recipe.artifacts import adapter_folder
    folder = adapter_folder(str(src))
    meta = read_json(folder / "adapter_config.json")
    method = meta.get("method", {})
    if method.get("name") not in PLACEMENT:
        raise UserError(f"{folder}: only pfeiffer and houlsby adapters have an AdapterHub form, not "
                        f"{method.get('name')!r}")
    if method.get("train_layer_norms"):
        raise UserError(f"{folder}: this adapter trained its own LayerNorms, which AdapterHub's format cannot "
                        f"hold; extract with method.train_layer_norms=false to export")
    _check_layout(meta["model_type"])
    out = prepare_out(Path(out), force)
    name = name or meta.get("task") or "adapter"
    prefix = PREFIX[meta["model_type"]]
    state = {}
    for key, value in load_tensors(folder / "adapter.safetensors").items():
        layer, site, part, leaf = key.split(".")
        theirs = {"down": "adapter_down.0", "up": "adapter_up"}[part]
        state[f"{prefix}.encoder.layer.{layer}.{SITE_MODULE[site]}.adapters.{name}.{theirs}.{leaf}"] = value
    config = {**BN_DEFAULTS, **PLACEMENT[method["name"]], "non_linearity": method["activation"],
              "reduction_factor": method["reduction_factor"], "init_weights": INIT.get(method.get("init"), "bert")}
    common = {"hidden_size": meta["hidden_size"], "model_class": MODEL_CLASS[meta["model_type"]],
              "model_name": meta["base_model"], "model_type": meta["model_type"], "name": name, "version": VERSION}
    save_tensors(out / "adapter.safetensors", state, {"format": "pt"})
    write_json(out / "adapter_config.json", {"config": config, **common})
    if not with_head:
        return out
    if (folder / "head_config.json").is_file() and read_json(folder / "head_config.json").get("pooling", "cls") != "cls":
        raise UserError(f"{folder}: its head mean-pools the tokens or reads the pretrained pooler, which "
                        f"AdapterHub's 2-layer classification head cannot represent (it reads the first token "
                        f"through its own dense layer): extract with model.pooling=cls to export")
    if (folder / "head.safetensors").is_file():
        head = load_tensors(folder / "head.safetensors")
        hcfg = read_json(folder / "head_config.json")
        labels = hcfg.get("labels") or [f"LABEL_{i}" for i in range(hcfg["num_labels"])]
        save_tensors(out / "model_head.safetensors", {
            f"heads.{name}.1.weight": head["dense.weight"], f"heads.{name}.1.bias": head["dense.bias"],
            f"heads.{name}.4.weight": head["out.weight"], f"heads.{name}.4.bias": head["out.bias"]}, {"format": "pt"})
        write_json(out / "head_config.json", {"config": {
            "activation_function": "tanh", "bias": True, "dropout_prob": None, "head_type": "classification",
            "label2id": {str(lab): i for i, lab in enumerate(labels)} if not hcfg["regression"] else {"LABEL_0": 0},
            "layers": 2, "num_labels": hcfg["num_labels"], "use_pooler": False}, **common})
    return out


def _load_weights(folder: Path, safe: str, pickled: str) -> dict:
    if (folder / safe).is_file():
        return load_tensors(folder / safe)
    if (folder / pickled).is_file():  # foreign .bin: tensors only, never arbitrary objects
        return load_foreign_bin(folder / pickled, safe)
    raise UserError(f"{folder} has neither {safe} nor {pickled}")


def load_foreign_bin(path: Path, safe: str) -> dict:
    """A foreign pickled state dict, read as tensors only (weights_only) and memory-mapped, so a
    file that declares tensors larger than itself allocates nothing: sizes are checked against
    the file before any tensor is used; a legacy (non-zip) pickle, which cannot be mapped, is
    refused with the way out."""
    size = path.stat().st_size
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} cannot be read safely ({type(e).__name__}): re-save it as {safe}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} is not a state dict of named tensors: re-save it as {safe}")
    claimed = sum(v.untyped_storage().nbytes() for v in state.values())
    if claimed > size:
        raise UserError(f"{path} declares {claimed:,} bytes of tensors in a {size:,}-byte file: it is damaged or "
                        f"crafted; re-save it as {safe}")
    return {k: v.clone() for k, v in state.items()}


def _placement(cfg: dict) -> str:
    for name, switches in PLACEMENT.items():
        if all(cfg.get(k) == v for k, v in switches.items()):
            return name
    raise UserError("AdapterHub config is neither seq_bn (pfeiffer) nor double_seq_bn (houlsby): "
                    f"mh_adapter={cfg.get('mh_adapter')}, original_ln_before={cfg.get('original_ln_before')}")


def _check_supported(cfg: dict) -> None:
    for key, want in (("ln_before", False), ("ln_after", False), ("use_gating", False), ("phm_layer", False),
                      ("adapter_residual_before_ln", False), ("is_parallel", False), ("scaling", 1.0)):
        if cfg.get(key, want) != want:
            raise UserError(f"AdapterHub config sets {key}={cfg.get(key)!r}, which adapterbench does not model")
    if cfg.get("leave_out"):
        raise UserError(f"AdapterHub config leaves out layers {cfg['leave_out']}, which adapterbench does not model")


@staged
def import_adapter(src: str | Path, out: Path, base_model: str | None = None, force: bool = False) -> Path:
    """Read an adapter saved by the `adapters` library into an adapterbench adapter folder."""
    from adapterbench.methods.bottleneck import ACTIVATIONS
    src = Path(src)
    meta = read_json(src / "adapter_config.json")
    if "config" not in meta or not str(meta.get("version", "")).startswith("adapters"):
        raise UserError(f"{src}/adapter_config.json is not an AdapterHub adapter config (no 'config'/'version')")
    cfg = meta["config"]
    if isinstance(cfg, str):
        raise UserError(f"{src}: config '{cfg}' is a preset name; re-save the adapter with its full config")
    _check_layout(meta.get("model_type", ""))
    _check_supported(cfg)
    method = _placement(cfg)
    act = str(cfg.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise UserError(f"AdapterHub activation '{act}' is not one of {', '.join(ACTIVATIONS)}")
    rf = cfg.get("reduction_factor")
    if isinstance(rf, dict):
        if set(rf) != {"default"}:
            raise UserError(f"per-layer reduction factors {rf} are not supported")
        rf = rf["default"]
    name = meta.get("name", "adapter")
    pattern = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
                         r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
    state = {}
    for key, value in _load_weights(src, "adapter.safetensors", "pytorch_adapter.bin").items():
        m = pattern.search(key)
        if not m:
            raise UserError(f"{src}: unexpected weight '{key}' for a bottleneck adapter")
        layer, module, _, part, leaf = m.groups()
        site = "attn" if module == "attention.output" else "ffn"
        state[f"{layer}.{site}.{'down' if part.startswith('adapter_down') else 'up'}.{leaf}"] = value
    ours = {"method": {"name": method, "reduction_factor": float(rf), "activation": act,
                       "init": {v: k for k, v in INIT.items()}.get(cfg.get("init_weights"), "bert"),
                       "train_layer_norms": False},
            "base_model": base_model or meta.get("model_name"), "model_type": meta["model_type"],
            "hidden_size": meta["hidden_size"], "num_layers": 1 + max(int(k.split(".")[0]) for k in state),
            "task": name, "imported_from": str(src.resolve()), "adapterhub_version": meta.get("version")}
    out = prepare_out(Path(out), force)
    save_tensors(out / "adapter.safetensors", state, {"format": "pt"})
    write_json(out / "adapter_config.json", ours)
    if (src / "head_config.json").is_file():
        _import_head(src, out, name, meta)
    return out


def _import_head(src: Path, out: Path, name: str, meta: dict) -> None:
    h = read_json(src / "head_config.json")["config"]
    if h.get("head_type") != "classification" or h.get("layers") != 2 or h.get("use_pooler") \
            or h.get("activation_function") != "tanh":
        raise UserError(f"{src}/head_config.json: only 2-layer tanh classification heads import "
                        f"(got {h.get('head_type')}, layers={h.get('layers')})")
    w = _load_weights(src, "model_head.safetensors", "pytorch_model_head.bin")
    key = lambda i, leaf: next(k for k in w if k.endswith(f".{i}.{leaf}"))
    save_tensors(out / "head.safetensors", {"dense.weight": w[key(1, "weight")], "dense.bias": w[key(1, "bias")],
                                            "out.weight": w[key(4, "weight")], "out.bias": w[key(4, "bias")]})
    labels = [k for k, _ in sorted(h.get("label2id", {}).items(), key=lambda kv: kv[1])]
    write_json(out / "head_config.json", {"hidden_size": meta["hidden_size"], "num_labels": h["num_labels"],
                                          "regression": h["num_labels"] == 1, "dropout": 0.1,
                                          "labels": labels if h["num_labels"] > 1 else None})


@staged
def export_fusion(run_dir: str | Path, out: Path, force: bool = False) -> Path:
    """A `fuse` run in AdapterHub's format: every source adapter (a folder each), the fusion
    layer (fusion/: adapter_fusion_config.json, model_adapter_fusion.safetensors), the head
    (head/). Load with load_adapter per source, load_adapter_fusion, load_head."""
    run_dir = Path(run_dir)
    cfg_meta = read_json(run_dir / "fusion" / "fusion_config.json")
    sources = read_json(run_dir / "fusion" / "sources.json")
    method = cfg_meta["method"]
    out = prepare_out(Path(out), force)
    names = []
    for s in sources:
        name = plain_name(s.get("name") if isinstance(s, dict) else None, f"{run_dir / 'fusion' / 'sources.json'}")
        export(s["path"], out / name, name=name, force=force)
        names.append(name)
    fused = ",".join(names)
    _check_layout(cfg_meta["model_type"])
    prefix = PREFIX[cfg_meta["model_type"]]
    module_of = _fusion_site_modules(run_dir, cfg_meta)
    state = {}
    for key, value in load_tensors(run_dir / "fusion" / "fusion.safetensors").items():
        site, rest = key.split(".", 1)
        state[f"{prefix}.{module_of[int(site)]}.adapter_fusion_layer.{fused}.{rest}"] = value
    common = {"hidden_size": cfg_meta["hidden_size"], "model_class": MODEL_CLASS[cfg_meta["model_type"]],
              "model_name": cfg_meta["base_model"], "model_type": cfg_meta["model_type"], "name": fused,
              "version": VERSION}
    dynamic = method.get("variant", "dynamic") == "dynamic"
    save_tensors(out / "fusion" / "model_adapter_fusion.safetensors", state, {"format": "pt"})
    write_json(out / "fusion" / "adapter_fusion_config.json", {"adapter_names": names, "config": {
        "dropout_prob": method.get("attention_dropout") or None, "key": True, "query": True,
        "query_before_ln": False, "regularization": True, "residual_before": False,
        "temperature": bool(method.get("temperature")), "value": dynamic, "value_before_softmax": True,
        "value_initialized": dynamic}, **common})
    head = load_tensors(run_dir / "fusion" / "head.safetensors")
    hcfg = read_json(run_dir / "fusion" / "head_config.json")
    labels = hcfg.get("labels") or [f"LABEL_{i}" for i in range(hcfg["num_labels"])]
    save_tensors(out / "head" / "model_head.safetensors", {
        f"heads.{fused}.1.weight": head["dense.weight"], f"heads.{fused}.1.bias": head["dense.bias"],
        f"heads.{fused}.4.weight": head["out.weight"], f"heads.{fused}.4.bias": head["out.bias"]}, {"format": "pt"})
    write_json(out / "head" / "head_config.json", {"config": {
        "activation_function": "tanh", "bias": True, "dropout_prob": None, "head_type": "classification",
        "label2id": {str(lab): i for i, lab in enumerate(labels)}, "layers": 2, "num_labels": hcfg["num_labels"],
        "use_pooler": False}, **{**common, "name": fused}})
    return out


def _fusion_site_modules(run_dir: Path, meta: dict) -> list[str]:
    """Their module path (e.g. encoder.layer.3.output) of each of our fusion sites, in order."""
    from adapterbench.recipe.artifacts import read_sources
    src = read_sources(meta["method"]["adapters"])[0].meta["method"]
    return _site_modules(src["name"], meta["num_layers"])


# --- AdapterFusion, their way in -------------------------------------------------------------
# A fusion saved by the `adapters` library: one folder per source adapter (save_adapter), the
# fusion layer (save_adapter_fusion: adapter_fusion_config.json + model_adapter_fusion.*) and
# its head (save_head), side by side in one folder -- the layout `export_fusion` writes.

@staged
def import_fusion(src: str | Path, out: Path, base_model: str | None = None, force: bool = False) -> Path:
    """Read an AdapterHub fusion folder into ours: sources/<name>/ (adapter folders) and fusion/
    (fusion_config.json, fusion.safetensors, the head, sources.json), which `load_fusion` rebuilds."""
    from adapterbench.recipe.artifacts import file_hash
    src = Path(src)
    fdir = next((p.parent for p in src.glob("*/adapter_fusion_config.json")), None)
    if fdir is None:
        raise UserError(f"{src} holds no adapter_fusion_config.json in a subfolder: save the fusion with "
                        f"save_adapter_fusion next to its adapters (save_adapter) and head (save_head)")
    fmeta = read_json(fdir / "adapter_fusion_config.json")
    names = fmeta.get("adapter_names") or str(fmeta.get("name", "")).split(",")
    if not isinstance(names, list) or len(set(map(str, names))) != len(names):
        raise UserError(f"{fdir / 'adapter_fusion_config.json'}: adapter_names {names!r} must list each adapter once")
    names = [plain_name(n, str(fdir / "adapter_fusion_config.json")) for n in names]
    fcfg = fmeta.get("config", {})
    for key, want in (("query", True), ("key", True), ("residual_before", False), ("query_before_ln", False),
                      ("value_before_softmax", True)):
        if fcfg.get(key, want) != want:
            raise UserError(f"{fdir}: fusion config sets {key}={fcfg.get(key)!r}, which adapterbench does not model")
    model = base_model or fmeta.get("model_name")
    sources = []
    for name in names:
        folder = next((p.parent for p in src.glob("*/adapter_config.json")
                       if read_json(p).get("name") == name and p.parent != fdir), None)
        if folder is None:
            raise UserError(f"{src}: no saved adapter named '{name}' beside the fusion (save_adapter each source)")
        sources.append(import_adapter(folder, out / "sources" / name, model))
    meta = read_json(sources[0] / "adapter_config.json")
    _check_layout(meta["model_type"])
    prefix = PREFIX[meta["model_type"]]
    site_of = {m: i for i, m in enumerate(_site_modules(meta["method"]["name"], meta["num_layers"]))}
    fused = ",".join(names)
    pattern = re.compile(rf"^{prefix}\.(encoder\.layer\.\d+\.(?:attention\.output|output))\.adapter_fusion_layer\."
                         rf"{re.escape(fused)}\.(.+)$")
    state = {}
    for key, value in _load_weights(fdir, "model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin").items():
        m = pattern.match(key)
        if not m or m.group(1) not in site_of:
            raise UserError(f"{fdir}: unexpected fusion weight '{key}'")
        state[f"{site_of[m.group(1)]}.{m.group(2)}"] = value
    method = {"name": "fusion", "adapters": [f"../sources/{n}" for n in names],   # relative to fusion/
              "variant": "dynamic" if fcfg.get("value", True) else "static",
              "temperature": bool(fcfg.get("temperature")), "attention_dropout": float(fcfg.get("dropout_prob") or 0.0),
              "reg_weight": 0.01}
    save_tensors(out / "fusion" / "fusion.safetensors", state, {"format": "pt"})
    write_json(out / "fusion" / "fusion_config.json", {
        "method": method, "base_model": model, "model_type": meta["model_type"], "hidden_size": meta["hidden_size"],
        "num_layers": meta["num_layers"], "task": None, "imported_from": str(src.resolve())})
    write_json(out / "fusion" / "sources.json", [{"name": n, "path": f"../sources/{n}", "task": n,
                                                  "sha256": file_hash(p / "adapter.safetensors")}
                                                 for n, p in zip(names, sources)])
    hdir = next((p.parent for p in src.glob("*/head_config.json") if p.parent not in [*sources, fdir]
                 and not (p.parent / "adapter_config.json").exists()), None)
    if hdir is not None:
        _import_head(hdir, out / "fusion", fused, meta)
    return out


def _site_modules(placement: str, num_layers: int) -> list[str]:
    """Their module path of each of our adapter sites, in our site order."""
    from adapterbench.methods.bottleneck import PLACEMENTS
    return [f"encoder.layer.{i}.{SITE_MODULE[site]}" for i in range(num_layers)
            for site in PLACEMENTS["houlsby" if placement == "houlsby" else "pfeiffer"]]


def load_fusion(folder: str | Path, model_name: str | None = None):
    """(TaskModel, tokenizer) of an imported fusion folder (sources/ + fusion/), ready for logits."""
    from adapterbench.methods import fusion as F
    from adapterbench.methods import method_config
    from adapterbench.models import (
        ClassificationHead,
        HeadConfig,
        TaskModel,
        load_encoder,
    )
    from adapterbench.recipe.artifacts import load_sources, verify_sources
    folder = Path(folder)
    meta = read_json(folder / "fusion" / "fusion_config.json")
    where = lambda p: str((folder / "fusion" / p).resolve())    # sources are kept relative to fusion/
    record = [{**s, "path": where(s["path"])} for s in read_json(folder / "fusion" / "sources.json")]
    meta["method"]["adapters"] = [where(p) for p in meta["method"]["adapters"]]
    verify_sources(record, meta["method"]["adapters"])
    encoder, tokenizer = load_encoder(model_name or meta["base_model"])
    cfg = method_config(meta["method"])
    F.apply(encoder, cfg, ["fusion"], load_sources(meta["method"]["adapters"]))
    F.load_state(encoder, cfg, ["fusion"], load_tensors(folder / "fusion" / "fusion.safetensors"))
    head = ClassificationHead(HeadConfig(**read_json(folder / "fusion" / "head_config.json")))
    head.load_state_dict(load_tensors(folder / "fusion" / "head.safetensors"))
    return TaskModel(encoder, head).eval(), tokenizer
