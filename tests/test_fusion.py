"""AdapterFusion: initialisation, attention, fast path == literal formula (outputs and
gradients), save/load, refused sources, and extract x3 -> fuse through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.methods.bottleneck import BottleneckAdapter
from adapterbench.methods.fusion import Config, FusionMixer

runner = CliRunner()


def make(n=4, d=16, m=3, variant="dynamic", seed=0):
    torch.manual_seed(seed)
    adapters = [BottleneckAdapter(d, m, "relu", "bert") for _ in range(n)]
    for a in adapters:  # non-trivial biases so every term of the fast formula matters
        torch.nn.init.normal_(a.up.bias, std=0.1)
        torch.nn.init.normal_(a.down.bias, std=0.1)
        a.requires_grad_(False)
    mixer = FusionMixer(d, Config(variant=variant, attention_dropout=0.0))
    torch.nn.init.normal_(mixer.key.bias, std=0.1)
    torch.nn.init.normal_(mixer.query.bias, std=0.1)
    return mixer, adapters


def test_value_starts_as_identity_and_penalty_is_zero():
    mixer, _ = make()
    w = mixer.value.weight
    assert torch.equal(torch.diagonal(w), torch.ones(16))
    off = w[~torch.eye(16, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 1e-6))
    assert mixer.penalty().item() < 1e-9
    with torch.no_grad():
        w.add_(0.1)
    assert mixer.penalty().item() == pytest.approx(0.01 * 16 * 16 * 0.01, rel=1e-3)


def test_static_variant_has_no_value_matrix():
    mixer, _ = make(variant="static")
    assert mixer.value is None and mixer.penalty().item() == 0.0


def test_attention_sums_to_one():
    mixer, adapters = make()
    mixer.record = []
    mixer(torch.randn(2, 5, 16), adapters)
    p_sum, count = mixer.record[0]
    assert count == 10 and p_sum.sum().item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("variant", ["dynamic", "static"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_fast_path_equals_literal_outputs_and_gradients(variant, n):
    mixer, adapters = make(n=n, variant=variant)
    x = torch.randn(2, 7, 16, requires_grad=True)
    fast = mixer(x, adapters)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *mixer.parameters()])
    lit = mixer.literal(x, adapters)
    grads_lit = torch.autograd.grad(lit.square().sum(), [x, *mixer.parameters()])
    assert torch.allclose(fast, lit, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_fast, grads_lit):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_temperature_anneals_in_training_only():
    torch.manual_seed(0)
    mixer = FusionMixer(8, Config(temperature=True))
    adapters = [BottleneckAdapter(8, 2, "relu", "bert") for _ in range(2)]
    mixer.eval()
    mixer(torch.randn(1, 2, 8), adapters)
    assert mixer.T.item() == 50.0
    mixer.train()
    mixer(torch.randn(1, 2, 8), adapters)
    assert mixer.T.item() == pytest.approx(49.95)


def extract(tiny_bert_dir, task_yamls, data_dir, out, seed, *extra):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(out), "--seed", str(seed),
                            "train.epochs=1", *extra])
    assert r.exit_code == 0, r.output
    return sorted(out.glob("extract/*/toy/*"))[-1]


def test_extract_three_then_fuse_end_to_end(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    srcs = [extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / f"a{i}", i) for i in range(3)]
    out = tmp_path / "runs"
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", *map(str, srcs),
                            "--data-dir", str(data_dir), "--out", str(out), "--save-attention",
                            "train.epochs=2", "train.lr=1e-3"])
    assert r.exit_code == 0, r.output
    run = next(out.glob("fuse/fusion/toy/*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["epochs_run"] == 2
    # trainable: per site Q (d^2 + d), K (d^2 + d), V (d^2), 2 layers, d = 32; plus the head
    assert m["trainable_params"] == 2 * (3 * 32 * 32 + 2 * 32) + (32 * 32 + 32) + (32 * 2 + 2)
    sources = json.loads((run / "fusion" / "sources.json").read_text())
    assert [s["path"] for s in sources] == [str((s / "adapter").resolve()) for s in srcs]
    assert all(len(s["sha256"]) == 64 for s in sources)
    assert (run / "fusion" / "fusion.safetensors").is_file() and (run / "fusion" / "head.safetensors").is_file()
    rows = (run / "attention.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].count(",") == 3
    assert all(abs(sum(map(float, row.split(",")[1:])) - 1) < 1e-4 for row in rows[1:])
    assert (run / "attention.png").stat().st_size > 1000

    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir), "--save-attention"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "eval_dev.json").read_text())["reproduced"] is True

    # scripts/fusion_probe.py over every dev example: its weights, recomputed from the sources'
    # outputs and Q, K, are the attention the model recorded (attention.csv); a non-fusion run is refused
    probe = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "fusion_probe.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([*probe, str(run), "--examples", "0", "--json", str(tmp_path / "probe.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    layers = json.loads((tmp_path / "probe.json").read_text())["layers"]
    recorded = [[float(v) for v in row.split(",")[1:]] for row in (run / "attention.csv").read_text().splitlines()[1:]]
    assert len(layers) == 2 and [s["p"] for s in layers] == [pytest.approx(r, abs=1e-4) for r in recorded]
    for s in layers:
        assert len(s["ratio"]) == 3 and all(r > 0 for r in s["ratio"]) and s["spread"] > 0
        assert max(s["p"]) - 1e-6 <= s["max_p"] <= 1 and s["score_std"] > 0
    assert sum(line.startswith("| ") for line in out.stdout.splitlines()) == 1 + 2   # the header, 2 layers
    bad = subprocess.run([*probe, str(srcs[0])], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "not a fusion run" in bad.stderr and len(bad.stderr.splitlines()) == 1

    (srcs[0] / "adapter" / "adapter.safetensors").write_bytes(b"changed")
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "changed since this fusion was trained" in r.output


def test_fuse_refuses_mismatched_sources(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    a = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "a", 0)
    b = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "b", 0, "method.reduction_factor=8")
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(a), str(b),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2
    assert "differs in adapter config method.reduction_factor: 8.0 vs 16.0" in r.output
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(tmp_path),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "neither an adapter folder nor an extract run folder" in r.output
    assert not list((tmp_path / "runs").glob("**/metrics.json"))


def test_fuse_in_bf16_trains_and_reproduces(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """Fusion and the attention export under bf16 autocast (train.precision=bf16, also on CPU)."""
    srcs = [extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / f"a{i}", i) for i in range(2)]
    out = tmp_path / "runs"
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", *map(str, srcs),
                            "--data-dir", str(data_dir), "--out", str(out), "--save-attention",
                            "train.epochs=1", "train.lr=1e-3", "train.precision=bf16"])
    assert r.exit_code == 0, r.output
    run = next(out.glob("fuse/fusion/toy/*"))
    rows = (run / "attention.csv").read_text().splitlines()
    assert all(abs(sum(map(float, row.split(",")[1:])) - 1) < 1e-2 for row in rows[1:])
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True
