"""Multi-task methods (mtl, mt-a, camtl) and task samplers."""

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.methods import camtl, method_config
from adapterbench.data import Collator
from adapterbench.recipe.sampling import pick_uncertain, task_probs
from adapterbench.recipe.stages import uncertainty_scorer
from adapterbench.tasks import TaskSpec

from .conftest import tiny_batch, tiny_encoder

runner = CliRunner()


def camtl_encoder(n_tasks=3, init="identity"):
    enc = tiny_encoder("bert")
    camtl.apply(enc, method_config({"name": "camtl", "max_length": 16, "init": init}), [f"t{i}" for i in range(n_tasks)])
    return enc.eval()


def run(enc, task_ids):
    camtl.set_tasks(enc, task_ids)
    with torch.no_grad():
        return enc(**tiny_batch()).last_hidden_state


def test_camtl_starts_as_the_base_model_and_then_depends_on_the_task():
    base = tiny_encoder("bert").eval()
    with torch.no_grad():
        want = base(**tiny_batch()).last_hidden_state
    enc = camtl_encoder()
    assert torch.allclose(run(enc, torch.tensor([0, 1, 2])), want, atol=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "map" in name or "camtl_attention" in name or "camtl" in name:
                p.add_(torch.randn_like(p) * 0.1)
    a = run(enc, torch.tensor([0, 0, 0]))
    b = run(enc, torch.tensor([1, 1, 1]))
    assert (a - b).abs().max() > 1e-3
    mixed = run(enc, torch.tensor([0, 1, 0]))   # each example conditioned on its own task
    assert torch.allclose(mixed[0], a[0], atol=1e-5) and torch.allclose(mixed[1], b[1], atol=1e-5)


def test_mtl_freeze_layers_freezes_what_camtl_freezes():
    """mtl's method.freeze_layers (the control for CA-MTL's freezing): unset, everything trains;
    -1, the embeddings and the lower half of the layers are frozen, as in camtl; out of range is
    one line naming the key."""
    from adapterbench.errors import UserError
    from adapterbench.methods import mtl

    def frozen(cfg, module=mtl):
        enc = tiny_encoder("bert")
        module.apply(enc, method_config(cfg), ["a", "b"])
        return {name.split(".")[0] + ("." + name.split(".")[2] if name.startswith("encoder.layer") else "")
                for name, p in enc.named_parameters() if not p.requires_grad}

    n = tiny_encoder("bert").config.num_hidden_layers
    assert n >= 2 and frozen({"name": "mtl"}) == set()
    lower = {"embeddings", *(f"encoder.{i}" for i in range(n // 2))}
    assert frozen({"name": "mtl", "freeze_layers": -1}) == lower
    assert lower <= frozen({"name": "camtl", "max_length": 16}, camtl)       # camtl freezes the same part
    assert frozen({"name": "mtl", "freeze_layers": 1}) == {"embeddings", "encoder.0"}
    with pytest.raises(UserError, match="method.freeze_layers 9"):
        frozen({"name": "mtl", "freeze_layers": 9})


def test_camtl_reference_init_scale_and_closeness_to_the_base_model():
    """As the reference code (BERT init): the task vector's norm is ~0.02^2 d^1.5, not the
    N(0, 1) embedding's ~sqrt(d) scale, and the model starts close to the base model."""
    torch.manual_seed(0)
    d = 384
    ctx = camtl.TaskContext(3, d)
    ctx.task_ids = torch.arange(3)
    norms = ctx.z().norm(dim=-1)
    assert (norms > 0.05).all() and (norms < 0.4).all()      # ~0.15 for d = 384 (N(0,1) gave ~11)
    base = tiny_encoder("bert").eval()
    with torch.no_grad():
        want = base(**tiny_batch()).last_hidden_state
    got = run(camtl_encoder(init="reference"), torch.tensor([0, 1, 2]))
    assert 0 < (got - want).abs().max() < 0.05


def test_camtl_conditional_layer_norm_modulates_the_weight():
    """Reference form: LN(x) with weight (1 + gamma_t) * w + beta_t and the pretrained bias."""
    torch.manual_seed(0)
    ctx = camtl.TaskContext(2, 8)
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    cln = camtl.CondLayerNorm(ln, camtl.FiLM(ctx, 8, 8))
    ctx.task_ids = torch.tensor([1, 0])
    x = torch.randn(2, 3, 8)
    gamma, beta = cln.film.gamma_beta()
    for i in range(2):
        w = (1 + gamma[i]) * ln.weight + beta[i]
        want = torch.nn.functional.layer_norm(x[i], (8,), w, ln.bias, ln.eps)
        assert torch.allclose(cln(x)[i], want, atol=1e-6)


def test_camtl_block_count_follows_the_reference_rule():
    assert camtl.blocks_of(method_config({"name": "camtl", "max_length": 128}), 768) == 6   # BERT-base: 6 blocks
    assert camtl.blocks_of(method_config({"name": "camtl", "max_length": 128}), 384) == 3   # MiniLM
    assert camtl.blocks_of(method_config({"name": "camtl", "max_length": 128, "attn_blocks": 4}), 384) == 4


@pytest.mark.parametrize("scheme,expected", [
    ("proportional", [0.1, 0.3, 0.6]), ("uniform", [1 / 3] * 3),
    ("temperature", np.sqrt([100, 300, 600]) / np.sqrt([100, 300, 600]).sum()),
])
def test_sampler_distributions(scheme, expected):
    p = task_probs([100, 300, 600], scheme, temperature=2.0)
    assert np.allclose(p, expected)
    draws = np.random.default_rng(0).choice(3, size=20000, p=p)
    counts = np.bincount(draws, minlength=3)
    assert chisquare(counts, np.asarray(expected) * 20000).pvalue > 0.01


def test_annealed_goes_from_proportional_to_flatter():
    first = task_probs([100, 900], "annealed", epoch=0, epochs=5)
    last = task_probs([100, 900], "annealed", epoch=4, epochs=5)
    assert np.allclose(first, [0.1, 0.9])
    assert np.allclose(last, np.array([100, 900]) ** 0.2 / (np.array([100, 900]) ** 0.2).sum())


class FakeModel(torch.nn.Module):
    """Logits given per example (in input_ids[:, 0]); two 2-class tasks and one regression."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))   # a device to read

    def forward(self, input_ids, task_ids=None, **_):
        conf = input_ids[:, 0].float() / 10.0        # 0 = uncertain ... 10 = confident
        out = {}
        for t in range(3):
            rows = (task_ids == t).nonzero().squeeze(-1)
            if rows.numel():
                logits = torch.stack([conf[rows] * 5, torch.zeros_like(conf[rows])], -1)
                out[t] = (rows, logits[:, 0] if t == 2 else logits)
        return out


def test_uncertainty_keeps_highest_entropy_examples():
    tasks = [TaskSpec("a", labels=["x", "y"]), TaskSpec("b", labels=["x", "y"]), TaskSpec("c", regression=True)]
    cands = []
    for t, confs in enumerate([[0, 10, 1], [10, 9, 0], [5, 5, 5]]):
        for c in confs:
            cands.append({"input_ids": [c, 1], "attention_mask": [1, 1], "labels": 0.0, "task_id": t, "uid": len(cands)})
    cfg = type("C", (), {"train": type("T", (), {"precision": "fp32"})})()
    entropy = uncertainty_scorer(FakeModel(), tasks, cfg, 0)(cands)
    assert entropy[6:].isnan().all()
    chosen = pick_uncertain(cands, entropy, 3, {})
    # normalised entropies: a (1.00, 0.06, 0.96), b (0.06, 0.09, 1.00); task factors a 1, b 0.57;
    # without a proxy the regression examples get the step's highest score (a's first, 1.0): the
    # four tie and the first three in candidate order are kept
    assert sorted(c["uid"] for c in chosen) == [0, 6, 7]
    # with a proxy (c borrows a's scores one to one): a's two uncertain examples and c's copies of them
    chosen = pick_uncertain(cands, entropy, 4, {2: 0})
    assert sorted(c["uid"] for c in chosen) == [0, 2, 6, 8]


def test_uncertainty_profile_says_what_the_sampler_keeps_and_why():
    """`uncertainty_profile` (scripts/uncertainty_probe.py): each task's mean entropy, its weight
    (mean over the largest mean) and its share of the kept examples, through `pick_uncertain`."""
    from adapterbench.recipe.sampling import uncertainty_profile
    tasks = [TaskSpec("a", labels=["x", "y"]), TaskSpec("b", labels=["x", "y"]), TaskSpec("r", regression=True)]
    h = {0: [0.9, 0.5], 1: [1.0, 0.2], 2: [0.0, 0.0]}          # each candidate's entropy, by task
    items = [[{"task_id": t, "h": v} for v in hs] for t, hs in h.items()]
    calls = []

    def scorer(cands, position):
        calls.append(position)
        return torch.tensor([float("nan") if tasks[c["task_id"]].regression else c["h"] for c in cands])

    got = uncertainty_profile(items, tasks, scorer, 2, {"r": "a"}, draws=3)
    assert calls == [0, 6, 12]                                  # each draw its own scoring position
    assert got["a"]["entropy"] == pytest.approx(0.7) and got["b"]["entropy"] == pytest.approx(0.6)
    assert got["a"]["weight"] == pytest.approx(1.0) and got["b"]["weight"] == pytest.approx(0.6 / 0.7)
    assert got["r"]["entropy"] is None and got["r"]["weight"] is None
    # weighted scores: a 0.9, 0.5; b 0.857, 0.171; r borrows a's one to one: 0.9 and 0.5 -> the
    # two kept are a's 0.9 and r's copy of it, whatever order the draws came in
    assert {n: v["kept"] for n, v in got.items()} == {"a": 0.5, "b": 0.0, "r": 0.5}
    # no proxy: r's candidates get the step's top score (0.9) and tie with a's; candidate
    # order keeps a's, then r's first
    plain = uncertainty_profile(items, tasks, scorer, 2, {}, draws=1)
    assert {n: v["kept"] for n, v in plain.items()} == {"a": 0.5, "b": 0.0, "r": 0.5}


def test_length_chunks_sort_and_cover_the_rows():
    from adapterbench.recipe.train import length_chunks
    rows, lengths = [10, 11, 12, 13, 14], [9, 3, 7, 3, 1]
    parts = length_chunks(rows, lengths, 2)
    assert parts == [[14, 11], [13, 12], [10]]      # by length, ties in their first order
    assert sorted(r for p in parts for r in p) == rows


def test_uncertainty_scores_do_not_depend_on_the_scoring_chunks(tiny_bert_dir, task_yamls):
    """Scoring a task's candidates in length-sorted chunks (each padded to its own longest)
    gives each candidate the entropy it gets in one batch padded to the longest of all:
    padding is masked, and every score lands on its own candidate."""
    from adapterbench.recipe import stages
    cfg = stages.resolve({"task": f"{task_yamls['toy']},{task_yamls['toyreg']}",
                          "model": {"name": str(tiny_bert_dir)}, "method": {"name": "camtl"},
                          "train": {"precision": "fp32"}}, "multitask")
    tasks = stages.tasks_of(cfg)
    model, _ = stages.build_model(cfg, tasks)
    gen = torch.Generator().manual_seed(0)
    cands = []
    for t in (0, 1):
        for n in torch.randint(3, 16, (7,), generator=gen).tolist():
            cands.append({"input_ids": [2] + torch.randint(5, 20, (n - 2,), generator=gen).tolist() + [3],
                          "attention_mask": [1] * n, "labels": 0, "task_id": t})
    model.eval()                                    # no dropout: the two ways must agree
    whole = uncertainty_scorer(model, tasks, cfg, 0, chunk=100)(cands)
    chunked = uncertainty_scorer(model, tasks, cfg, 0, chunk=2)(cands)
    assert whole[7:].isnan().all() and chunked[7:].isnan().all()      # toyreg: a regression task
    assert torch.allclose(whole[:7], chunked[:7], atol=1e-5)
    assert whole[:7].unique().numel() > 1               # the scores differ between candidates


def test_uncertainty_never_starves_a_regression_task(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A 3-task run under MT-Uncertainty (a classification task, a regression task borrowing
    its scores, a regression task without a proxy): every task is picked in every epoch, and
    the proxied regression task's share equals its proxy's within sampling noise; the probe
    script reads the finished run."""
    import yaml
    third = tmp_path / "toyreg2.yaml"
    spec = yaml.safe_load(open(task_yamls["toyreg"]))
    spec["name"] = "toyreg2"
    third.write_text(yaml.safe_dump(spec))
    tasks = f"{task_yamls['toy']},{task_yamls['toyreg']},{third}"
    r = runner.invoke(app, ["multitask", "--tasks", tasks, "--method", "mtl", "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "r"), "--sampling", "uncertainty",
                            "sampling.uncertainty_proxy={toyreg: toy}", "train.epochs=3", "train.batch_size=8"])
    assert r.exit_code == 0, r.output
    m = json.loads(next((tmp_path / "r").glob("multitask/mtl/*/*/metrics.json")).read_text())
    picks = m["picks_per_epoch"]
    assert all(all(n > 0 for n in per) for per in picks.values()), picks
    share = m["share_of_examples"]
    assert abs(share["toyreg"] - share["toy"]) < 0.1, share
    # scripts/uncertainty_probe.py on the finished run: a row per task, the kept shares adding up
    import os
    import subprocess
    import sys
    from pathlib import Path
    run = next((tmp_path / "r").glob("multitask/mtl/*/*"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "uncertainty_probe.py"), str(run), "--draws", "2"],
                         capture_output=True, text=True, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in out.stdout.splitlines()
            if line.startswith("| toy")}
    assert set(rows) == {"toy", "toyreg", "toyreg2"} and rows["toyreg"][0].strip() == "–"
    assert 0 < float(rows["toy"][0]) <= 1 and float(rows["toy"][1]) == 1.0
    assert sum(float(r[2].strip(" %")) for r in rows.values()) == pytest.approx(100, abs=0.2)
    bad = subprocess.run([sys.executable, str(root / "scripts" / "uncertainty_probe.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("method,precision", [("mtl", "fp32"), ("mt-a", "bf16"), ("camtl", "bf16")])
def test_multitask_cli_end_to_end_and_reload(method, precision, tiny_bert_dir, task_yamls, data_dir, tmp_path):
    tasks = f"{task_yamls['toy']},{task_yamls['toyreg']}"
    r = runner.invoke(app, ["multitask", "--tasks", tasks, "--method", method, "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path), "--sampling", "uncertainty",
                            "train.epochs=2", "train.batch_size=8", "train.lr=1e-3", f"train.precision={precision}"])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob(f"multitask/{method}/*/*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and set(m["tasks"]) == {"toy", "toyreg"}
    assert 0 < m["fraction_of_examples_used"] <= 1 and m["examples_drawn"] == 2 * m["examples_trained"]
    assert sum(sum(v) for v in m["picks_per_epoch"].values()) == m["examples_trained"]
    assert set(m["fraction_used_per_task"]) == {"toy", "toyreg"}
    assert all(0 <= f <= 1 for f in m["fraction_used_per_task"].values())
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True
    if method == "camtl":  # the frozen lower layer is unchanged by training
        from transformers import AutoModel
        from adapterbench.fileio import load_tensors
        base = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
        trained = load_tensors(run / "multitask" / "encoder.safetensors")
        key = "encoder.layer.0.attention.self.query.weight"
        assert torch.equal(trained[key], base[key])
        assert m["tasks"]["toyreg"]["main_value"] is not None and m["fraction_used_per_task"]["toyreg"] > 0
        assert not torch.equal(trained["encoder.layer.1.attention.self.query.weight"],
                               base["encoder.layer.1.attention.self.query.weight"])
    r = runner.invoke(app, ["report", str(tmp_path), "--no-plot"])
    assert r.exit_code == 0 and "toyreg" in r.output and method in r.output


def test_single_task_stage_refuses_multitask_method(task_yamls):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", "camtl"])
    assert r.exit_code == 2 and "multi-task method" in r.output


def test_mta_export_reproduces_the_task_path_and_fuses(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """MT-A's export (base_model/ + adapters/<task>/) gives, per task, the logits of the
    multi-task model; `fuse` accepts the exported adapters (Fusion w/ MT-A)."""
    from adapterbench.methods import get_method, method_config
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel, load_encoder
    from adapterbench.fileio import load_tensors, read_json
    from adapterbench.recipe.runmodel import load_run_model
    tasks = f"{task_yamls['toy']},{task_yamls['toyreg']}"
    r = runner.invoke(app, ["multitask", "--tasks", tasks, "--method", "mt-a", "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path), "train.epochs=1",
                            "train.batch_size=8", "train.lr=1e-2"])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("multitask/mt-a/*/*"))
    out = run / "multitask"
    _, specs, mt, tok, _ = load_run_model(run)
    mt.eval()
    enc = tok(["the cat sat on the mat", "good film"], ["a dog", "bad plot"], padding=True, return_tensors="pt")
    for i, t in enumerate(specs):
        with torch.no_grad():
            want = mt(**enc, task_ids=torch.full((2,), i))[i][1]
        meta = read_json(out / "adapters" / t.name / "adapter_config.json")
        assert meta["task"] == t.name and meta["base_model"] == str((out / "base_model").resolve())
        single, _ = load_encoder(meta["base_model"])
        pf, pcfg = get_method("pfeiffer"), method_config(meta["method"])
        pf.apply(single, pcfg, [t.name])
        pf.load_state(single, pcfg, [t.name], load_tensors(out / "adapters" / t.name / "adapter.safetensors"))
        head = ClassificationHead(HeadConfig(single.config.hidden_size, t.num_labels, t.regression))
        head.load_state_dict(mt.heads[t.name].state_dict())
        model = TaskModel(single, head).eval()
        with torch.no_grad():
            got = model.logits(**enc)
        assert torch.allclose(got, want, atol=1e-5), (t.name, got, want)
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--data-dir", str(data_dir),
                            "--adapters", str(out / "adapters" / "toy"), "--adapters", str(out / "adapters" / "toyreg"),
                            "--out", str(tmp_path / "f"), "train.epochs=1", "train.batch_size=8"])
    assert r.exit_code == 0, r.output
    fused = json.loads(next((tmp_path / "f").glob("fuse/**/metrics.json")).read_text())
    assert fused["status"] == "ok" and fused["model"] == str((out / "base_model").resolve())


def test_fusion_w_mta_runs_on_the_encoder_mta_fine_tuned(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """MT-A's adapters were trained with the encoder: fused on the pretrained one they are
    refused with the fix named; with method.encoder the fusion's encoder carries the MT-A
    encoder's weights (not the pretrained ones) and the rebuilt run reproduces its scores."""
    from safetensors.torch import load_file
    from adapterbench.recipe.runmodel import load_run_model
    tasks = f"{task_yamls['toy']},{task_yamls['toyreg']}"
    r = runner.invoke(app, ["multitask", "--tasks", tasks, "--method", "mt-a", "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path), "train.epochs=1",
                            "train.batch_size=8", "train.lr=1e-2"])
    assert r.exit_code == 0, r.output
    out = next(tmp_path.glob("multitask/mt-a/*/*")) / "multitask"
    fuse = ["fuse", "--target", str(task_yamls["toy"]), "--data-dir", str(data_dir), "--model", str(tiny_bert_dir),
            "--adapters", str(out / "adapters" / "toy"), "--adapters", str(out / "adapters" / "toyreg"),
            "--out", str(tmp_path / "f"), "train.epochs=1", "train.batch_size=8"]
    r = runner.invoke(app, fuse)
    assert r.exit_code == 2 and f"method.encoder={out / 'base_model'}" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "f").glob("fuse/**/metrics.json"))
    r = runner.invoke(app, fuse + [f"method.encoder={tiny_bert_dir}"])          # another encoder than theirs
    assert r.exit_code == 2 and f"method.encoder={out / 'base_model'}" in r.output
    r = runner.invoke(app, fuse + [f"method.encoder={out / 'base_model'}"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "f").glob("fuse/fusion/*/*/metrics.json")).parent
    _, _, model, _, _ = load_run_model(run)
    key = "encoder.layer.1.attention.self.query.weight"
    got = {k.replace(".base.", "."): v for k, v in model.encoder.state_dict().items()}[key]
    tuned, pretrained = load_file(str(out / "base_model" / "model.safetensors"))[key], \
        load_file(str(tiny_bert_dir / "model.safetensors"))[key]
    assert torch.equal(got, tuned) and not torch.equal(got, pretrained)
    r = runner.invoke(app, ["evaluate", str(run)])
    assert r.exit_code == 0 and "reproduced the stored dev metrics: yes" in r.output, r.output


def test_a_mixed_task_batch_split_by_task_takes_the_same_step():
    """MT-Uncertainty's batches mix tasks of very different lengths: `split_batch` trains them
    as one part per task (less padding; on a CPU also in length-sorted chunks) and the
    optimizer step equals the one over the padded mixed batch (CA-MTL's per-example task
    conditioning included; dropout off to compare)."""
    from adapterbench.config import TrainConfig
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel
    from adapterbench.recipe.train import split_batch, make_accelerator, train_step
    def build():
        torch.manual_seed(0)
        heads = {f"t{i}": ClassificationHead(HeadConfig(32, 2, dropout=0.0, pooling="mean")) for i in range(2)}
        return TaskModel(camtl_encoder(n_tasks=2, init="reference"), heads, camtl.set_tasks).eval()
    g = torch.Generator().manual_seed(1)
    item = lambda t, n: {"input_ids": torch.randint(5, 20, (n,), generator=g).tolist(), "attention_mask": [1] * n,
                         "labels": int(torch.randint(0, 2, (1,), generator=g)), "task_id": t}
    items = [item(0, 14), item(1, 3), item(1, 4), item(0, 12), item(1, 2), item(1, 3), item(1, 3), item(1, 4)]
    weights = torch.full((8,), 1 / 8)
    parts = split_batch(items, weights)
    assert [len(p[0]) for p in parts] == [2, 6] and torch.equal(torch.cat([p[1] for p in parts]), weights)
    assert len(split_batch([item(0, 5), item(1, 5)], torch.full((2,), 0.5))) == 1     # nothing to save: one part
    chunks = split_batch(items, weights, chunk=4)     # a CPU's rule: per task, then length-sorted chunks of 4
    assert [[len(it["input_ids"]) for it in p[0]] for p in chunks] == [[12, 14], [2, 3, 3, 3], [4, 4]]
    assert len(split_batch([item(0, 5), item(1, 5)], torch.full((2,), 0.5), chunk=4)) == 1   # nothing to save
    one_task = [item(0, n) for n in (3, 30, 4, 28, 2, 3, 31, 5)]  # a multi-task sampler's batch of one task
    lengths = [[len(it["input_ids"]) for it in p[0]] for p in split_batch(one_task, weights, chunk=4)]
    assert lengths == [[2, 3, 3, 4], [5, 28, 30, 31]]
    assert len(split_batch(one_task, weights)) == 1    # on an accelerator a one-task batch stays whole
    assert len(split_batch([item(0, n) for n in (9, 10, 10, 9)], torch.full((4,), 0.25), chunk=2)) == 1
    collate, acc, cfg = Collator(0), make_accelerator(True), TrainConfig(max_grad_norm=1.0)
    after = []
    for split in ([(items, weights)], parts, chunks):
        m = build()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        batches = [{**collate(its), "weights": w} for its, w in split]
        loss, norm = train_step(m, m, batches, opt, sched, acc, cfg, 0)
        after.append((loss, norm, [p.detach().clone() for p in m.parameters() if p.requires_grad]))
    (l1, n1, p1) = after[0]
    for l2, n2, p2 in after[1:]:
        assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4) and n1 > 0
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2))
    assert not all(torch.equal(a, b) for a, b in zip(p1, [p for p in build().parameters() if p.requires_grad]))


def test_grouped_task_streams_pad_less_cover_every_example_and_resume_exactly():
    """sampling.group_by_length: each task's batches hold examples of similar length (far less
    padding than a plain shuffle), a pass still draws every example once, a restored state
    continues with the same batches, and the default keeps the plain shuffle runs before it drew."""
    import random
    from adapterbench.recipe.sampling import TaskMixture, TaskStreams
    rng = random.Random(0)
    items = [[{"input_ids": [5] * rng.randint(3, 60), "task_id": t, "uid": j} for j in range(200)] for t in range(2)]

    def padding(grouped):
        mix = TaskMixture(items, 8, 3, "proportional", grouped=grouped)
        batches = list(mix.epoch(0))
        assert all(len({it["task_id"] for it in b}) == 1 for b in batches)    # one task per batch
        return (sum(8 * max(len(it["input_ids"]) for it in b) for b in batches)
                / sum(len(it["input_ids"]) for b in batches for it in b))
    assert padding(True) < 1.2 < 1.5 < padding(False)
    streams = TaskStreams(items, 8, 3, grouped=True)
    assert sorted(streams.refill(0)) == list(range(200))
    plain = list(range(200))
    random.Random(3).shuffle(plain)
    assert TaskStreams(items, 8, 3).refill(0) == plain          # the default: the shuffle as before
    mix = TaskMixture(items, 8, 3, "proportional", grouped=True)
    it = mix.epoch(0)
    for _ in range(7):
        next(it)
    saved = json.loads(json.dumps(mix.state()))
    want = [[x["uid"] for x in next(it)] for _ in range(20)]
    again = TaskMixture(items, 8, 3, "proportional", grouped=True)
    again.restore(saved)
    assert [[x["uid"] for x in b] for b in itertools.islice(again.epoch(0), 20)] == want
