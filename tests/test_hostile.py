"""The defects a hostile afternoon found (issue #14), one test each: nothing a user made is
overwritten or deleted, nothing from a run folder is executed, nothing wrong is reported."""

import json
import os
import stat

import yaml
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()


def extract(tiny_bert_dir, task_yamls, data_dir, out, *extra):
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(out), "train.max_steps=2", "model.pooling=cls", *extra])
    assert r.exit_code == 0, r.output
    return next(p for p in out.glob("extract/*/*/*") if p.is_dir())


def test_export_and_import_refuse_a_users_folder_and_keep_it(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    run = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "runs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    for cmd in (["export", str(run), "--out", str(mine)], ["import", str(run / "adapter"), "--out", str(mine)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and "is not empty" in r.output, r.output
        assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_failed_import_leaves_nothing_and_the_rerun_works(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    run = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "runs")
    hub = tmp_path / "hub"
    assert runner.invoke(app, ["export", str(run), "--out", str(hub)]).exit_code == 0
    good = (hub / "model_head.safetensors").read_bytes()
    (hub / "model_head.safetensors").write_bytes(b"not a safetensors file")
    r = runner.invoke(app, ["import", str(hub), "--out", str(tmp_path / "ours"), "--model", str(tiny_bert_dir)])
    assert r.exit_code == 2 and not (tmp_path / "ours").exists() and not list(tmp_path.glob(".ours.partial*"))
    (hub / "model_head.safetensors").write_bytes(good)
    r = runner.invoke(app, ["import", str(hub), "--out", str(tmp_path / "ours"), "--model", str(tiny_bert_dir)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "ours").iterdir()} >= {"adapter.safetensors", "adapter_config.json"}


def test_a_broken_run_folder_holding_user_files_is_not_deleted(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    run = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "runs")
    (run / "metrics.json").write_text("{ not json")
    (run / "my_notes.md").write_text("what I saw")
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=2", "model.pooling=cls"])
    assert r.exit_code == 2 and "my_notes.md" in r.output
    assert (run / "my_notes.md").read_text() == "what I saw"


def drop_seal(run):
    m = json.loads((run / "metrics.json").read_text())
    del m["sealed"]
    (run / "metrics.json").write_text(json.dumps(m))


def test_evaluate_never_takes_trust_remote_code_from_the_run_folder(tiny_bert_dir, task_yamls, data_dir, tmp_path,
                                                                    monkeypatch):
    from adapterbench.recipe import runmodel as stages   # builds the model (load_encoder)
    run = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "runs")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    seen = []
    real = stages.load_encoder
    monkeypatch.setattr(stages, "load_encoder", lambda name, trust=False, *a: seen.append(trust) or real(name, trust, *a))
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "config.yaml was changed after the run finished" in r.output   # the seal
    assert seen == []
    drop_seal(run)                                   # a forged folder: metrics.json edited too
    r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    assert seen == [False]


