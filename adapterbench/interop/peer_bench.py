"""Runs inside .peer-venv (transformers 4.57.6 + adapters 1.3.0); called by
`adapterbench bench --peer`. One measurement per process: a JSON job on stdin (the same
configuration, mode and shape as our side), a JSON row on stdout.

Configurations in the peer's own terms: pfeiffer = "seq_bn", houlsby = "double_seq_bn",
merged = average_adapter of two seq_bn adapters, fusionN = Fuse over N seq_bn adapters trained
with train_adapter_fusion, head = a flex head on the frozen model, full = everything trains."""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from adapters import AutoAdapterModel
from adapters.composition import Fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the folder holding the adapterbench package
from adapterbench.interop.bench import Spec, fixed_batches, pad_batches  # noqa: E402  (torch only, no transformers)


def build(config, model_dir):
    torch.manual_seed(0)
    model = AutoAdapterModel.from_pretrained(model_dir)
    if config == "bare":
        model.requires_grad_(False)
        return model
    model.add_classification_head("a", num_labels=2)
    if config == "full":
        model.requires_grad_(True)
    elif config == "head":
        model.requires_grad_(False)
        model.heads["a"].requires_grad_(True)
    elif config in ("pfeiffer", "houlsby"):
        model.add_adapter("a", config="seq_bn" if config == "pfeiffer" else "double_seq_bn")
        model.train_adapter("a")
    elif config == "merged":
        model.add_adapter("x", config="seq_bn")
        model.add_adapter("y", config="seq_bn")
        model.average_adapter("a", ["x", "y"])
        model.train_adapter("a")
    elif config.startswith("fusion"):
        names = [f"a{i}" for i in range(int(config[len("fusion"):]))]
        for n in names:
            model.add_adapter(n, config="seq_bn")
        model.add_adapter_fusion(Fuse(*names))
        model.train_adapter_fusion(Fuse(*names))
    else:
        raise SystemExit(f"unknown config {config}")
    model.active_head = "a"
    return model


def batches_for(job, vocab_size):
    """The same batches as our side: adapterbench's batch helpers are plain torch."""
    spec = Spec(**job["spec"])
    if spec.task:
        pad_to = spec.seq_len if spec.pad_to_max else None
        return pad_batches(job["ids"], job["labels"], spec.batch_size, pad_to, job.get("pad_id", 0))
    return fixed_batches(spec, vocab_size, spec.warmup + spec.steps)


def main():
    job = json.loads(sys.stdin.read())
    spec, config, train = job["spec"], job["config"], job["mode"] == "train"
    model = build(config, job["model_dir"])
    batches = batches_for(job, model.config.vocab_size)
    model.train(train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if train and params else None
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step(batch):
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if not train:
            with torch.no_grad():
                model(**inputs)
            return
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[: spec["warmup"]]:
        step(b)
    timed = batches[spec["warmup"]:]
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples = sum(b["input_ids"].shape[0] for b in timed)
    print(json.dumps({"side": "peer", "config": config, "mode": job["mode"], "samples_per_s": samples / dt,
                      "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in timed) / dt,
                      "padded_tokens_per_s": sum(b["input_ids"].numel() for b in timed) / dt,
                      "seconds_per_step": dt / len(timed), "peak_mib": peak,
                      "peak_over_loaded_mib": peak - base_rss / 1024,
                      "trainable": sum(p.numel() for p in params), "device": "cpu"}))


if __name__ == "__main__":
    main()
