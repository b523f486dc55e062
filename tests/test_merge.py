"""Merging: unit permutations keep outputs, align recovers a known permutation, identical
adapters merge to themselves, weights (1, 0) give the first, ties, same-track, and the merged
folder works with fuse and extract --init-from; few-shot sampling."""

import json

import pytest
import torch
from typer.testing import CliRunner

from adapterbench.recipe import merge as M
from adapterbench.cli import app
from adapterbench.recipe.splits import few_shot
from adapterbench.errors import UserError
from adapterbench.methods import get_method, method_config

from .conftest import tiny_batch, tiny_encoder

runner = CliRunner()


def adapted(state=None, seed=0):
    enc = tiny_encoder("bert")
    mod, cfg = get_method("pfeiffer"), method_config({"name": "pfeiffer", "reduction_factor": 4})
    torch.manual_seed(seed)
    mod.apply(enc, cfg, ["a"])
    if state is not None:
        mod.load_state(enc, cfg, ["a"], state)
    return enc.eval(), mod.trainable_state(enc, cfg, ["a"])


def out_of(enc):
    with torch.no_grad():
        return enc(**tiny_batch()).last_hidden_state


def test_permuting_units_leaves_outputs_unchanged():
    enc, state = adapted(seed=1)
    want = out_of(enc)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    for site in M.unit_keys(state):
        M.permute_units(state, site, perm)
    enc2, _ = adapted(state)
    assert torch.allclose(out_of(enc2), want, atol=1e-6)
    assert not torch.equal(state["0.ffn.down.weight"], adapted(seed=1)[1]["0.ffn.down.weight"])


def test_align_recovers_a_known_permutation_exactly():
    _, ref = adapted(seed=1)
    shuffled = dict(ref)
    perms = {}
    for i, site in enumerate(M.unit_keys(ref)):
        perms[site] = torch.randperm(8, generator=torch.Generator().manual_seed(i + 5))
        M.permute_units(shuffled, site, perms[site])
    aligned = M.align([ref, shuffled])[1]
    assert all(torch.equal(aligned[k], ref[k]) for k in ref)
    assert M.average([ref, shuffled], [1, 1])["0.ffn.down.weight"].sub(ref["0.ffn.down.weight"]).abs().max() > 1e-3
    merged = M.average(M.align([ref, shuffled]), [1, 1])
    assert all(torch.allclose(merged[k], ref[k]) for k in ref)


def test_activation_cost_prefers_matching_units():
    a = torch.randn(50, 4)
    cost = M.activation_cost(a, a[:, [2, 0, 3, 1]])
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(cost)
    assert list(cols[rows.argsort()]) == [1, 3, 0, 2]


def test_identical_adapters_and_one_zero_weights():
    _, a = adapted(seed=1)
    _, b = adapted(seed=2)
    for strategy in ("avg",):
        merged = M.average([a, a, a], [1, 1, 1])
        assert all(torch.allclose(merged[k], a[k]) for k in a)
    first = M.average([a, b], [1, 0])
    assert all(torch.equal(first[k], a[k]) for k in a)
    assert all(torch.allclose(M.align([a, a])[1][k], a[k]) for k in a)
    ta = M.task_arithmetic([a, b], [1.0, 1.0])
    assert torch.allclose(ta["0.ffn.up.weight"], a["0.ffn.up.weight"] + b["0.ffn.up.weight"])
    same = M.ties([a, a], [1, 1], density=1.0)
    assert all(torch.allclose(same[k], a[k]) for k in a)


def test_ties_trims_and_elects_signs():
    x = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}
    y = {"w": torch.tensor([1.0, -4.0, -0.1, -1.0])}
    out = M.ties([x, y], [1, 1], density=0.5)["w"]
    # x keeps 3, 2; y keeps -4, 1 -> elected signs +, -, 0, + ; agreeing means: (3+1)/2, -4, 0, 2
    assert torch.allclose(out, torch.tensor([2.0, -4.0, 0.0, 2.0]))


def extract(tiny_bert_dir, task_yaml, data_dir, out, seed, *extra):
    r = runner.invoke(app, ["extract", "--task", str(task_yaml), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(out), "--seed", str(seed), "train.epochs=1", *extra])
    assert r.exit_code == 0, r.output
    return sorted(out.glob("extract/*/*/*"))[-1]


