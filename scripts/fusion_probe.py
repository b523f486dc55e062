"""Why a fusion's attention spreads or concentrates (Pfeiffer et al. 2021, Sec. 3.2, Eq. 2-5):
per layer, on a finished fusion run's dev examples and with its own forward pass, how large the
source adapters' outputs z_n are against the site input x (||z_n|| / ||x||, per source), how much
they differ from one another (||z_n - mean z|| / ||x||), the spread of the scores s_n = q . k_n
across the sources (their standard deviation per token: the softmax can only move away from 1/N
as far as the scores differ) and the weights p = softmax(s) it gives (mean per source, mean of
the largest). Token means over the non-padding tokens. The mean weights are the run's
attention.csv when every dev example is read (`--examples 0`).

    ADAPTERBENCH_DATA_DIR=../shared/data/glue python scripts/fusion_probe.py RUN_DIR [--examples 128] [--json OUT]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from adapterbench.data import Collator, load_splits
from adapterbench.errors import UserError
from adapterbench.methods import fusion
from adapterbench.recipe.runmodel import load_run_model
from adapterbench.recipe.splits import prepare_items
from adapterbench.recipe.train import evaluate


class LayerStats:
    """Token sums of one site's quantities, filled by a forward hook on its FusionMixer."""

    def __init__(self, mixer):
        self.tokens, self.sums = 0.0, {}
        mixer.register_forward_hook(self.hook)

    def add(self, key: str, per_token: torch.Tensor, w: torch.Tensor) -> None:
        """per_token: (B, L) or (B, L, N); w: (B, L) token weights (the attention mask)."""
        w = w.unsqueeze(-1) if per_token.dim() == 3 else w
        total = (per_token.float() * w).sum((0, 1))
        self.sums[key] = self.sums.get(key, 0) + total

    @torch.no_grad()
    def hook(self, mixer, inputs, _output) -> None:
        x, adapters = inputs
        w = mixer.mask.to(torch.float32) if mixer.mask is not None else x.new_ones(x.shape[:2])
        x = x.float()
        z, scores = mixer.literal_scores(x, adapters)                        # z_n, s_n = q . k_n
        p = torch.softmax(scores / mixer.T, dim=-1)
        xn = x.norm(dim=-1).clamp_min(1e-12)
        self.add("ratio", z.norm(dim=-1) / xn.unsqueeze(-1), w)
        self.add("spread", (z - z.mean(2, keepdim=True)).norm(dim=-1).mean(-1) / xn, w)
        self.add("score_std", scores.std(-1), w)
        self.add("p", p, w)
        self.add("max_p", p.max(-1).values, w)
        self.tokens += float(w.sum())

    def means(self) -> dict:
        return {k: (v / self.tokens).tolist() for k, v in self.sums.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished fusion run folder (adapterbench fuse)")
    ap.add_argument("--examples", type=int, default=128, help="dev examples to read (0: all)")
    ap.add_argument("--json", type=Path, help="also write the per-layer means here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        cfg, tasks, model, tokenizer, _ = load_run_model(a.run)
        mixers = fusion.mixers(model.encoder)
        if not mixers:
            raise UserError(f"{a.run} is a {cfg.method.name} run, not a fusion run: probe an `adapterbench fuse` run")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    task = tasks[0]
    items = prepare_items(task, load_splits(task, cfg.data.data_dir, ("dev",)), tokenizer, cfg)["dev"]
    items = items[:a.examples] if a.examples > 0 else items
    layers = [LayerStats(m) for m in mixers]
    evaluate(model, [items], [task], Collator(tokenizer.pad_token_id or 0), cfg.train.eval_batch_size,
             cfg.train.precision)
    stats = [s.means() for s in layers]
    names = cfg.method.adapters
    print(f"{a.run}: {len(items)} dev examples of {task.name}; sources {', '.join(Path(n).name for n in names)}\n")
    print("| layer | ||z_n||/||x|| (per source) | spread/||x|| | score std | mean weight (per source) | mean max weight |")
    print("|---|---|---|---|---|---|")
    for i, s in enumerate(stats):
        per = lambda v, f: " / ".join(f.format(x) for x in v)
        print(f"| {i} | {per(s['ratio'], '{:.3f}')} | {s['spread']:.3f} | {s['score_std']:.2f} | "
              f"{per(s['p'], '{:.2f}')} | {s['max_p']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"run": str(a.run), "examples": len(items), "sources": names,
                                      "layers": stats}, indent=1))


if __name__ == "__main__":
    main()
