"""What AdapterFusion gains over the single adapter: ours against the `adapters` library's fusion,
trained over the *same* source adapters with the same budget (Pfeiffer et al. 2021, Table 1:
Fusion w/ ST-A against ST-A). Separates the fusion stage (attention layer, head, loop) from the
sources: if the library's fusion over our sources gains what ours gains, the sources explain a
difference from the library's published gains; if it gains more, our fusion stage does.

Given a finished adapterbench fusion run, this
  1. exports its source adapters in AdapterHub's format (`adapterbench export --no-head`);
  2. gives the task's training examples (the run's own subsample, if it had train.limit) and dev
     set to scripts/peer/fusion_peer.py in .peer-venv, which trains the library's fusion with the
     run's budget (lr, epochs, batch size, warm-up, weight decay, clipping, precision, seed), once
     per --heads entry (library: its first-token head; mean: the same head over mean-pooled tokens);
  3. scores every epoch with adapterbench's metric code and keeps the best epoch on dev, as ours;
  4. writes OUT/fusion_gain.json and prints: the single adapter (the source trained on the task),
     our fusion, each library fusion, their gains, and the attention on the task's own adapter.
Needs .peer-venv (bash scripts/make_peer_venv.sh; or ADAPTERBENCH_PEER_PYTHON names its python). Several minutes per head on CPU for RTE.
  python scripts/fusion_gain.py RUN_DIR [--heads library,mean] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(os.environ.get("ADAPTERBENCH_PEER_PYTHON") or ROOT / ".peer-venv" / "bin" / "python")


def find(path: str, run: Path) -> Path:
    """A source folder as the run's config names it (absolute, from here, or from where the study ran)."""
    from adapterbench.records import find_from
    found = find_from(path, run)
    if found is None:
        sys.exit(f"{path}: source adapter folder not found from here or above {run}")
    return found.resolve()


def metrics_json(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def own_attention(history_entry: dict, names: list[str], task: str) -> list[float]:
    """Mean attention on the task's own adapter, per layer (the library's sites, in layer order)."""
    i = names.index(task)
    return [round(v[i], 3) for v in history_entry["attention"].values()]


def our_own_attention(run: Path, best_epoch: int, index: int) -> list[float]:
    """Our fusion's mean attention on source `index` per site at the best epoch (log.jsonl)."""
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("epoch") == best_epoch and "modules" in rec:
            sites = sorted({k.split("/")[0] for k in rec["modules"]}, key=lambda x: int(x[4:]))
            return [round(rec["modules"][f"{site}/attention/source_{index}"], 3) for site in sites]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished adapterbench fusion run folder")
    ap.add_argument("--heads", default="library,mean")
    ap.add_argument("--out", type=Path, default=None, help="default: RUN/fusion_gain")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    from adapterbench import metrics as M
    from adapterbench.interop.adapterhub import export
    from adapterbench.data import load_splits
    from adapterbench.recipe.splits import subsample
    from adapterbench.models import resolve_model_path
    from adapterbench.tasks import load_task

    if not PEER.is_file():
        sys.exit(f"no peer interpreter at {PEER}: bash scripts/make_peer_venv.sh (or set ADAPTERBENCH_PEER_PYTHON)")
    run = a.run.resolve()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ours = metrics_json(run)
    if cfg["method"]["name"] != "fusion" or ours.get("status") != "ok":
        sys.exit(f"{run}: not a finished fusion run")
    out = a.out or run / "fusion_gain"
    task = load_task(cfg["task"])
    if task.regression:
        sys.exit(f"{task.name}: a regression target; this comparison takes classification tasks")
    sources = [find(p, run) for p in cfg["method"]["adapters"]]
    names = [metrics_json(s)["task"] for s in sources]
    own = sources[names.index(task.name)]
    single = metrics_json(own)
    if yaml.safe_load((own / "config.yaml").read_text())["train"].get("eval_limit", 0) != cfg["train"].get("eval_limit", 0):
        print(f"warning: {own} was scored on another dev subset (train.eval_limit) than the fusion run", file=sys.stderr)
    hub = []
    for s, n in zip(sources, names):
        target = out / "sources" / n
        if not (target / "adapter.safetensors").is_file():
            export(s, target, name=n, force=True, with_head=False)
        hub.append(str(target))
    splits = load_splits(task, cfg["data"].get("data_dir"), ("train", "dev"))
    seed = cfg["seed"]
    data_seed = cfg["data"].get("data_seed") if cfg["data"].get("data_seed") is not None else seed
    train = subsample(splits["train"], cfg["train"].get("limit", 0), data_seed)
    dev = splits["dev"]
    t = cfg["train"]
    result = {"run": os.path.relpath(run), "task": task.name, "seed": seed, "metric": task.main_metric,
              "single": single["main_value"], "ours": ours["main_value"], "sources": names, "library": {},
              "ours_own_attention_per_layer": our_own_attention(run, ours.get("best_epoch", -1), names.index(task.name))}
    for head in a.heads.split(","):
        job = {"model": resolve_model_path(cfg["model"]["name"]), "sources": hub, "source_names": names,
               "head": head, "num_labels": len(task.labels), "seed": seed, "lr": t["lr"], "epochs": t["epochs"],
               "batch_size": t["batch_size"], "warmup_ratio": t["warmup_ratio"], "weight_decay": t["weight_decay"],
               "max_grad_norm": t["max_grad_norm"], "precision": t.get("precision", "fp32"),
               "train": [{"text": list(e["text"]), "label": e["label"]} for e in train],
               "dev": [{"text": list(e["text"]), "label": e["label"]} for e in dev]}
        if a.threads:
            job["threads"] = a.threads
        job_file, answer_file = out / f"job-{head}.json", out / f"answer-{head}.json"
        job_file.write_text(json.dumps(job))
        subprocess.run([str(PEER), str(ROOT / "scripts" / "peer" / "fusion_peer.py"), str(job_file),
                        str(answer_file)], check=True)
        answer = json.loads(answer_file.read_text())
        labels = [e["label"] for e in dev]
        scores = [M.compute([task.main_metric], labels, h["predictions"])[task.main_metric] for h in answer["history"]]
        best = max(range(len(scores)), key=lambda i: scores[i])
        result["library"][head] = {"per_epoch": scores, "best_epoch": best, "best": scores[best],
                                   "own_attention_per_layer": own_attention(answer["history"][best], names, task.name),
                                   "seconds": answer["history"][-1]["seconds"], "trainable": answer["trainable"],
                                   "adapters_version": answer["adapters_version"]}
    (out / "fusion_gain.json").write_text(json.dumps(result, indent=1))
    print(f"{task.name} seed {seed} ({task.main_metric}, dev, best epoch): single adapter {result['single']:.2f}")
    print(f"  ours    fusion {result['ours']:.2f}  gain {result['ours'] - result['single']:+.2f}  "
          f"(own adapter's attention per layer {result['ours_own_attention_per_layer']})")
    for head, r in result["library"].items():
        print(f"  library fusion, {head} head {r['best']:.2f}  gain {r['best'] - result['single']:+.2f}  "
              f"(own adapter's attention per layer {r['own_attention_per_layer']})")
    print(f"written: {out / 'fusion_gain.json'}")


if __name__ == "__main__":
    main()
