"""Parity with the AdapterHub `adapters` library, both directions, on the same inputs:
  ours -> `adapterbench export` -> loaded by `adapters` : max |logit difference|
  `adapters` save_adapter -> `adapterbench import` -> ours : max |logit difference|
The peer side runs in .peer-venv (bash scripts/make_peer_venv.sh).

    python scripts/parity_adapterhub.py [--model minilm-l6|DIR] [--method pfeiffer|houlsby]
        [--run RUN_DIR] [--fixture DIR]

--run uses a trained extract run (its adapter and head); otherwise a random non-trivial
adapter and head are made. --fixture also writes what the offline import test needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [["A man is playing a guitar.", "Someone plays music."],
         ["the cat sat on the mat", "a dog is very bad and it was not fine"],
         ["Stocks fell sharply on Monday.", "Markets dropped at the start of the week."],
         ["She did not like the film at all.", "this movie was great"]]


def our_model(model_name: str, adapter_dir: Path):
    """Our encoder + the adapter and head from an adapterbench adapter folder."""
    from adapterbench.methods import get_method, method_config
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel, load_encoder
    from adapterbench.fileio import load_tensors, read_json
    meta = read_json(adapter_dir / "adapter_config.json")
    enc, tok = load_encoder(model_name)
    method = get_method(meta["method"]["name"])
    cfg = method_config(meta["method"])
    method.apply(enc, cfg, ["a"])
    method.load_state(enc, cfg, ["a"], load_tensors(adapter_dir / "adapter.safetensors"))
    h = read_json(adapter_dir / "head_config.json")
    head = ClassificationHead(HeadConfig(h["hidden_size"], h["num_labels"], h["regression"], labels=h.get("labels")))
    head.load_state_dict(load_tensors(adapter_dir / "head.safetensors"))
    return TaskModel(enc, head).eval(), tok


def our_logits(model, tok) -> list:
    enc = tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    with torch.no_grad():
        return model.logits(**enc).tolist()


def random_adapter(model_name: str, method: str, out: Path, seed: int = 1) -> Path:
    """A random non-trivial adapter + head written as an adapterbench adapter folder."""
    from adapterbench.methods import get_method, method_config
    from adapterbench.models import ClassificationHead, HeadConfig, load_encoder
    from adapterbench.fileio import save_tensors, write_json
    enc, _ = load_encoder(model_name)
    mcfg = {"name": method, "train_layer_norms": False}
    cfg = method_config(mcfg)
    torch.manual_seed(seed)
    get_method(method).apply(enc, cfg, ["a"])
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in get_method(method).trainable_state(enc, cfg, ["a"]).items()}
    head = ClassificationHead(HeadConfig(enc.config.hidden_size, 2))
    save_tensors(out / "adapter.safetensors", state)
    save_tensors(out / "head.safetensors", head.state_dict())
    write_json(out / "head_config.json", {"hidden_size": enc.config.hidden_size, "num_labels": 2,
                                          "regression": False, "dropout": 0.1, "labels": None})
    write_json(out / "adapter_config.json", {"method": vars(cfg), "base_model": model_name,
                                             "model_type": enc.config.model_type,
                                             "hidden_size": enc.config.hidden_size,
                                             "num_layers": enc.config.num_hidden_layers, "task": "parity"})
    return out


def fusion_parity(a, work: Path) -> dict:
    """A fusion over two random adapters with random fusion weights and head: our logits vs
    the `adapters` library's on our export."""
    from adapterbench.interop.adapterhub import export_fusion
    from adapterbench.config import merge_layers
    from adapterbench.recipe.runmodel import build_model, save_weights
    from adapterbench.recipe.stages import resolve
    from adapterbench.tasks import load_task
    srcs = [random_adapter(a.model, a.method, work / f"src{i}", seed=i + 1) for i in range(2)]
    for i, s in enumerate(srcs):  # distinct names in the export
        meta = json.loads((s / "adapter_config.json").read_text())
        meta["task"] = f"src{i}"
        (s / "adapter_config.json").write_text(json.dumps(meta))
    cfg = resolve(merge_layers(None, {"task": "rte", "model.name": a.model, "method.name": "fusion",
                                      "model.pooling": "cls", "method.adapters": [str(s) for s in srcs]},
                               ["model.max_length=64"]), "fuse")
    task = load_task("rte")
    model, tok = build_model(cfg, [task])
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ours = our_logits(model, tok)
    from adapterbench.methods.fusion import sites
    for site in sites(model.encoder):
        site.active = []
    effect = (torch.tensor(our_logits(model, tok)) - torch.tensor(ours)).abs().max().item()
    for site in sites(model.encoder):
        site.active = None
    run = work / "fuse-run"
    save_weights(run, cfg, [task], model, tok)
    out = export_fusion(run, work / "fusion-export")
    job = {"model": str(Path(a.model_path)), "pairs": PAIRS, "fusion_dir": str(out / "fusion"),
           "head_dir": str(out / "head"), "fusion_sources": [str(out / "src0"), str(out / "src1")]}
    (work / "fjob.json").write_text(json.dumps(job))
    subprocess.run([a.peer_python, str(ROOT / "scripts" / "peer" / "parity_peer.py"), str(work / "fjob.json"),
                    str(work / "fanswer.json")], check=True)
    peer = json.loads((work / "fanswer.json").read_text())["peer_logits_of_fusion"]
    return {"fusion_effect_max_abs_logit_change": effect,
            "fusion_ours_to_adapters_max_abs_diff": (torch.tensor(ours) - torch.tensor(peer)).abs().max().item(),
            **fusion_import_parity(a, work)}


