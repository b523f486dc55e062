"""What MT-Uncertainty keeps from a multi-task run as it is now, and why (Pilault et al. 2021,
Sec. 3.3): per task, the mean normalised entropy of random training candidates, the task's
weight (its mean over the largest task mean) and its share of the kept examples
(`sampling.uncertainty_profile`), scored with the run's own scorer in train mode, as the run
scores them. Reads a finished run's weights, or a running (or stopped) run's latest checkpoint.
Explains a run's `sampling_share` (log.jsonl, metrics.json): which tasks the sampler feeds.

    ADAPTERBENCH_DATA_DIR=../shared/data/glue python scripts/uncertainty_probe.py RUN_DIR [--draws 10]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from adapterbench.data import load_splits
from adapterbench.errors import UserError
from adapterbench.fileio import load_tensors, read_json
from adapterbench.recipe.sampling import DEFAULT_PROXIES, uncertainty_profile
from adapterbench.recipe.runmodel import build_model, load_run_model, run_tasks, stored_config
from adapterbench.recipe.splits import prepare_items
from adapterbench.recipe.stages import uncertainty_scorer
from adapterbench.recipe.checkpoint import restore


def load(folder: Path):
    """(cfg, tasks, model, tokenizer, where the weights came from)."""
    if read_json(folder / "metrics.json").get("status") == "ok":
        cfg, tasks, model, tokenizer, _ = load_run_model(folder)
        return cfg, tasks, model, tokenizer, "the finished run"
    latest = folder / "checkpoint" / "latest.json"
    if not latest.is_file():
        raise UserError(f"{folder} is neither finished nor checkpointed (no {latest}): wait for its first "
                        f"checkpoint (train.checkpoint_minutes), or probe a finished run")
    name = json.loads(latest.read_text())["checkpoint"]
    with tempfile.TemporaryDirectory() as tmp:          # a copy: the run may replace its checkpoint meanwhile
        weights = Path(shutil.copy(folder / "checkpoint" / name / "weights.safetensors", tmp))
        cfg = stored_config(folder)
        tasks = run_tasks(folder, cfg)
        model, tokenizer = build_model(cfg, tasks)
        restore(model, load_tensors(weights))
    return cfg, tasks, model, tokenizer, f"checkpoint {name}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a multi-task run folder (finished, or with a checkpoint)")
    ap.add_argument("--draws", type=int, default=10, help="how many steps' candidates to score")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        cfg, tasks, model, tokenizer, source = load(a.run)
        if len(tasks) < 2:
            raise UserError(f"{a.run} is a single-task run: MT-Uncertainty chooses between the tasks of a "
                            f"multi-task run (adapterbench multitask)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    items = [prepare_items(t, load_splits(t, cfg.data.data_dir, ("train",)), tokenizer, cfg, i)["train"]
             for i, t in enumerate(tasks)]
    model.train()                                          # dropout on, as the run scores
    scorer = uncertainty_scorer(model, tasks, cfg, cfg.seed)
    proxies = {**DEFAULT_PROXIES, **cfg.sampling.uncertainty_proxy}
    profile = uncertainty_profile(items, tasks, scorer, cfg.train.batch_size, proxies, a.draws)
    print(f"{a.run} ({source}); {a.draws} draws of {cfg.train.batch_size} candidates per task\n")
    print("| task | mean normalised entropy | weight | share of the kept examples |")
    print("|---|---|---|---|")
    for name, p in profile.items():
        fmt = lambda v: "–" if v is None else f"{v:.3f}"
        print(f"| {name} | {fmt(p['entropy'])} | {fmt(p['weight'])} | {100 * p['kept']:.1f}% |")


if __name__ == "__main__":
    main()
