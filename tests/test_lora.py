"""LoRA (Hu et al. 2021) through the method contract, and its peft interchange: a run exported
with `--format peft` loads into the real `peft` library onto the same base model with the same
outputs, and a peft LoRA folder imports back."""

import json

import pytest
import torch
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()
peft = pytest.importorskip("peft")


def test_model_dropout_leaves_a_methods_own_dropout(task_yamls):
    """model.dropout sets the encoder's and heads' dropouts, not LoRA's own input dropout."""
    from adapterbench.recipe.runmodel import build_model
    from adapterbench.recipe.stages import resolve
    from adapterbench.tasks import load_task
    cfg = resolve({"task": str(task_yamls["toy"]), "model": {"name": "tiny-bert", "dropout": 0.0},
                   "method": {"name": "lora", "dropout": 0.3}}, "extract")
    model, _ = build_model(cfg, [load_task(str(task_yamls["toy"]))])
    ps = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora = {n: p for n, p in ps.items() if n.endswith(("query.dropout", "value.dropout"))}
    assert lora and all(p == 0.3 for p in lora.values())
    assert all(p == 0.0 for n, p in ps.items() if n not in lora)


def test_lora_run_exports_to_peft_with_the_same_outputs_and_imports_back(tiny_bert_dir, task_yamls, data_dir,
                                                                          tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer
    from adapterbench.fileio import load_tensors
    from adapterbench.recipe.runmodel import load_run_model
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", "lora", "--model",
                            str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"),
                            "train.epochs=2", "train.lr=1e-2", "method.target_modules=[query,key,value]"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/lora/toy/*"))
    r = runner.invoke(app, ["export", str(run), "--format", "peft", "--no-head", "--out", str(tmp_path / "peft")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["query", "key", "value"]

    _, _, ours, _, _ = load_run_model(run)
    ours.eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok(["the cat sat on the mat", "good film"], ["a dog", "bad plot"], padding=True, return_tensors="pt")
    theirs = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), str(tmp_path / "peft")).eval()
    head = ours.head
    with torch.no_grad():
        want = ours.logits(**enc)
        got = head(theirs(**enc).last_hidden_state, enc["attention_mask"])
        moved = (want - head(AutoModel.from_pretrained(tiny_bert_dir)(**enc).last_hidden_state,
                             enc["attention_mask"])).abs().max()
    assert moved > 1e-3                                   # the LoRA weights matter
    assert (got - want).abs().max() < 1e-4

    r = runner.invoke(app, ["import", str(tmp_path / "peft"), "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    back = load_tensors(tmp_path / "back" / "adapter.safetensors")
    orig = load_tensors(run / "adapter" / "adapter.safetensors")
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert meta["method"]["target_modules"] == ["query", "key", "value"] and meta["method"]["rank"] == 8


def test_lora_refuses_merge_and_adapterhub_export_with_one_line(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", "lora", "--model",
                            str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"),
                            "train.max_steps=1"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/lora/toy/*"))
    import shutil
    twin = tmp_path / "twin"                        # a second source (a source is named once)
    shutil.copytree(run, twin)
    r = runner.invoke(app, ["merge", "--adapters", str(run), str(twin), "--out", str(tmp_path / "m"),
                            "--strategy", "task-arithmetic"])
    assert r.exit_code == 2 and "lora" in r.output and len(r.output.strip().splitlines()) <= 2
    assert "given twice" not in r.output
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ah")])
    assert r.exit_code == 2 and "pfeiffer and houlsby" in r.output


def test_peft_alone_loads_the_trained_classifier(task_yamls, data_dir, tmp_path):
    """A LoRA run on the offline alias exports with its head in peft's sequence-classification
    form: `AutoPeftModelForSequenceClassification.from_pretrained(DIR)` (no adapterbench, no
    network: the alias's checkpoint is found by its hub id in the HF cache) gives our logits.
    A mean-pooled head (which no AutoModelForSequenceClassification computes) exports the encoder
    with an auto_mapping and our head beside it, and --head says why not in one line."""
    from peft import AutoPeftModel, AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer
    from adapterbench.models import resolve_model_path
    from adapterbench.recipe.runmodel import load_run_model
    runs = {}
    for pooling in ("cls", "mean"):
        r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", "lora", "--model", "minilm-l6",
                                "--data-dir", str(data_dir), "--out", str(tmp_path / pooling), "train.max_steps=3",
                                "train.lr=5e-3", f"model.pooling={pooling}", "train.log_with=[none]"])
        assert r.exit_code == 0, r.output
        runs[pooling] = next((tmp_path / pooling).glob("extract/lora/toy/*"))
    r = runner.invoke(app, ["export", str(runs["cls"]), "--format", "peft", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0 and "AutoPeftModelForSequenceClassification" in r.output, r.output
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "pooler"]
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "p")).eval()
    _, _, ours, _, _ = load_run_model(runs["cls"])
    ours.eval()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
    enc = tok(["the cat sat on the mat", "a good film"], ["a dog", "bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ours.logits(**enc)
        got = theirs(**enc).logits
    assert (got - want).abs().max() < 1e-4

    r = runner.invoke(app, ["export", str(runs["mean"]), "--format", "peft", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0 and "no peft head" in r.output and "model.pooling=cls" in r.output, r.output
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["auto_mapping"]["base_model_class"] == "BertModel" and (tmp_path / "m" / "head.safetensors").is_file()
    assert AutoPeftModel.from_pretrained(str(tmp_path / "m")) is not None
    r = runner.invoke(app, ["export", str(runs["mean"]), "--format", "peft", "--head", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "mean pooling" in r.output and not (tmp_path / "h").exists()