def test_merge_cli_then_fuse_and_init_from(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    srcs = [extract(tiny_bert_dir, task_yamls["toy"], data_dir, tmp_path / f"s{i}", i) for i in range(2)]
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapters", *map(str, srcs), "--strategy", "align", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["merge"]["strategy"] == "align" and "interpretation" in meta["merge"]["note"]
    assert [s["path"] for s in meta["merge"]["sources"]] == [str((s / "adapter").resolve()) for s in srcs]
    r = runner.invoke(app, ["merge", "--adapters", *map(str, srcs), "--out", str(out)])
    assert r.exit_code == 2 and "is not empty" in r.output    # nothing overwritten silently
    r = runner.invoke(app, ["merge", "--adapters", str(srcs[0]), str(srcs[1]), "--strategy", "avg",
                            "--weights", "1,0", "--out", str(tmp_path / "first")])
    assert r.exit_code == 0
    from adapterbench.fileio import load_tensors
    a = load_tensors(srcs[0] / "adapter" / "adapter.safetensors")
    b = load_tensors(tmp_path / "first" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the merged folder is accepted by extract --init-from ...
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "ft"), "--init-from", str(out),
                            "train.max_steps=1"])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "ft").glob("extract/pfeiffer/toy/*"))
    assert runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "ft2"), "--init-from", str(out),
                            "method.reduction_factor=8"])
    assert r.exit_code == 2 and "differs in method.reduction_factor" in r.output
    # ... and by fuse
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(out), str(srcs[0]),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "fz"), "train.max_steps=1"])
    assert r.exit_code == 0, r.output


def test_same_track_selection(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    nli = extract(tiny_bert_dir, task_yamls["toy"], data_dir, tmp_path / "n", 0)  # toy's track: nli
    reg = task_yamls["toyreg"]
    reg.write_text(reg.read_text().replace("version: 1\n", "version: 1\ntrack: paraphrase\n"))
    para = extract(tiny_bert_dir, reg, data_dir, tmp_path / "p", 0)
    sources = M.read_sources([str(nli), str(para)])
    for s in sources:  # tasks given by path resolve by name through the shipped YAMLs: use rte/mrpc
        s.meta = dict(s.meta, task={"toy": "cb", "toyreg": "stsb"}[s.meta["task"]])
    kept = M.same_track(sources, "rte", include_target=False)
    assert [s.meta["task"] for s in kept] == ["cb"]
    kept = M.same_track(sources, "mrpc", include_target=False)
    assert [s.meta["task"] for s in kept] == ["stsb"]
    assert M.same_track(sources, "cb", include_target=True)[0].meta["task"] == "cb"
    with pytest.raises(UserError, match="no source adapter is in track"):
        M.same_track(sources, "cb", include_target=False)


def test_few_shot_sampling():
    ex = [{"label": i % 3, "text": (str(i),)} for i in range(60)]
    a = few_shot(ex, 4, False, seed=1)
    assert len(a) == 12 and sorted(e["label"] for e in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert a == few_shot(ex, 4, False, seed=1) and a != few_shot(ex, 4, False, seed=2)
    assert len(few_shot([{"label": float(i)} for i in range(30)], 8, True, seed=0)) == 8
    with pytest.raises(UserError, match="has only"):
        few_shot(ex, 25, False, seed=0)


def test_merge_never_writes_into_a_users_folder(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A folder holding a user's files (but no adapter_config.json) is refused, the file untouched."""
    a = extract(tiny_bert_dir, task_yamls["toy"], data_dir, tmp_path / "a", 0)
    b = extract(tiny_bert_dir, task_yamls["toy"], data_dir, tmp_path / "b", 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    r = runner.invoke(app, ["merge", "--adapters", str(a), str(b), "--out", str(mine)])
    assert r.exit_code == 2 and "is not empty" in r.output and "--force" in r.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"


def test_sources_of_one_seed_start_apart_and_merge_records_alignment(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """MerA needs sources that did not start from one point: the initialisation depends on the
    task as well as the seed (so align is not avg), and merge records per source how far it
    moved from its initialisation and how far each site's alignment is from the identity."""
    import torch
    from adapterbench.config import RunConfig
    from adapterbench.recipe.runmodel import init_seed
    cfg = RunConfig(seed=3)
    assert init_seed(cfg, ["rte"]) != init_seed(cfg, ["mrpc"]) and init_seed(cfg, ["rte"]) == init_seed(cfg, ["rte"])
    a = extract(tiny_bert_dir, task_yamls["toy"], data_dir, tmp_path / "a", 0, "method.reduction_factor=2")
    b = extract(tiny_bert_dir, task_yamls["toyreg"], data_dir, tmp_path / "b", 0, "method.reduction_factor=2")
    r = runner.invoke(app, ["merge", "--adapters", str(a), str(b), "--strategy", "align", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    sources = json.loads((tmp_path / "m" / "adapter_config.json").read_text())["merge"]["sources"]
    assert all(0 < s["relative_change"] < 10 for s in sources)
    assert set(sources[0]["units_moved"].values()) == {0.0}            # the reference is not permuted
    assert any(v > 0 for v in sources[1]["units_moved"].values())      # the other is, somewhere
    r = runner.invoke(app, ["merge", "--adapters", str(a), str(b), "--strategy", "avg", "--out", str(tmp_path / "v")])
    from adapterbench.fileio import load_tensors
    x, y = load_tensors(tmp_path / "m" / "adapter.safetensors"), load_tensors(tmp_path / "v" / "adapter.safetensors")
    assert any(not torch.equal(x[k], y[k]) for k in x)                 # align != avg
