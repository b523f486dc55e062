"""Methods from outside the package: a module file or an importable module named on the command
line (or an installed entry point) trains through every command like a shipped method; the
contract's checks (`check-method`) pass on every shipped method and on the example, and name
what a broken module breaks; a module named only by a config, study or run folder is never
imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.methods import METHODS

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
BITFIT = ROOT / "examples" / "bitfit.py"


@pytest.mark.parametrize("method", [*METHODS, str(BITFIT)])
def test_check_method_passes_on_shipped_methods_and_the_example(method):
    r = runner.invoke(app, ["check-method", method])
    assert r.exit_code == 0 and "all 5 checks passed" in r.output, r.output


BROKEN = {
    "no_members.py": ("from dataclasses import dataclass\nKIND = 'x'\n@dataclass\nclass Config:\n    name: str = 'x'\n",
                      ["no STAGE", "no ARTIFACT", "no apply() function"]),
    "saves_less.py": ('''
from dataclasses import dataclass
from adapterbench.methods.contract import Artifact
KIND, STAGE, SUPPORTS, TRAIN_DEFAULTS, IDENTITY_AT_INIT = "bias", "extract", frozenset(), {}, {}
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
@dataclass
class Config:
    name: str = "saves_less"
def apply(encoder, cfg, names, sources=()):
    for n, p in encoder.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
def trainable_state(encoder, cfg, names):      # forgets all but the first bias
    first = next(n for n, _ in encoder.named_parameters() if n.endswith(".bias"))
    return {first: dict(encoder.named_parameters())[first].detach().clone()}
def load_state(encoder, cfg, names, state):
    params = dict(encoder.named_parameters())
    for n, v in state.items():
        params[n].data.copy_(v)
''', ["trainable:", "save -> load:"]),
    "not_identity.py": ('''
from dataclasses import dataclass
import torch
from adapterbench.methods.contract import Artifact
KIND, STAGE, SUPPORTS, TRAIN_DEFAULTS, IDENTITY_AT_INIT = "noise", "extract", frozenset(), {}, {}
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
@dataclass
class Config:
    name: str = "not_identity"
def apply(encoder, cfg, names, sources=()):
    with torch.no_grad():
        encoder.embeddings.word_embeddings.weight.add_(torch.randn_like(encoder.embeddings.word_embeddings.weight))
    encoder.requires_grad_(False)
    encoder.pooler.dense.bias.requires_grad_(True)
def trainable_state(encoder, cfg, names):
    return {"b": encoder.pooler.dense.bias.detach().clone()}
def load_state(encoder, cfg, names, state):
    encoder.pooler.dense.bias.data.copy_(state["b"])
''', ["identity at init:"]),
    "raises.py": ("raise RuntimeError('boom at import')\n", ["failed to import (RuntimeError: boom at import)"]),
}


@pytest.mark.parametrize("file", BROKEN)
def test_check_method_names_what_a_broken_module_breaks(file, tmp_path):
    text, says = BROKEN[file]
    path = tmp_path / file
    path.write_text(text)
    r = runner.invoke(app, ["check-method", str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    for phrase in says:
        assert phrase in r.output, (phrase, r.output)


def test_a_plugin_trains_evaluates_runs_in_a_study_and_records_its_origin(tiny_bert_dir, task_yamls, data_dir,
                                                                           tmp_path):
    common = ["--model", str(tiny_bert_dir), "--data-dir", str(data_dir), "train.max_steps=3", "train.heldout_min=8",
              "train.log_with=[none]"]
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--out",
                            str(tmp_path / "runs"), *common])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/bitfit/toy/*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == "bitfit" and m["plugin"]["source"] == str(BITFIT)
    assert m["trainable_params"] > 0
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0 and "reproduced the stored dev metrics: yes" in r.output, r.output
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\ntasks: [{task_yamls['toy']}]\nseeds: [1, 2]\nmodels: [{tiny_bert_dir}]\n"
                     f"out_dir: {tmp_path / 'study'}\ndefaults: {{data: {{data_dir: {data_dir}}}, train: {{max_steps: 2, "
                     f"heldout_min: 8, log_with: [none]}}}}\nmethods: [{{name: bitfit}}, {{name: pfeiffer}}]\n")
    r = runner.invoke(app, ["--plugin", str(BITFIT), "run", str(study)])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "study").glob("extract/bitfit/toy/*/metrics.json"))) == 2
    r = runner.invoke(app, ["report", str(tmp_path / "study"), "--no-plot", "--no-majority"])
    assert r.exit_code == 0 and "| bitfit |" in r.output, r.output


def fresh(*args, cwd=None):
    """The CLI in a new process: no plug-in registered unless the command line names it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ADAPTERBENCH_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "adapterbench", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_a_module_named_by_a_file_is_never_imported(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A study (or config) received from someone else that names a module file: nothing runs it."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\ntasks: [{task_yamls['toy']}]\nseeds: [1]\nmodels: [{tiny_bert_dir}]\n"
                     f"out_dir: {tmp_path / 'o'}\nmethods: [{{name: {evil}}}]\n")
    r = fresh("run", study, "--dry-run")
    assert r.returncode == 2 and "is a plug-in that is not loaded: pass --plugin" in r.stderr + r.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: {task_yamls['toy']}\nmethod: {{name: {evil}}}\n")
    r = fresh("extract", "--config", cfg, "--model", tiny_bert_dir, "--data-dir", data_dir, "--out", tmp_path / "o")
    assert r.returncode == 2 and "--plugin" in r.stderr + r.stdout
    assert not marker.exists()


