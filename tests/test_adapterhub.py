"""AdapterHub format: adapters saved by the `adapters` library (fixtures it produced, via
scripts/parity_adapterhub.py --fixture) import with the same logits; export -> import is
lossless; imported adapters fuse and merge like ours."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterbench.interop.adapterhub import export, import_adapter
from adapterbench.cli import app
from adapterbench.fileio import load_tensors

FIX = Path(__file__).parent / "fixtures" / "adapterhub"
MODEL = str(FIX / "model")
runner = CliRunner()


def logits_of(adapter_dir: Path, pairs, active=True):
    import sys
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from parity_adapterhub import our_model
    model, tok = our_model(MODEL, adapter_dir)
    if not active:
        from adapterbench.methods.fusion import sites
        for s in sites(model.encoder):
            s.active = []
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    with torch.no_grad():
        return model.logits(**enc)


@pytest.mark.parametrize("method", ["pfeiffer", "houlsby"])
def test_import_matches_the_peer_logits(method, tmp_path):
    expected = json.loads((FIX / method / "expected.json").read_text())
    r = runner.invoke(app, ["import", str(FIX / method / "adapter"), "--out", str(tmp_path / "a"), "--model", MODEL])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["method"]["name"] == method and meta["base_model"] == MODEL
    got = logits_of(tmp_path / "a", expected["pairs"])
    want = torch.tensor(expected["logits"])
    assert (got - want).abs().max() < 1e-5
    bare = logits_of(tmp_path / "a", expected["pairs"], active=False)
    assert (bare - want).abs().max() > 1e-4   # the adapter matters, so the match is not vacuous


@pytest.mark.parametrize("method", ["pfeiffer", "houlsby"])
def test_export_then_import_is_lossless(method, tmp_path):
    src = import_adapter(FIX / method / "adapter", tmp_path / "ours", base_model=MODEL)
    out = export(src, tmp_path / "hub")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["config"]["mh_adapter"] is (method == "houlsby") and cfg["config"]["output_adapter"] is True
    assert cfg["config"]["original_ln_before"] is (method == "pfeiffer") and cfg["version"].startswith("adapters.")
    assert any(k.endswith(".adapters.peer.adapter_down.0.weight") for k in load_tensors(out / "adapter.safetensors"))
    assert {"heads.peer.1.weight", "heads.peer.4.bias"} <= set(load_tensors(out / "model_head.safetensors"))
    back = import_adapter(out, tmp_path / "back", base_model=MODEL)
    for f in ("adapter.safetensors", "head.safetensors"):
        a, b = load_tensors(src / f), load_tensors(back / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = runner.invoke(app, ["export", str(src), "--out", str(out)])
    assert r.exit_code == 2 and "is not empty" in r.output


def test_imported_adapters_fuse_and_merge(task_yamls, data_dir, tmp_path):
    a = import_adapter(FIX / "pfeiffer" / "adapter", tmp_path / "a", base_model=MODEL)
    a2 = import_adapter(FIX / "pfeiffer" / "adapter", tmp_path / "a2", base_model=MODEL)   # a source is named once
    r = runner.invoke(app, ["merge", "--adapters", str(a), str(a2), "--strategy", "align", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(a), str(tmp_path / "m"),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=2", "model.max_length=64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(FIX / "pfeiffer" / "adapter"),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs2")])
    assert r.exit_code == 2 and "convert it first with `adapterbench import" in r.output


def test_export_refuses_trained_layer_norms(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--method",
                            "houlsby", "--data-dir", str(data_dir), "--out", str(tmp_path), "train.max_steps=1"])
    run = next(tmp_path.glob("extract/houlsby/toy/*"))
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "hub")])
    assert r.exit_code == 2 and "trained its own LayerNorms" in r.output


def test_fusion_run_exports_in_adapterhub_layout(task_yamls, data_dir, tmp_path):
    a = import_adapter(FIX / "pfeiffer" / "adapter", tmp_path / "a", base_model=MODEL)
    b = import_adapter(FIX / "pfeiffer" / "adapter", tmp_path / "b", base_model=MODEL)
    meta = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**meta, "task": "other"}))
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(a), str(b),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=1", "model.max_length=64"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("fuse/fusion/toy/*"))
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "hub")])
    assert r.exit_code == 0, r.output
    hub = tmp_path / "hub"
    cfg = json.loads((hub / "fusion" / "adapter_fusion_config.json").read_text())
    assert cfg["adapter_names"] == ["peer", "other"] and cfg["config"]["value_initialized"] is True
    w = load_tensors(hub / "fusion" / "model_adapter_fusion.safetensors")
    assert "bert.encoder.layer.1.output.adapter_fusion_layer.peer,other.value.weight" in w and len(w) == 2 * 5
    assert (hub / "other" / "adapter.safetensors").is_file() and (hub / "head" / "model_head.safetensors").is_file()


def test_export_refuses_a_head_adapterhub_cannot_represent(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A mean-pooling head has no AdapterHub form (its classification head reads the first token)."""
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=1", "model.pooling=mean"])
    assert r.exit_code == 0, r.output
    run = next(p for p in (tmp_path / "runs").glob("extract/*/*/*") if p.is_dir())
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "hub")])
    assert r.exit_code == 2 and "mean-pools" in r.output and not (tmp_path / "hub").exists()
    # the adapter alone (a fusion source for the library) exports, with no head files
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "hub"), "--no-head"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    state = load_tensors(tmp_path / "hub" / "adapter.safetensors")
    assert len(state) == 4 * 2 and all(".adapters.toy.adapter_" in k for k in state)


def test_import_of_an_adapterhub_fusion_gives_the_peer_logits(tmp_path):
    """A fusion saved by the `adapters` library (two seq_bn adapters, save_adapter_fusion, the head;
    made by scripts/parity_adapterhub.py --fixture) imports and gives its logits (the peer's side
    of the parity, recorded offline; the live check both ways is the parity script)."""
    from adapterbench.interop.adapterhub import load_fusion
    r = runner.invoke(app, ["import", str(FIX / "fusion" / "saved"), "--out", str(tmp_path / "f"), "--model", MODEL])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"sources", "fusion"}
    model, tok = load_fusion(tmp_path / "f")
    exp = json.loads((FIX / "fusion" / "expected.json").read_text())
    enc = tok([a for a, _ in exp["pairs"]], [b for _, b in exp["pairs"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model.logits(**enc)
    assert (got - torch.tensor(exp["logits"])).abs().max() < 1e-4
    from adapterbench.methods.fusion import sites
    for site in sites(model.encoder):      # the fusion is really used: without it the logits move
        site.active = []
    with torch.no_grad():
        assert (model.logits(**enc) - got).abs().max() > 1e-3
    meta = json.loads((tmp_path / "f" / "fusion" / "fusion_config.json").read_text())
    assert meta["method"]["variant"] == "dynamic" and len(meta["method"]["adapters"]) == 2
