"""`extract` / `finetune` / `evaluate` / `ls` / `validate` end to end through the CLI on a
tiny BERT folder and fixture data; bad input gives one line and exit code 2."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def only_run(root: Path) -> Path:
    found = [m.parent for m in root.glob("**/metrics.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("stage,method", [("extract", "pfeiffer"), ("extract", "houlsby"),
                                          ("finetune", "full"), ("extract", "head")])
def test_train_then_evaluate_reproduces(stage, method, tiny_bert_dir, task_yamls, data_dir, tmp_path):
    out = tmp_path / "runs"
    extra = ["train.save_model=true"] if method == "full" else []
    r = invoke(stage, "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--method", method,
               "--data-dir", data_dir, "--out", out, "train.epochs=2", "train.lr=1e-3", "train.batch_size=8",
               "train.heldout_min=8", *extra)    # 40 examples train, 8 select: 10 steps
    assert r.exit_code == 0, r.output
    run = only_run(out)
    assert run.relative_to(out).parts[:3] == (stage, method, "toy")
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["epochs_run"] == 2 and 0 <= m["best_epoch"] < 2
    dev = m["tasks"]["toy"]["dev"]
    assert set(dev) == {"accuracy", "f1"} and m["main_value"] == dev["accuracy"]
    assert 0 < m["trainable_params"] <= m["total_params"] and m["train_seconds"] > 0
    for f in ("config.yaml", "task.yaml", "env.json", "log.jsonl"):
        assert (run / f).is_file()
    steps = [x for x in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "samples_per_s" in x]
    assert steps and all(x["steps_total"] == m["steps"] for x in steps)     # status's time left reads it
    wdir = run / ("model" if method == "full" else "adapter")
    assert (wdir / "head.safetensors").is_file()
    assert (wdir / ("model_config.json" if method == "full" else "adapter_config.json")).is_file()
    if method in ("pfeiffer", "houlsby"):
        assert (wdir / "adapter.safetensors").is_file()

    r = invoke("evaluate", run, "--data-dir", data_dir)
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "eval_dev.json").read_text())
    assert ev["reproduced"] is True and ev["tasks"]["toy"] == dev


def test_regression_and_test_predictions(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    out = tmp_path / "runs"
    r = invoke("extract", "--task", task_yamls["toyreg"], "--model", tiny_bert_dir, "--data-dir", data_dir,
               "--out", out, "train.epochs=1")
    assert r.exit_code == 0, r.output
    m = json.loads((only_run(out) / "metrics.json").read_text())
    assert set(m["tasks"]["toyreg"]["dev"]) == {"pearson", "spearman"}

    out2 = tmp_path / "runs2"
    assert invoke("extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
                  "--out", out2, "train.epochs=1").exit_code == 0
    run = only_run(out2)
    r = invoke("evaluate", run, "--split", "test", "--data-dir", data_dir)
    assert r.exit_code == 0, r.output
    lines = (run / "predictions" / "toy.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 3
    assert all(line.split("\t")[1] in ("neg", "pos") for line in lines[1:])


def test_same_seed_same_metrics_and_skip_done(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    args = ["extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
            "train.epochs=2", "train.lr=1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(*args, "--out", a).exit_code == 0
    assert invoke(*args, "--out", b).exit_code == 0
    ma = json.loads((only_run(a) / "metrics.json").read_text())
    mb = json.loads((only_run(b) / "metrics.json").read_text())
    assert ma["history"] == mb["history"]
    before = (only_run(a) / "metrics.json").read_text()
    r = invoke(*args, "--out", a)          # finished run with the same config: not redone
    assert r.exit_code == 0 and "already done" in r.output
    assert (only_run(a) / "metrics.json").read_text() == before


def test_limit_and_max_steps(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = invoke("extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
               "--out", tmp_path, "train.limit=16", "train.max_steps=3", "train.batch_size=4", "train.epochs=5")
    assert r.exit_code == 0, r.output
    m = json.loads((only_run(tmp_path) / "metrics.json").read_text())
    assert m["steps"] == 3 and m["tasks"]["toy"]["train_examples"] == 16 and m["epochs_run"] == 1
    r = invoke("extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
               "--out", tmp_path / "fs", "train.shots=4", "data.data_seed=3", "train.epochs=1")
    assert r.exit_code == 0, r.output
    m = json.loads((only_run(tmp_path / "fs") / "metrics.json").read_text())
    assert m["tasks"]["toy"]["train_examples"] == 8 and m["tasks"]["toy"]["dev_examples"] == 16  # 4 per class


def test_ls_and_validate(tmp_path):
    r = invoke("ls", "tasks")
    assert r.exit_code == 0 and "mrpc" in r.output and "sick" in r.output
    r = invoke("ls", "methods")
    assert r.exit_code == 0 and "houlsby" in r.output and "pfeiffer" in r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: mrpc\nmethod: {name: houlsby, reduction_factor: 8}\n")
    r = invoke("validate", cfg)
    assert r.exit_code == 0 and "reduction_factor: 8.0" in r.output


def bad(tmp_path, *args):
    r = invoke(*args)
    text = r.output.strip()
    assert r.exit_code == 2, text
    assert text.startswith("error:") and "Traceback" not in text
    assert not any(json.loads(m.read_text()).get("status") == "ok" for m in tmp_path.glob("**/metrics.json"))
    return text


def test_bad_inputs_one_line_exit_2(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    common = ["--model", tiny_bert_dir, "--data-dir", data_dir, "--out", tmp_path / "runs"]
    assert "unknown task 'nosuch'" in bad(tmp_path, "extract", "--task", "nosuch", *common)
    assert "unknown method 'dora'" in bad(tmp_path, "extract", "--task", task_yamls["toy"], "--method", "dora", *common)
    assert "unknown config key 'train.lrate'" in bad(tmp_path, "extract", "--task", task_yamls["toy"], *common,
                                                     "train.lrate=1")
    y = tmp_path / "bad.yaml"
    y.write_text("task: [rte\n")
    assert "malformed YAML" in bad(tmp_path, "extract", "--config", y, *common)
    assert "is not a folder" in bad(tmp_path, "extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir,
                                    "--data-dir", tmp_path / "empty", "--out", tmp_path / "runs")
    (tmp_path / "empty").mkdir()               # a folder, without the task's files
    assert "local files not found" in bad(tmp_path, "extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir,
                                          "--data-dir", tmp_path / "empty", "--out", tmp_path / "runs")
    assert "does not exist" in bad(tmp_path, "extract", "--task", task_yamls["toy"], "--model", tmp_path / "nomodel",
                                      "--data-dir", data_dir, "--out", tmp_path / "runs")
    (data_dir / "TOY" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    assert "label 'maybe'" in bad(tmp_path, "extract", "--task", task_yamls["toy"], *common)
    assert "does not exist" in bad(tmp_path, "evaluate", tmp_path / "no-such-run")


def test_architecture_missing_from_table(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    import shutil
    import transformers as T
    folder = tmp_path / "albert"
    T.AlbertModel(T.AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                 embedding_size=16, vocab_size=40)).save_pretrained(folder)
    for f in tiny_bert_dir.iterdir():
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, folder / f.name)
    text = bad(tmp_path, "extract", "--task", task_yamls["toy"], "--model", folder, "--data-dir", data_dir,
               "--out", tmp_path / "runs")
    assert "architecture 'albert' is not in the adapter table" in text




def test_bf16_precision_on_cpu_trains_and_reproduces(tmp_path, task_yamls, data_dir):
    args = ["extract", "--task", str(task_yamls["toy"]), "--model", "tiny-bert", "--data-dir", str(data_dir),
            "--out", str(tmp_path), "train.epochs=1", "train.limit=16", "train.batch_size=8"]
    r = runner.invoke(app, [*args, "train.precision=bf16"])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("extract/pfeiffer/toy/*"))
    assert "precision: bf16" in (run / "config.yaml").read_text()
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True
    r = runner.invoke(app, [*args, "train.precision=fp16"])
    assert r.exit_code == 2 and "train.precision" in r.output and "auto, fp32 or bf16" in r.output


def test_a_bf16_run_records_how_this_machine_computed_its_products(tmp_path, task_yamls, data_dir, monkeypatch):
    """bf16 on a CPU without AVX512-BF16/AMX runs its matrix products as fp32 GEMMs of
    bf16-rounded operands (`precision.Bf16ByFp32`); metrics.json and the log say so, a CPU with
    native bf16 says "native", and an fp32 run records nothing."""
    from adapterbench.recipe import precision as PR
    args = ["extract", "--task", str(task_yamls["toy"]), "--model", "tiny-bert", "--data-dir", str(data_dir),
            "train.epochs=1", "train.limit=16", "train.batch_size=8"]
    said = {}
    for native, precision in ((False, "bf16"), (True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(PR, "native_bf16_cpu", lambda native=native: native)
        out = tmp_path / f"{precision}-{native}"
        r = runner.invoke(app, [*args, "--out", str(out), f"train.precision={precision}"])
        assert r.exit_code == 0, r.output
        run = next(out.glob("extract/pfeiffer/toy/*"))
        logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        said[precision, native] = (json.loads((run / "metrics.json").read_text()).get("bf16_matmul"),
                                   [x["bf16_matmul"] for x in logged if "bf16_matmul" in x])
    assert said["bf16", False] == ("fp32 GEMM of bf16-rounded operands", ["fp32 GEMM of bf16-rounded operands"])
    assert said["bf16", True] == ("native", ["native"])
    assert said["fp32", False] == (None, [])


def test_pooler_pooling_uses_the_pretrained_pooler_frozen(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """model.pooling=pooler: the checkpoint's pooler feeds a linear output layer; frozen with the
    encoder for adapter methods; evaluate reproduces; a checkpoint without one is one line."""
    from transformers import BertModel, BertTokenizer
    from .conftest import tiny_config
    r = invoke("extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
               "--out", tmp_path / "runs", "train.epochs=1", "model.pooling=pooler")
    assert r.exit_code == 0, r.output
    run = only_run(tmp_path / "runs")
    head = json.loads((run / "adapter" / "head_config.json").read_text())
    assert head["pooling"] == "pooler"
    from adapterbench.fileio import load_tensors
    assert set(load_tensors(run / "adapter" / "head.safetensors")) == {"out.weight", "out.bias"}
    assert not any(k.startswith("pooler") for k in load_tensors(run / "adapter" / "adapter.safetensors"))
    r = invoke("evaluate", run, "--data-dir", data_dir)
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True
    bare = tmp_path / "nopooler"
    BertModel(tiny_config("bert"), add_pooling_layer=False).save_pretrained(bare)
    BertTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(bare)
    r = invoke("extract", "--task", task_yamls["toy"], "--model", bare, "--data-dir", data_dir,
               "--out", tmp_path / "r2", "train.epochs=1", "model.pooling=pooler")
    assert r.exit_code == 2 and "no pretrained pooler" in r.output


def test_a_task_without_a_test_file_trains_and_validates(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A user's task often has no test split: its run identity hashes the files that exist, and
    validate says the test split is not there instead of failing."""
    (data_dir / "TOY" / "test.tsv").unlink()
    r = invoke("extract", "--task", task_yamls["toy"], "--model", tiny_bert_dir, "--data-dir", data_dir,
               "--out", tmp_path / "runs", "train.max_steps=2", "train.log_with=[none]")
    assert r.exit_code == 0, r.output
    r = invoke("validate", task_yamls["toy"], "--data-dir", data_dir)
    assert r.exit_code == 0 and "test: not there" in r.output, r.output