def fusion_import_parity(a, work: Path) -> dict:
    """The other way: a fusion the `adapters` library makes and saves (two seq_bn adapters, the
    fusion layer, a head; random non-trivial weights), imported by us: its logits vs ours."""
    from adapterbench.interop.adapterhub import import_fusion, load_fusion
    job = {"model": str(Path(a.model_path)), "pairs": PAIRS, "make_fusion_dir": str(work / "peer-fusion")}
    (work / "mjob.json").write_text(json.dumps(job))
    subprocess.run([a.peer_python, str(ROOT / "scripts" / "peer" / "parity_peer.py"), str(work / "mjob.json"),
                    str(work / "manswer.json")], check=True)
    theirs = json.loads((work / "manswer.json").read_text())["peer_logits_of_own_fusion"]
    out = import_fusion(work / "peer-fusion", work / "imported-fusion", a.model)
    model, tok = load_fusion(out)
    ours = our_logits(model, tok)
    if a.fixture:
        fx = Path(a.fixture).parent / "fusion"
        shutil.rmtree(fx, ignore_errors=True)
        shutil.copytree(work / "peer-fusion", fx / "saved")
        (fx / "expected.json").write_text(json.dumps({"pairs": PAIRS, "logits": theirs}, indent=1))
    return {"fusion_adapters_to_ours_max_abs_diff": (torch.tensor(ours) - torch.tensor(theirs)).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--method", default="pfeiffer", choices=["pfeiffer", "houlsby"])
    ap.add_argument("--run", help="an extract run folder to export instead of a random adapter")
    ap.add_argument("--fixture", help="write the offline import-test fixture here")
    ap.add_argument("--peer-python", default=str(ROOT / ".peer-venv" / "bin" / "python"))
    a = ap.parse_args()
    from adapterbench.interop.adapterhub import export, import_adapter
    from adapterbench.models import resolve_model_path
    model_path = resolve_model_path(a.model)
    a.model_path = model_path
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    src = Path(a.run) / "adapter" if a.run else random_adapter(a.model, a.method, work / "ours")
    model, tok = our_model(a.model, src)
    ours = our_logits(model, tok)
    from adapterbench.methods.fusion import sites
    for site in sites(model.encoder):
        site.active = []
    effect = (torch.tensor(our_logits(model, tok)) - torch.tensor(ours)).abs().max().item()
    export(src, work / "export")
    job = {"model": model_path, "export_dir": str(work / "export"), "pairs": PAIRS, "num_labels": len(ours[0]),
           "peer_config": "seq_bn" if a.method == "pfeiffer" else "double_seq_bn",
           "peer_save_dir": str(work / "peer_saved")}
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run([a.peer_python, str(ROOT / "scripts" / "peer" / "parity_peer.py"), str(work / "job.json"),
                    str(work / "answer.json")], check=True)
    ans = json.loads((work / "answer.json").read_text())
    imported = import_adapter(work / "peer_saved", work / "imported", base_model=a.model)
    model2, _ = our_model(a.model, imported)
    back = our_logits(model2, tok)
    d1 = (torch.tensor(ours) - torch.tensor(ans["peer_logits_of_export"])).abs().max().item()
    d2 = (torch.tensor(back) - torch.tensor(ans["peer_logits_of_own"])).abs().max().item()
    fusion = fusion_parity(a, work) if a.method == "pfeiffer" else {}
    print(json.dumps({"model": a.model, "method": a.method, "run": a.run,
                      "adapter_effect_max_abs_logit_change": effect,
                      "ours_to_adapters_max_abs_diff": d1, "adapters_to_ours_max_abs_diff": d2, **fusion}, indent=2))
    if a.fixture:
        fx = Path(a.fixture)
        shutil.rmtree(fx, ignore_errors=True)
        shutil.copytree(work / "peer_saved", fx / "adapter")
        (fx / "expected.json").write_text(json.dumps({"pairs": PAIRS, "logits": ans["peer_logits_of_own"],
                                                      "method": a.method}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if max(d1, d2, fusion.get("fusion_ours_to_adapters_max_abs_diff", 0.0),
                      fusion.get("fusion_adapters_to_ours_max_abs_diff", 0.0)) < 1e-4 else 1)


if __name__ == "__main__":
    main()