def test_a_received_run_that_needs_a_plugin_says_which(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--model",
                            str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"),
                            "train.max_steps=2", "train.heldout_min=8", "train.log_with=[none]"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/bitfit/toy/*"))
    r = fresh("evaluate", run, "--data-dir", data_dir)
    assert r.returncode == 2 and "unknown method 'bitfit'" in r.stderr and "--plugin" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = fresh("--plugin", BITFIT, "evaluate", run, "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr


def test_report_against_an_archive_matches_model_task_seed_and_protocol(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """The baselines are trained once and archived; the plug-in's runs are compared with them
    without retraining: paired statistics per (user row, archive row); a protocol that differs
    (selection, budget, data) is refused in one line naming it."""
    base = ["--model", str(tiny_bert_dir), "--data-dir", str(data_dir), "train.epochs=2", "train.heldout_min=8",
            "train.log_with=[none]"]
    for seed in (1, 2):
        for method in ("pfeiffer", "full"):
            r = runner.invoke(app, ["extract" if method != "full" else "finetune", "--task", str(task_yamls["toy"]),
                                    "--method", method, "--seed", str(seed), "--out", str(tmp_path / "base"), *base])
            assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--seed",
                                str(seed), "--out", str(tmp_path / "mine"), *base])
        assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["archive", str(tmp_path / "base"), "--out", str(tmp_path / "a.jsonl")]).exit_code == 0
    r = runner.invoke(app, ["report", str(tmp_path / "mine"), "--against", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 0, r.output
    assert "| bitfit |" in r.output and "| pfeiffer (archive) |" in r.output and "| full (archive) |" in r.output
    rows = [x for x in r.output.split("| yours |")[1].splitlines() if x.startswith("| bitfit | ")]
    assert {x.split("|")[2].strip() for x in rows} == {"full (archive)", "pfeiffer (archive)"}
    assert all(x.split("|")[6].strip() == "2" for x in rows)        # 1 task x 2 seeds, paired
    # another protocol: refused, naming it
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--seed", "1",
                            "--out", str(tmp_path / "dev"), *base, "train.selection=dev"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["report", str(tmp_path / "dev"), "--against", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 2 and "archive runs select their epochs on the held-out slice, yours dev" in r.output
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--seed", "1",
                            "--out", str(tmp_path / "long"), *base, "train.epochs=3"])
    r = runner.invoke(app, ["report", str(tmp_path / "long"), "--against", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 2 and "epoch budget of 2, yours 3" in r.output
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", str(BITFIT), "--seed", "7",
                            "--out", str(tmp_path / "s7"), *base])
    r = runner.invoke(app, ["report", str(tmp_path / "s7"), "--against", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 2 and "with seed 7" in r.output and "toy s1" in r.output
