"""Runs inside .peer-venv (transformers 4.57.6 + adapters 1.3.0); called by scripts/fusion_gain.py.
Trains the `adapters` library's own AdapterFusion (Pfeiffer et al. 2021, Sec. 3.2; the library's
default "dynamic" fusion config) over adapters exported by adapterbench (`export --no-head`),
with the budget the job gives, and answers with the dev predictions and the mean fusion attention
per layer and source after every epoch. The loop is written out (not AdapterTrainer) so that its
budget is exactly the job's: AdamW (no decay on biases and norms), linear warm-up and decay,
gradient clipping, the library's fusion regularisation added to the loss; bf16 autocast for
training when the job says so, dev scored in fp32.

The head is the job's choice: `library` is the library's default classification head (first
token, dense + tanh + dropout + output), `mean` the same two layers over the mean of the unpadded
tokens (what adapterbench uses for all-MiniLM-L6-v2).
  .peer-venv/bin/python scripts/peer/fusion_peer.py job.json answer.json"""

import json
import math
import random
import sys
import time

import torch
from adapters import AutoAdapterModel
from adapters.composition import Fuse
from torch import nn
from transformers import AutoTokenizer


class MeanHead(nn.Module):
    """dense + tanh + output over the mean of the unpadded tokens (dropout before each layer)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, hidden, mask):
        m = mask.to(hidden.dtype).unsqueeze(-1)
        x = self.dropout((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
        return self.out(self.dropout(torch.tanh(self.dense(x))))


def build(job):
    model = AutoAdapterModel.from_pretrained(job["model"])
    names = [model.load_adapter(d, use_safetensors=True, with_head=False, load_as=n)
             for n, d in zip(job["source_names"], job["sources"])]
    fuse = Fuse(*names)
    model.add_adapter_fusion(fuse, config=job.get("fusion_config", "dynamic"))
    head = None
    if job["head"] == "library":
        model.add_classification_head(fuse.name, num_labels=job["num_labels"])
    else:
        head = MeanHead(model.config.hidden_size, job["num_labels"])
    model.train_adapter_fusion(fuse)          # base model and adapters frozen; fusion (and head) train
    model.set_active_adapters(fuse)
    return model, head, fuse


def batches(tok, examples, size, order):
    for i in range(0, len(order), size):
        chunk = [examples[j] for j in order[i:i + size]]
        enc = tok([e["text"][0] for e in chunk], [e["text"][1] for e in chunk] if len(chunk[0]["text"]) > 1 else None,
                  padding=True, truncation=True, max_length=128, return_tensors="pt")
        yield enc, torch.tensor([e["label"] for e in chunk])


def logits_of(model, head, enc, attentions=False):
    out = model(**enc, output_adapter_fusion_attentions=attentions)   # the library's head, or the encoder's output
    logits = out.logits if head is None else head(out.last_hidden_state, enc["attention_mask"])
    return logits, (out["adapter_fusion_attentions"] if attentions else None)


def evaluate(job, model, head, fuse, tok, examples):
    """Dev predictions and the mean attention per layer and source over the unpadded tokens, in
    fp32 (the library turns fusion attentions into numpy arrays, which have no bfloat16)."""
    model.eval()
    head is not None and head.eval()
    preds, sums, count = [], {}, 0.0
    with torch.no_grad():
        for enc, _ in batches(tok, examples, 64, list(range(len(examples)))):
            logits, att = logits_of(model, head, enc, attentions=True)
            preds += logits.float().argmax(-1).tolist()
            mask = enc["attention_mask"].float()
            count += float(mask.sum())
            for layer, sites in att[fuse.name].items():
                for site, a in sites.items():
                    a = torch.as_tensor(a).float()          # batch x tokens x sources
                    s = (a * mask.unsqueeze(-1)).sum((0, 1))
                    key = f"{layer}.{site}"
                    sums[key] = sums.get(key, 0) + s
    attention = {k: (v / count).tolist() for k, v in sorted(sums.items(), key=lambda kv: int(kv[0].split(".")[0]))}
    return preds, attention


def main():
    job = json.load(open(sys.argv[1]))
    random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    tok = AutoTokenizer.from_pretrained(job["model"])
    model, head, fuse = build(job)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params += [(f"mean_head.{n}", p) for n, p in (head.named_parameters() if head is not None else [])]
    no_decay = [p for n, p in params if p.ndim < 2 or "norm" in n.lower()]
    decay = [p for n, p in params if not (p.ndim < 2 or "norm" in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": job["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=job["lr"])
    train, dev = job["train"], job["dev"]
    steps = job["epochs"] * math.ceil(len(train) / job["batch_size"])
    warm = int(job["warmup_ratio"] * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    bf16 = job.get("precision") == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else \
        (lambda: torch.autocast("cpu", enabled=False))
    loss_fn = nn.CrossEntropyLoss()
    history, start = [], time.time()
    for epoch in range(job["epochs"]):
        model.train()
        head is not None and head.train()
        order = list(range(len(train)))
        random.shuffle(order)
        losses = []
        for enc, labels in batches(tok, train, job["batch_size"], order):
            with autocast():
                logits, _ = logits_of(model, head, enc)
                loss = loss_fn(logits.float(), labels)
            reg = model.get_fusion_regularization_loss()
            total = loss + reg if reg is not None else loss
            opt.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], job["max_grad_norm"])
            opt.step()
            sched.step()
            losses.append(loss.item())
        preds, attention = evaluate(job, model, head, fuse, tok, dev)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "predictions": preds,
                        "attention": attention, "seconds": round(time.time() - start, 1)})
        print(f"epoch {epoch + 1}/{job['epochs']} loss {history[-1]['train_loss']:.4f}", flush=True)
    json.dump({"history": history, "trainable": sum(p.numel() for _, p in params),
               "adapters_version": __import__("adapters").__version__}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
