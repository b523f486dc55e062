"""Several processes train as one: `torchrun --nproc_per_node 2` (gloo on CPU; the same
Accelerator path as `accelerate launch` on GPUs) gives the weights and metrics of a single
process, for `extract` and `fuse`. Each global batch is split across the processes; dropout
is set to 0 because each process draws its own dropout masks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow   # torchrun subprocesses
COMMON = ["--model", "tiny-bert", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=8",
          "train.limit=32", "train.lr=1e-2", "model.dropout=0"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "adapterbench", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def only_run(root: Path) -> Path:
    found = [m.parent for m in root.glob("**/metrics.json") if "adapters" not in m.parts]
    assert len(found) == 1, found
    return found[0]


def assert_same(one: Path, two: Path, weights: list[str], exact: bool = True) -> None:
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["processes"] == 1 and m2["processes"] == 2 and m1["steps"] == m2["steps"]
    if exact:
        assert m1["history"] == m2["history"]
    else:   # summation order differs (two partial sums): metrics agree to rounding
        assert [h["main"] for h in m1["history"]] == pytest.approx([h["main"] for h in m2["history"]], abs=0.01)
    for name in weights:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        moved = max(float(v.abs().max()) for v in a.values())
        assert moved > 1e-3                                       # training did change the weights
        for k in a:
            if k.endswith("key.bias"):
                # fusion's key bias adds one constant to every score of a query: softmax ignores it, its
                # gradient is rounding noise, and Adam turns that noise into lr-sized steps
                continue
            assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_extract_and_fuse_two_processes_equal_one(tmp_path, task_yamls, data_dir):
    toy = ["--task", str(task_yamls["toy"]), "--data-dir", str(data_dir)]
    r = runner.invoke(app, ["extract", *toy, "--out", str(tmp_path / "one"), *COMMON])
    assert r.exit_code == 0, r.output
    two_processes(["extract", *toy, "--out", str(tmp_path / "two"), *COMMON], tmp_path)
    one, two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    assert_same(one, two, ["adapter/adapter.safetensors", "adapter/head.safetensors"])

    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toyreg"]), "--data-dir", str(data_dir),
                            "--out", str(tmp_path / "src"), *COMMON])
    assert r.exit_code == 0, r.output
    sources = ["--adapters", str(one), "--adapters", str(only_run(tmp_path / "src"))]
    fuse = ["fuse", "--target", str(task_yamls["toy"]), "--data-dir", str(data_dir), *sources, *COMMON,
            "method.attention_dropout=0"]
    r = runner.invoke(app, [*fuse, "--out", str(tmp_path / "fone")])
    assert r.exit_code == 0, r.output
    two_processes([*fuse, "--out", str(tmp_path / "ftwo")], tmp_path)
    assert_same(only_run(tmp_path / "fone"), only_run(tmp_path / "ftwo"),
                ["fusion/fusion.safetensors", "fusion/head.safetensors"])


@pytest.mark.parametrize("method,sampling", [("mt-a", "proportional"), ("camtl", "uncertainty")])
def test_multitask_two_processes_equal_one(method, sampling, tmp_path, task_yamls, data_dir):
    """The same engine splits a multi-task batch across processes too: each process takes its
    share of the global batch, losses weighted so that the gradient is the one-process one."""
    args = ["multitask", "--tasks", f"{task_yamls['toy']},{task_yamls['toyreg']}", "--method", method,
            "--sampling", sampling, "--data-dir", str(data_dir), *COMMON]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    two_processes([*args, "--out", str(tmp_path / "two")], tmp_path)
    one, two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    assert_same(one, two, ["multitask/encoder.safetensors", "multitask/head-toy.safetensors",
                           "multitask/head-toyreg.safetensors"], exact=False)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["picks_per_epoch"] == m2["picks_per_epoch"]


CRASHING = """import os, sys
from adapterbench.recipe import train as T
real = T.train_step
def crashing(*args):
    if args[-1] + 1 == int(os.environ["CRASH_AT"]):
        os._exit(3)          # every rank dies at once, as under kill -9, after the checkpoint before this step
    return real(*args)
T.train_step = crashing
from adapterbench.cli import main
sys.argv[0] = "adapterbench"
main()
"""


def test_two_processes_resume_each_ranks_own_dropout_draws(tmp_path, task_yamls, data_dir):
    """With dropout on, each rank draws its own masks, and its generator goes its own way once the
    ranks make different numbers of draws (a multi-task batch splits into a part per task on each
    rank). A two-process run killed after a checkpoint resumes to the uninterrupted two-process
    run's weights and history bit for bit: every rank's generator is in the checkpoint
    (rng-rank1.pt beside rank 0's optim.pt); with rank 0's given to every rank it did not."""
    args = ["multitask", "--tasks", f"{task_yamls['toy']},{task_yamls['toyreg']}", "--method", "mtl",
            "--sampling", "uncertainty", "--data-dir", str(data_dir), *COMMON,
            "model.dropout=0.3", "train.checkpoint_every=2", "train.epochs=3"]
    two_processes([*args, "--out", str(tmp_path / "ref")], tmp_path)
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CRASH_AT="6")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), *args, "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    run = only_run(tmp_path / "run")
    latest = json.loads((run / "checkpoint" / "latest.json").read_text())
    assert latest == {"checkpoint": "step-4-e0", "processes": 2}     # the checkpoint before the crash
    assert (run / "checkpoint" / "step-4-e0" / "rng-rank1.pt").is_file()

    two_processes([*args, "--out", str(tmp_path / "run")], tmp_path)
    ref = only_run(tmp_path / "ref")
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    assert got["status"] == "ok" and got["history"] == want["history"] and got["steps"] == want["steps"]
    for name in ("multitask/encoder.safetensors", "multitask/head-toy.safetensors"):
        a, b = load_file(run / name), load_file(ref / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any(json.loads(line).get("resumed") for line in (run / "log.jsonl").read_text().splitlines())
