"""`adapterbench bench` on the tiny model: one subprocess per measurement, the table and the
JSON hold every configuration, real batches are padded to their longest member, bad input
is one line."""

import pytest
import json

from typer.testing import CliRunner

from adapterbench.interop import bench
from adapterbench.cli import app

runner = CliRunner()
TINY = ["--model", "tiny-bert", "--steps", "1", "--warmup", "1", "--batch-size", "4"]


@pytest.mark.slow
def test_bench_fixed_shape_table_and_json(tmp_path):
    r = runner.invoke(app, ["bench", *TINY, "--seq-len", "8", "--configs", "bare,merged,camtl",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "bench.json").read_text())
    got = {(row["config"], row["mode"]) for row in data["rows"]}
    assert got == {("bare", "infer")} | {(c, m) for c in ("merged", "camtl") for m in ("train", "infer")}
    for row in data["rows"]:
        assert row["samples_per_s"] > 0 and row["peak_mib"] > 0
        assert row["tokens_per_s"] == row["samples_per_s"] * 8           # fixed shape: every token real
    trainable = {row["config"]: row["trainable"] for row in data["rows"] if row["mode"] == "train"}
    assert trainable["camtl"] > trainable["merged"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| camtl |" in md and "adapter train step / forward" in md


@pytest.mark.slow
def test_bench_real_batches_are_dynamically_padded(tmp_path, task_yamls, data_dir):
    r = runner.invoke(app, ["bench", *TINY, "--configs", "fusion2", "--modes", "train", "--task",
                            str(task_yamls["toy"]), "--data-dir", str(data_dir), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["tokens_per_s"] <= row["padded_tokens_per_s"] < row["samples_per_s"] * 128


@pytest.mark.slow
def test_bench_measures_precisions_side_by_side(tmp_path):
    """--precision fp32,bf16: every configuration at both, interleaved in one run; a table per
    precision and their throughput ratio; the bf16 rows say how this machine computed them."""
    r = runner.invoke(app, ["bench", *TINY, "--seq-len", "8", "--configs", "pfeiffer", "--modes", "train",
                            "--precision", "fp32,bf16", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted((row["precision"], row["bf16_matmul"] is None) for row in rows) == [("bf16", False), ("fp32", True)]
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| pfeiffer |") == 2 and "precision fp32" in md and "precision bf16" in md
    fp32, bf16 = (next(row["samples_per_s"] for row in rows if row["precision"] == p) for p in ("fp32", "bf16"))
    assert f"bf16 / fp32: pfeiffer {bf16 / fp32:.2f}x" in md
    r = runner.invoke(app, ["bench", *TINY, "--precision", "fp32,fp16", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--precision 'fp16' must be auto, fp32 or bf16" in r.output


def test_bench_bad_input(tmp_path, monkeypatch):
    r = runner.invoke(app, ["bench", *TINY, "--configs", "pfeiffer,nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown 'nope'" in r.output
    monkeypatch.setenv("ADAPTERBENCH_PEER_PYTHON", str(tmp_path / "none" / "python"))
    r = runner.invoke(app, ["bench", *TINY, "--configs", "pfeiffer", "--peer", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0" in r.output \
        and "scripts/" not in r.output          # names commands an installed wheel has
    assert not (tmp_path / "bench.json").exists()


def test_split_parts_cut_a_batch_as_the_training_loop_does():
    """`train-split` times each batch in the parts `train.split_batch` makes of it on a CPU:
    length-sorted chunks, real tokens kept, loss weights summing to the batch mean's."""
    import torch
    lengths = [3, 30, 4, 28, 2, 3, 31, 5, 6, 29, 4, 3, 30, 2, 5, 4]
    ids = torch.zeros(16, 31, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n], mask[r, :n] = torch.arange(5, 5 + n), 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(16).float() % 2,
             "task_ids": torch.zeros(16, dtype=torch.long)}
    parts = bench.split_parts(batch, torch.device("cpu"), 0)
    assert [p["input_ids"].shape for p in parts] == [(8, 4), (8, 31)]
    assert sum(int(p["attention_mask"].sum()) for p in parts) == sum(lengths)
    assert torch.isclose(sum(p["weights"].sum() for p in parts), torch.tensor(1.0))


@pytest.mark.slow
def test_bench_train_split_beside_train(tmp_path, task_yamls):
    data_dir = tmp_path / "data"          # TOY pairs of 2 words, every fourth of 40: mixed lengths
    (data_dir / "TOY").mkdir(parents=True)
    words = lambda w, i: " ".join([w] * (20 if i % 4 == 0 else 1))
    rows = [f"{i}\t{words('good', i)}\t{words('bad', i)}\tpos" for i in range(64)]
    (data_dir / "TOY" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    r = runner.invoke(app, ["bench", "--model", "tiny-bert", "--steps", "1", "--warmup", "1", "--batch-size", "16",
                            "--configs", "pfeiffer", "--modes", "train,train-split", "--task", str(task_yamls["toy"]),
                            "--data-dir", str(data_dir), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = {row["mode"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    whole, split = rows["train"], rows["train-split"]
    per_sample = lambda row: row["padded_tokens_per_s"] / row["samples_per_s"]
    assert per_sample(split) < per_sample(whole)          # the same batches, less padding
    real_per_sample = lambda row: row["tokens_per_s"] / row["samples_per_s"]
    assert real_per_sample(whole) == pytest.approx(real_per_sample(split))   # the same real tokens
    md = (tmp_path / "bench.md").read_text()
    assert "split / whole (train)" in md
    ratio = split["samples_per_s"] / whole["samples_per_s"]
    assert f"| {split['samples_per_s']:.1f} | {ratio:.2f} |" in md
    r = runner.invoke(app, ["bench", "--model", "tiny-bert", "--modes", "train-split", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--modes train-split needs real batches" in r.output
    r = runner.invoke(app, ["bench", "--model", "tiny-bert", "--modes", "train,fast", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--modes: unknown 'fast'" in r.output


@pytest.mark.parametrize("config", ["pfeiffer", "fusion2", "mtl"])
def test_bench_real_batches_of_any_label_space(tmp_path, task_yamls, data_dir, config):
    """Real batches of a three-class task and of a regression task train under every kind of
    configuration (a method built on that task, fusion's own head, a multi-task pair): the model
    is built for the task given, not for RTE's two classes."""
    three = tmp_path / "three.yaml"
    three.write_text(task_yamls["toy"].read_text().replace("name: toy", "name: three")
                     .replace("labels: [neg, pos]", "labels: [neg, pos, mid]").replace("dir: TOY", "dir: THREE"))
    (data_dir / "THREE").mkdir()
    for split in ("train", "dev"):
        rows = (data_dir / "TOY" / f"{split}.tsv").read_text().splitlines()
        mixed = [rows[0]] + [r.rsplit("\t", 1)[0] + "\t" + ("neg", "pos", "mid")[i % 3] for i, r in enumerate(rows[1:])]
        (data_dir / "THREE" / f"{split}.tsv").write_text("\n".join(mixed) + "\n")
    trainable = []
    for task in (task_yamls["toyreg"], task_yamls["toy"], three):    # 1, 2 and 3 outputs
        spec = bench.Spec(model="tiny-bert", task=str(task), steps=1, warmup=0, batch_size=6, data_dir=str(data_dir))
        row = bench.measure(config, "train", spec)
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0, (config, task.name)
        trainable.append(row["trainable"])
    assert trainable == sorted(set(trainable)), trainable      # each head as wide as its task's outputs