def test_fusion_sources_cannot_be_swapped_through_config_yaml(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    a = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "a")
    b = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "b", "--seed", "7")
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(a), "--adapters", str(b),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "f"), "train.max_steps=2",
                            "model.pooling=cls"])
    assert r.exit_code == 0, r.output
    fusion = next(p for p in (tmp_path / "f").glob("fuse/*/*/*") if p.is_dir())
    cfg = yaml.safe_load((fusion / "config.yaml").read_text())
    cfg["method"]["adapters"] = [str(b), str(a)]                 # the same two, swapped
    (fusion / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["evaluate", str(fusion), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "config.yaml was changed after the run finished" in r.output   # the seal
    drop_seal(fusion)                                # a forged folder: metrics.json edited too
    r = runner.invoke(app, ["evaluate", str(fusion), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "other source adapters" in r.output


def test_evaluate_rebuilds_a_user_task_whose_dir_is_relative_to_its_yaml(tiny_bert_dir, tmp_path):
    from .conftest import write_data, write_task_yamls
    project = tmp_path / "project"
    write_data(project)                     # TOY/ beside the YAML, as the README describes
    yamls = write_task_yamls(project)
    out = tmp_path / "runs"
    r = runner.invoke(app, ["extract", "--task", str(yamls["toy"]), "--model", str(tiny_bert_dir), "--out", str(out),
                            "train.max_steps=2"], env={"ADAPTERBENCH_DATA_DIR": ""})
    assert r.exit_code == 0, r.output
    run = next(p for p in out.glob("extract/*/*/*") if p.is_dir())
    r = runner.invoke(app, ["evaluate", str(run)], env={"ADAPTERBENCH_DATA_DIR": ""})
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True


def test_study_labels_and_model_paths_stay_inside_the_study_folder(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    from adapterbench.study import plan as S
    y = tmp_path / "s.yaml"
    y.write_text(f"""name: esc
tasks: [{task_yamls['toy']}]
models: [{tiny_bert_dir}]
out_dir: {tmp_path / 'study'}
defaults: {{data: {{data_dir: {data_dir}}}}}
methods:
  - {{name: pfeiffer}}
  - {{name: pfeiffer, label: "../../escape", source_method: pfeiffer, sources: [{task_yamls['toyreg']}],
     merge: {{strategy: avg}}}}
""")
    for n in S.plan(S.load_study(y)):
        assert (tmp_path / "study").resolve() in n.folder.resolve().parents, n.folder


def test_duplicate_labels_and_non_object_jsonl_rows_are_one_line(task_yamls, data_dir, tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text(task_yamls["toy"].read_text().replace("labels: [neg, pos]", "labels: [neg, pos, neg]"))
    r = runner.invoke(app, ["validate", str(dup), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "listed twice" in r.output
    (data_dir / "J").mkdir()
    (data_dir / "J" / "train.jsonl").write_text('{"sentence": "a", "label": "pos"}\n[1, 2]\n')
    j = tmp_path / "j.yaml"
    j.write_text("name: j\ntext_columns: [sentence]\nlabels: [neg, pos]\n"
                 "sources: {local: {dir: J, format: jsonl, files: {train: train.jsonl}}}\n")
    r = runner.invoke(app, ["validate", str(j), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "line 2" in r.output and "object" in r.output


def test_data_in_another_encoding_is_one_line(task_yamls, data_dir):
    path = data_dir / "TOY" / "train.tsv"
    path.write_bytes(path.read_bytes().replace(b"good", "gööd".encode("latin-1")))
    r = runner.invoke(app, ["validate", str(task_yamls["toy"]), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "not UTF-8" in r.output and "train.tsv" in r.output


def test_a_study_that_depends_on_itself_is_one_line(task_yamls, data_dir, tmp_path):
    y = tmp_path / "loop.yaml"
    y.write_text(f"""name: loop
tasks: [{task_yamls['toy']}]
models: [tiny-bert]
methods:
  - {{name: fusion, label: fus, source_method: fus}}
""")
    r = runner.invoke(app, ["validate", str(y)])
    assert r.exit_code == 2 and "depend on itself" in r.output


def test_files_follow_the_umask_so_colleagues_can_read_a_shared_study(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "runs")
    finally:
        os.umask(old)
    for f in (run / "metrics.json", run / "config.yaml", run / "adapter" / "adapter.safetensors"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & stat.S_IROTH and mode & stat.S_IRGRP, (f, oct(mode))


def test_a_wrong_delimiter_is_named_not_blamed_on_a_row(task_yamls, data_dir):
    path = data_dir / "TOY" / "train.tsv"
    path.write_text(path.read_text().replace("\t", ","))
    r = runner.invoke(app, ["validate", str(task_yamls["toy"]), "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "comma-separated" in r.output and "line" not in r.output.split("separated")[0]


def test_bench_options_out_of_range_are_one_line(tmp_path):
    for opt in (["--batch-size", "0"], ["--seq-len", "2"], ["--repeat", "0"], ["--steps", "-1"],
                ["--precision", "fp8"]):
        r = runner.invoke(app, ["bench", "--model", "tiny-bert", "--configs", "pfeiffer", "--out", str(tmp_path), *opt])
        assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.strip().splitlines()) <= 2, opt


def test_unusual_but_legal_characters_are_read_not_rejected(tmp_path):
    """A line separator (U+2028) or form feed inside a sentence, a quoted CSV field spanning two
    lines, and JSON strings with U+2028 are data, not row breaks."""
    from adapterbench.data import read_rows
    tsv = tmp_path / "a.tsv"
    tsv.write_text("sentence\tlabel\nfirst\u2028half\tpos\nform\x0cfeed\tneg\n", encoding="utf-8")
    assert [r["sentence"] for _, r in read_rows(tsv, "tsv", None)] == ["first\u2028half", "form\x0cfeed"]
    csv_ = tmp_path / "a.csv"
    csv_.write_text('sentence,label\n"two\nlines, one field",pos\nplain,neg\n', encoding="utf-8")
    rows = read_rows(csv_, "csv", None)
    assert [r["sentence"] for _, r in rows] == ["two\nlines, one field", "plain"] and rows[1][0] == 4
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"sentence": "a\u2028b", "label": "pos"}\r\n{"sentence": "c", "label": "neg"}\n', encoding="utf-8")
    assert [r["sentence"] for _, r in read_rows(jl, "jsonl", None)] == ["a\u2028b", "c"]
