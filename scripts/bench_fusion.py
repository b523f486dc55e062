"""Fusion cost benchmark (issue: AdapterFusion): training and inference samples/s and peak
memory of fusion over N = 1, 2, 4, 8, 16 adapters against the bare model, a single Pfeiffer
adapter and full fine-tuning, at one fixed shape, measured side by side in one run.

Each configuration runs in its own subprocess so that its peak memory (ru_maxrss) is its
own. Ratios are the numbers to quote; absolute times on a shared CPU are noisy.

    HF_HUB_OFFLINE=1 python scripts/bench_fusion.py [--model minilm-l6] [--batch 32] [--seq 128]
        [--steps 5] [--ns 1,2,4,8,16] [--out bench_fusion.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, n: int, model_name: str, batch: int, seq: int, steps: int, train: bool) -> dict:
    """One configuration, in this process: samples/s and peak RSS."""
    import torch
    from adapterbench.methods import fusion, get_method, method_config
    from adapterbench.methods.bottleneck import add_adapter, BottleneckConfig
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel, load_encoder

    torch.manual_seed(0)
    enc, _ = load_encoder(model_name)
    if kind == "full":
        enc.requires_grad_(True)
    elif kind == "pfeiffer":
        get_method("pfeiffer").apply(enc, method_config({"name": "pfeiffer"}), "a")
    elif kind == "fusion":
        enc.requires_grad_(False)
        for i in range(n):
            add_adapter(enc, BottleneckConfig(placement="pfeiffer"), f"a{i}")
        enc.requires_grad_(False)
        for site in fusion.sites(enc):
            site.mixer = fusion.FusionMixer(enc.config.hidden_size, fusion.Config())
    else:  # bare
        enc.requires_grad_(False)
    model = TaskModel(enc, ClassificationHead(HeadConfig(enc.config.hidden_size, 2)))
    ids = torch.randint(1000, 20000, (batch, seq))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if train else None
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if train:
            model.train()
            loss = model.loss(model(ids, mask), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                model(ids, mask)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "n": n, "mode": "train" if train else "infer", "seconds_per_step": dt,
            "samples_per_s": batch / dt, "tokens_per_s": batch * seq / dt,
            "peak_rss_mib": peak / 1024, "peak_over_loaded_mib": (peak - base_rss) / 1024,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ns", default="1,2,4,8,16")
    ap.add_argument("--out", default="bench_fusion.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # kind:n:mode, run in a subprocess
    a = ap.parse_args()
    if a.one:
        kind, n, mode = a.one.split(":")
        print(json.dumps(measure(kind, int(n), a.model, a.batch, a.seq, a.steps, mode == "train")))
        return
    plan = [("bare", 0, "infer"), ("pfeiffer", 1, "infer"), ("pfeiffer", 1, "train"), ("full", 0, "train")]
    for n in map(int, a.ns.split(",")):
        plan += [("fusion", n, "train"), ("fusion", n, "infer")]
    rows = []
    for kind, n, mode in plan:
        cmd = [sys.executable, __file__, "--one", f"{kind}:{n}:{mode}", "--model", a.model,
               "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"{kind:9s} N={n:<2d} {mode:5s} {rows[-1]['samples_per_s']:7.2f} samples/s  "
              f"peak {rows[-1]['peak_rss_mib']:7.0f} MiB", flush=True)
    print_table(rows, a)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=2)


def print_table(rows: list[dict], a) -> None:
    get = {(r["kind"], r["n"], r["mode"]): r for r in rows}
    bare = get[("bare", 0, "infer")]
    single = get[("pfeiffer", 1, "train")]
    print(f"\nshape {a.batch} x {a.seq}, model {a.model}; ratios against the bare forward (infer) "
          f"and a single Pfeiffer adapter (train)\n")
    print("| config | train samples/s | x single adapter | infer samples/s | x bare model | "
          "train peak MiB | x single adapter |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bare model | - | - | {bare['samples_per_s']:.2f} | 1.00 | - | - |")
    print(f"| pfeiffer | {single['samples_per_s']:.2f} | 1.00 | {get[('pfeiffer', 1, 'infer')]['samples_per_s']:.2f} | "
          f"{get[('pfeiffer', 1, 'infer')]['samples_per_s'] / bare['samples_per_s']:.2f} | "
          f"{single['peak_rss_mib']:.0f} | 1.00 |")
    full = get[("full", 0, "train")]
    print(f"| full fine-tuning | {full['samples_per_s']:.2f} | {full['samples_per_s'] / single['samples_per_s']:.2f} "
          f"| - | - | {full['peak_rss_mib']:.0f} | {full['peak_rss_mib'] / single['peak_rss_mib']:.2f} |")
    for (kind, n, mode), r in sorted(get.items(), key=lambda kv: kv[0][1]):
        if kind != "fusion" or mode != "train":
            continue
        inf = get[("fusion", n, "infer")]
        print(f"| fusion N={n} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / single['samples_per_s']:.2f} | "
              f"{inf['samples_per_s']:.2f} | {inf['samples_per_s'] / bare['samples_per_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / single['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
