"""Padding on the real GLUE tasks: tokens processed per epoch when every batch is padded to
128 (the peer's GLUE example script), to its longest member (our dynamic padding), and to
its longest member with length-grouped batches (train.group_by_length=true).

    ADAPTERBENCH_DATA_DIR=../shared/data/glue python scripts/padding_report.py [--batch 32]
"""

import argparse
import os

import torch

from adapterbench.data import load_splits, tokenize

from adapterbench.recipe.splits import padding_stats
from adapterbench.recipe.sampling import length_grouped
from adapterbench.models import load_encoder
from adapterbench.tasks import load_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2,wnli,cb,sick")
    a = ap.parse_args()
    _, tok = load_encoder("minilm-l6")
    print("| task | train examples | mean tokens | pad share, fixed 128 | pad share, dynamic | "
          "pad share, grouped | tokens vs fixed: dynamic | grouped |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.tasks.split(","):
        task = load_task(name)
        items = tokenize(load_splits(task, os.environ.get("ADAPTERBENCH_DATA_DIR"), ("train",))["train"], tok, 128)
        lengths = [len(it["input_ids"]) for it in items]
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        random_batches = [order[i:i + a.batch] for i in range(0, len(order), a.batch)]
        grouped = length_grouped(lengths, a.batch, torch.Generator().manual_seed(0))
        d, g = padding_stats(lengths, random_batches, 128), padding_stats(lengths, grouped, 128)
        print(f"| {name} | {len(lengths)} | {sum(lengths) / len(lengths):.1f} | {100 * d['pad_share_fixed']:.1f}% | "
              f"{100 * d['pad_share_dynamic']:.1f}% | {100 * g['pad_share_dynamic']:.1f}% | "
              f"{d['dynamic_tokens'] / d['fixed_tokens']:.2f}x | {g['dynamic_tokens'] / g['fixed_tokens']:.2f}x |")


if __name__ == "__main__":
    main()
