"""Runs inside .peer-venv (transformers 4.57.6 + adapters 1.3.0); called by
scripts/parity_adapterhub.py. Reads a JSON job, writes a JSON answer:
  1. load adapterbench's export with the `adapters` library, give its logits on the inputs;
  2. make an adapter of its own (seq_bn / double_seq_bn, random non-trivial weights, a head),
     save it with save_adapter, give its logits on the same inputs."""

import json
import sys

import torch
from adapters import AutoAdapterModel
from transformers import AutoTokenizer


def logits(model, tok, pairs):
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.tolist()


def fusion_logits(job, tok):
    """adapterbench's exported fusion: its source adapters, the fusion layer and the head."""
    from adapters.composition import Fuse
    model = AutoAdapterModel.from_pretrained(job["model"]).eval()
    names = [model.load_adapter(d, use_safetensors=True, with_head=False) for d in job["fusion_sources"]]
    model.load_adapter_fusion(job["fusion_dir"], use_safetensors=True, set_active=True)
    model.load_head(job["head_dir"], use_safetensors=True)
    model.set_active_adapters(Fuse(*names))
    return logits(model, tok, job["pairs"])


def own_fusion(job, tok):
    """A fusion of the library's own: two seq_bn adapters, Fuse, a head, random non-trivial
    weights; saved as save_adapter / save_adapter_fusion / save_head write it."""
    from adapters.composition import Fuse
    model = AutoAdapterModel.from_pretrained(job["model"]).eval()
    for name in ("a", "b"):
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(Fuse("a", "b"))
    model.add_classification_head("a,b", num_labels=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("adapters.a.", "adapters.b.", "adapter_fusion_layer", "heads.a,b")):
                p.add_(torch.randn_like(p) * 0.05)
    model.set_active_adapters(Fuse("a", "b"))
    model.eval()
    out = job["make_fusion_dir"]
    import os
    os.makedirs(out, exist_ok=True)
    model.save_adapter(f"{out}/a", "a", with_head=False, use_safetensors=True)
    model.save_adapter(f"{out}/b", "b", with_head=False, use_safetensors=True)
    model.save_adapter_fusion(f"{out}/fusion", "a,b", use_safetensors=True)
    model.save_head(f"{out}/head", "a,b", use_safetensors=True)
    return logits(model, tok, job["pairs"])


def main():
    job = json.load(open(sys.argv[1]))
    tok = AutoTokenizer.from_pretrained(job["model"])
    answer = {}
    if job.get("make_fusion_dir"):
        answer["peer_logits_of_own_fusion"] = own_fusion(job, tok)
        json.dump(answer, open(sys.argv[2], "w"))
        return
    if job.get("fusion_dir"):
        answer["peer_logits_of_fusion"] = fusion_logits(job, tok)
        json.dump(answer, open(sys.argv[2], "w"))
        return
    model = AutoAdapterModel.from_pretrained(job["model"]).eval()
    name = model.load_adapter(job["export_dir"], use_safetensors=True, with_head=True)
    model.set_active_adapters(name)
    answer["peer_logits_of_export"] = logits(model, tok, job["pairs"])

    model = AutoAdapterModel.from_pretrained(job["model"]).eval()
    model.add_adapter("peer", config=job["peer_config"])
    model.add_classification_head("peer", num_labels=job["num_labels"])
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters.peer" in n or "heads.peer" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.set_active_adapters("peer")
    model.eval()
    answer["peer_logits_of_own"] = logits(model, tok, job["pairs"])
    model.save_adapter(job["peer_save_dir"], "peer", use_safetensors=job.get("safetensors", True))
    json.dump(answer, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
