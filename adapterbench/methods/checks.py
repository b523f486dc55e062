"""`adapterbench check-method`: the method contract's checks, run on a tiny random BERT (hidden
32, 2 layers), the same ones every shipped method passes:

1. members: the contract's names and types (methods/contract.py);
2. identity at init: under IDENTITY_AT_INIT the model computes what the base model does;
3. trainable: a method that saves no weights trains nothing in the encoder; one that saves
   weights trains something, and saves at least what trains;
4. save -> load: the saved state loaded into a fresh model gives identical logits;
5. crash -> resume: a run killed after a checkpoint and resumed ends with identical weights.
Each check gives '' (passed) or one phrase saying what failed.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from adapterbench.errors import UserError

VOCAB = 40


def tiny_encoder(seed: int = 0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    enc = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64))
    return enc.eval()


def batch(seed: int = 0, n: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _sources(mod_names=("s0", "s1")):
    """Two random Pfeiffer adapters, for a method that fuses sources."""
    from adapterbench.methods import get_method, method_config
    from adapterbench.recipe.artifacts import Source
    pf, cfg = get_method("pfeiffer"), method_config({"name": "pfeiffer"})
    out = []
    for i, name in enumerate(mod_names):
        enc = tiny_encoder()
        torch.manual_seed(10 + i)
        pf.apply(enc, cfg, [name])
        meta = {"method": asdict(cfg), "model_type": "bert", "hidden_size": 32, "base_model": "tiny",
                "num_layers": 2, "task": name}
        out.append(Source(f"/nowhere/{name}", name, meta, pf.trainable_state(enc, cfg, [name])))
    return out


def build(mod, name: str, seed: int = 0, **settings):
    """(TaskModel, cfg, task names) as a run builds it, on the tiny encoder."""
    from adapterbench.config import build as build_config
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel
    cfg = build_config(mod.Config, {"name": name, **settings}, where="method")
    names = ["t0", "t1"] if mod.STAGE == "multitask" else ["t0"]
    enc = tiny_encoder()
    torch.manual_seed(seed)
    mod.apply(enc, cfg, names, _sources() if "adapters" in mod.Config.__dataclass_fields__ else ())
    heads = {n: ClassificationHead(HeadConfig(32, 3)) for n in names}
    return TaskModel(enc, heads, getattr(mod, "set_tasks", None)), cfg, names


def _logits(model, names, inputs):
    ids = torch.arange(inputs["input_ids"].shape[0]) % len(names)
    with torch.no_grad():
        out = model(**inputs, task_ids=ids)
    return torch.cat([out[i][1] for i in sorted(out)])


def check_identity(mod, name: str) -> str:
    if mod.IDENTITY_AT_INIT is None:
        return ""
    model, _, names = build(mod, name, **mod.IDENTITY_AT_INIT)
    model.eval()
    inputs = batch()
    if hasattr(mod, "set_tasks"):            # multi-task methods route each example by its task
        mod.set_tasks(model.encoder, torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long))
    with torch.no_grad():
        want = tiny_encoder()(**inputs).last_hidden_state
        got = model.encoder(**inputs).last_hidden_state
    diff = float((got - want).abs().max())
    return "" if diff < 1e-5 else (f"identity at init: under IDENTITY_AT_INIT={mod.IDENTITY_AT_INIT} the encoder "
                                   f"differs from the base model by {diff:.2e}")


def check_trainable(mod, name: str) -> str:
    model, cfg, names = build(mod, name)
    trainable = {n: p for n, p in model.encoder.named_parameters() if p.requires_grad}
    if mod.ARTIFACT.weights is None:
        return "" if not trainable else (f"trainable: ARTIFACT saves no weights, but {len(trainable)} encoder "
                                         f"parameters train (e.g. {next(iter(trainable))})")
    if not trainable:
        return "trainable: nothing in the encoder trains, yet ARTIFACT saves weights"
    saved = sum(v.numel() for v in mod.trainable_state(model.encoder, cfg, names).values())
    trains = sum(p.numel() for p in trainable.values())
    return "" if saved >= trains else (f"trainable: {trains} parameters train but trainable_state saves only "
                                       f"{saved}: a resumed or reloaded run would lose weights")


def check_save_load(mod, name: str) -> str:
    model, cfg, names = build(mod, name)
    model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = batch(2)
    want = _logits(model, names, inputs)
    state = {k: v.clone() for k, v in mod.trainable_state(model.encoder, cfg, names).items()}
    other, _, _ = build(mod, name, seed=5)      # another random init: everything must come from the state
    mod.load_state(other.encoder, cfg, names, state)
    for n in names:
        other.heads[n].load_state_dict(model.heads[n].state_dict())
    other.eval()
    diff = float((_logits(other, names, inputs) - want).abs().max())
    return "" if diff == 0 else f"save -> load: the reloaded model's logits differ by {diff:.2e}"


class _Crash(Exception):
    pass


def check_resume(mod, name: str) -> str:
    from adapterbench.config import TrainConfig
    from adapterbench.data import Collator
    from adapterbench.recipe.sampling import Shuffled, TaskMixture
    from adapterbench.recipe.train import train
    from adapterbench.tasks import TaskSpec
    g = torch.Generator().manual_seed(0)
    items = [[{"input_ids": torch.randint(5, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                                          generator=g).tolist(), "labels": float(j % 3), "task_id": t, "uid": j}
              for j in range(12)] for t in range(2)]
    for x in items:
        for it in x:
            it["attention_mask"] = [1] * len(it["input_ids"])
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, eval_batch_size=8, checkpoint_every=2, log_every=1,
                      log_with=["none"])

    def go(folder: Path, crash_at: int | None = None) -> dict:
        model, _, names = build(mod, name)
        tasks = [TaskSpec(name=n, labels=["a", "b", "c"]) for n in names]
        source = TaskMixture(items, 4, 0, "uniform") if len(names) > 1 else Shuffled(items[0], 4, 0)

        def log(record):
            if crash_at and record.get("step") == crash_at and "loss" in record:
                raise _Crash
        train(model, source, [x[:6] for x in items[:len(names)]], tasks, Collator(0), cfg, log, False, folder,
              heldout_sets=[x[6:] for x in items[:len(names)]])
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    with tempfile.TemporaryDirectory() as tmp:
        want = go(Path(tmp) / "a")
        try:
            go(Path(tmp) / "b", crash_at=5)
            return "crash -> resume: the crash at step 5 did not happen (the loop logs no steps?)"
        except _Crash:
            pass
        got = go(Path(tmp) / "b")
    bad = [k for k in want if k not in got or not torch.equal(want[k], got[k])]
    return "" if not bad else f"crash -> resume: weights differ after resuming ({len(bad)} tensors, e.g. {bad[0]})"


CHECKS = (("identity at init", check_identity), ("trainable", check_trainable), ("save -> load", check_save_load),
          ("crash -> resume", check_resume))


def run_checks(mod, name: str, shipped: bool = False) -> list[str]:
    """Every failed check, one phrase each (empty: all passed)."""
    from adapterbench.methods.plugins import contract_problems
    problems = [p for p in contract_problems(mod) if not (shipped and p.startswith("STAGE must be"))]
    if problems:
        return [f"members: {p}" for p in problems]     # the other checks need the members
    failed = []
    for label, check in CHECKS:
        try:
            why = check(mod, name)
        except UserError as e:
            why = f"{label}: {e}"
        except Exception as e:   # the user's code raised: say where, no traceback
            why = f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if why:
            failed.append(why)
    return failed
