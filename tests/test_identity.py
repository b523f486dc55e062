"""A run's identity is everything that decides its result: the resolved config, the task's
definition and the content of its data. The same task by another path is the same run; an
edited task or data file is a new run; folders named before tasks had an identity are kept."""

import json
import os
import shutil

from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.config import config_hash, to_dict
from adapterbench.recipe.stages import planned_folder, resolve, tasks_of

runner = CliRunner()


def folder_for(task_path, data_dir, tmp_path, **train):
    cfg = resolve({"task": str(task_path), "model": {"name": "tiny-bert"}, "data": {"data_dir": str(data_dir)},
                   "out_dir": str(tmp_path / "runs"), "train": train}, "extract")
    return planned_folder("extract", cfg), cfg


def test_same_task_by_another_path_is_the_same_run(task_yamls, data_dir, tmp_path, monkeypatch):
    absolute, _ = folder_for(task_yamls["toy"], data_dir, tmp_path)
    monkeypatch.chdir(task_yamls["toy"].parent)
    relative, _ = folder_for(os.path.relpath(task_yamls["toy"]), data_dir, tmp_path)
    assert absolute == relative
    copy = tmp_path / "elsewhere" / "toy.yaml"
    copy.parent.mkdir()
    shutil.copy(task_yamls["toy"], copy)
    assert folder_for(copy, data_dir, tmp_path)[0] == absolute     # same definition, same data


def test_edited_task_or_data_is_a_new_run(task_yamls, data_dir, tmp_path):
    before, _ = folder_for(task_yamls["toy"], data_dir, tmp_path)
    text = task_yamls["toy"].read_text()
    task_yamls["toy"].write_text(text.replace("main_metric: accuracy", "main_metric: f1"))
    assert folder_for(task_yamls["toy"], data_dir, tmp_path)[0] != before
    task_yamls["toy"].write_text(text)
    assert folder_for(task_yamls["toy"], data_dir, tmp_path)[0] == before
    train = data_dir / "TOY" / "train.tsv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:-1]) + "\n")                # one example fewer
    assert folder_for(task_yamls["toy"], data_dir, tmp_path)[0] != before


def test_a_finished_folder_of_the_old_naming_is_found_and_not_retrained(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    args = ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir", str(data_dir),
            "--out", str(tmp_path / "runs"), "train.max_steps=2"]
    assert runner.invoke(app, args).exit_code == 0
    new = next((tmp_path / "runs").glob("extract/pfeiffer/toy/*"))
    cfg = resolve({"task": str(task_yamls["toy"]), "model": {"name": str(tiny_bert_dir)},
                   "data": {"data_dir": str(data_dir)}, "out_dir": str(tmp_path / "runs"),
                   "train": {"max_steps": 2}}, "extract")
    legacy = new.with_name(new.name.rsplit("-", 1)[0] + "-" + config_hash(to_dict(cfg)))
    assert legacy != new
    new.rename(legacy)                                              # as an older adapterbench named it
    before = (legacy / "metrics.json").read_text()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already done" in r.output and str(legacy.name) in r.output.replace("\n", "")
    assert (legacy / "metrics.json").read_text() == before and not new.exists()
    assert json.loads((legacy / "identity.json").read_text())["task_identity"]
    assert [t.name for t in tasks_of(cfg)] == ["toy"]
