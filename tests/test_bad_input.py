"""Bad input never ends in a traceback: one line naming the problem and the fix, exit code
2, and no run folder that looks finished. One case per row."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory):
    """Two finished adapter runs, trained once for the module (each case corrupts copies)."""
    from .conftest import write_data, write_task_yamls
    root = tmp_path_factory.mktemp("trained")
    data, yamls = write_data(root / "data"), write_task_yamls(root)
    runs = []
    for seed, extra in ((0, []), (1, ["method.reduction_factor=8"])):
        r = runner.invoke(app, ["extract", "--task", str(yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                                str(data), "--out", str(root / f"s{seed}"), "--seed", str(seed), "train.max_steps=1",
                                *extra])
        assert r.exit_code == 0, r.output
        runs.append(next((root / f"s{seed}").glob("extract/pfeiffer/toy/*")))
    return runs


@pytest.fixture()
def env(tiny_bert_dir, task_yamls, data_dir, tmp_path, trained):
    """A workspace with copies of two finished adapter runs to corrupt in various ways."""
    base = ["--model", str(tiny_bert_dir), "--data-dir", str(data_dir)]
    runs = []
    for i, run in enumerate(trained):
        runs.append(tmp_path / "runs" / f"s{i}" / run.name)
        shutil.copytree(run, runs[-1])
    return {"tmp": tmp_path, "out": tmp_path / "runs" / "new", "base": base, "toy": str(task_yamls["toy"]),
            "data": data_dir, "runs": runs, "toyreg": str(task_yamls["toyreg"])}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def task_variant(env, name, old, new):
    text = Path(env["toy"]).read_text().replace(old, new)
    return write(env["tmp"] / f"{name}.yaml", text)


def failed_copy(env):
    run = env["tmp"] / "failed-run"
    shutil.copytree(env["runs"][0], run)
    (run / "metrics.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    return str(run)


def no_weights(env):
    run = env["tmp"] / "noweights"
    shutil.copytree(env["runs"][0], run)
    (run / "adapter" / "adapter.safetensors").unlink()
    return str(run)


def corrupt_weights(env):
    run = env["tmp"] / "corrupt"
    shutil.copytree(env["runs"][0], run)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"\x00garbage")
    return str(run)


def other_model(env):
    run = env["tmp"] / "othermodel"
    shutil.copytree(env["runs"][0], run)
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    meta["hidden_size"] = 768
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(meta))
    return str(run)


def train(env, *args):
    return ["extract", *env["base"], "--out", str(env["out"]), *args]


CASES = {
    # configs
    "malformed YAML": (lambda e: train(e, "--config", write(e["tmp"] / "c.yaml", "task: [rte\n")), "malformed YAML"),
    "YAML not a mapping": (lambda e: train(e, "--config", write(e["tmp"] / "c.yaml", "- a\n- b\n")),
                           "expected a mapping of keys"),
    "config file missing": (lambda e: train(e, "--config", str(e["tmp"] / "nope.yaml")), "does not exist"),
    "unknown top-level key": (lambda e: train(e, "--task", e["toy"], "epochs=3"), "unknown config key 'epochs'"),
    "unknown nested key": (lambda e: train(e, "--task", e["toy"], "train.lrate=1"), "unknown config key 'train.lrate'"),
    "unknown method key": (lambda e: train(e, "--task", e["toy"], "method.rank=4"), "unknown config key 'method.rank'"),
    "wrong type int": (lambda e: train(e, "--task", e["toy"], "train.epochs=abc"), "must be an integer"),
    "wrong type bool": (lambda e: train(e, "--task", e["toy"], "train.save_model=maybe"), "must be true or false"),
    "negative lr": (lambda e: train(e, "--task", e["toy"], "train.lr=-1"), "'train.lr' = -1.0 is out of range"),
    "warmup out of range": (lambda e: train(e, "--task", e["toy"], "train.warmup_ratio=1.5"), "out of range"),
    "override without =": (lambda e: train(e, "--task", e["toy"], "trainlr"), "is not key=value"),
    "unknown method": (lambda e: train(e, "--task", e["toy"], "--method", "dora"), "unknown method 'dora'"),
    "unknown activation": (lambda e: train(e, "--task", e["toy"], "method.activation=foo"), "method.activation 'foo'"),
    "zero reduction factor": (lambda e: train(e, "--task", e["toy"], "method.reduction_factor=0"),
                              "reduction_factor 0.0 must be positive"),
    "unknown task": (lambda e: train(e, "--task", "nosuch"), "unknown task 'nosuch'"),
    "no task": (lambda e: train(e), "no task given"),
    # task YAMLs and data
    "unknown metric": (lambda e: train(e, "--task", task_variant(e, "m", "[accuracy, f1]", "[accuracy, bleu]")),
                       "unknown metric 'bleu'"),
    "main metric not listed": (lambda e: train(e, "--task", task_variant(e, "mm", "main_metric: accuracy",
                                                                            "main_metric: mcc")),
                               "main_metric 'mcc' is not in metrics"),
    "path traversal in task name": (lambda e: train(e, "--task", task_variant(e, "pt", "name: toy", "name: ../../x")),
                                    "must be letters, digits"),
    "missing data files": (lambda e: (e["tmp"] / "empty").mkdir(exist_ok=True) or
                           ["extract", "--model", e["base"][1], "--data-dir", str(e["tmp"] / "empty"),
                                      "--out", str(e["out"]), "--task", e["toy"]], "local files not found"),
    "missing column": (lambda e: (write(e["data"] / "TOY" / "train.tsv", "index\tsentence1\tlabel\n0\ta\tpos\n"),
                                  train(e, "--task", e["toy"]))[1], "column 'sentence2' (text 'sentence2') is missing"),
    "empty split": (lambda e: (write(e["data"] / "TOY" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n"),
                               train(e, "--task", e["toy"]))[1], "is empty"),
    "malformed row": (lambda e: (write(e["data"] / "TOY" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\n"),
                                 train(e, "--task", e["toy"]))[1], "2 fields where the header has 4"),
    "label outside label set": (lambda e: (write(e["data"] / "TOY" / "dev.tsv",
                                                 "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n"),
                                           train(e, "--task", e["toy"]))[1], "label 'maybe' is not one of"),
    "NaN score": (lambda e: (write(e["data"] / "TOYREG" / "train.tsv", "sentence\tscore\nthe cat\tnan\n"),
                             train(e, "--task", e["toyreg"]))[1], "is not finite"),
    "score not a number": (lambda e: (write(e["data"] / "TOYREG" / "train.tsv", "sentence\tscore\nthe cat\thigh\n"),
                                      train(e, "--task", e["toyreg"]))[1], "score 'high' is not a number"),
    # models and adapters
    "model cannot be loaded": (lambda e: ["extract", "--task", e["toy"], "--model", str(e["tmp"] / "nomodel"),
                                          "--data-dir", str(e["data"]), "--out", str(e["out"])], "model folder"),
    "model folder without a model": (lambda e: ["extract", "--task", e["toy"], "--model", str(e["tmp"]),
                                                "--data-dir", str(e["data"]), "--out", str(e["out"])],
                                     "cannot load model"),
    "fusion source not an adapter": (lambda e: ["fuse", "--target", e["toy"], "--adapters", str(e["tmp"]),
                                                *e["base"], "--out", str(e["out"])], "neither an adapter folder"),
    "fusion sources of different sizes": (lambda e: ["fuse", "--target", e["toy"], "--adapters", *map(str, e["runs"]),
                                                     *e["base"], "--out", str(e["out"])],
                                          "differs in adapter config method.reduction_factor"),
    "fusion sources of another model": (lambda e: ["fuse", "--target", e["toy"], "--adapters", str(e["runs"][0]),
                                                   other_model(e), *e["base"], "--out", str(e["out"])],
                                        "differs in hidden_size"),
    "corrupted adapter weights": (lambda e: ["fuse", "--target", e["toy"], "--adapters", corrupt_weights(e),
                                             *e["base"], "--out", str(e["out"])], "is corrupted"),
    "init_from another size": (lambda e: train(e, "--task", e["toy"], "--init-from", str(e["runs"][1])),
                               "differs in method.reduction_factor"),
    "merge weights count": (lambda e: ["merge", "--adapters", str(e["runs"][0]), "--weights", "1,2",
                                       "--out", str(e["tmp"] / "m")], "--weights has 2 values for 1 sources"),
    # run folders and other CLI input
    "run folder does not exist": (lambda e: ["evaluate", str(e["tmp"] / "nope")], "does not exist"),
    "run folder not ok": (lambda e: ["evaluate", failed_copy(e)], "has status 'failed', not ok"),
    "weights missing": (lambda e: ["evaluate", no_weights(e)], "is missing"),
    "bad split": (lambda e: ["evaluate", str(e["runs"][0]), "--split", "train"], "must be dev or test"),
    "bad shard": (lambda e: ["run", write(e["tmp"] / "s.yaml", "name: s\ntasks: [rte]\nmethods: [{name: full}]\n"),
                             "--shard", "3/2"], "--shard '3/2'"),
    "study name with path": (lambda e: ["run", write(e["tmp"] / "s.yaml",
                                                     "name: ../x\ntasks: [rte]\nmethods: [{name: full}]\n"),
                                        "--dry-run"], "must be letters, digits"),
    "report without runs": (lambda e: ["report", str(e["tmp"] / "empty-runs")], "does not exist"),
    "unknown reference": (lambda e: ["report", str(e["runs"][0].parent), "--reference", "x"], "unknown reference"),
    "unknown ls target": (lambda e: ["ls", "models"], "cannot list 'models'"),
    "unknown study name": (lambda e: ["status", "nosuchstudy"], "no study file 'nosuchstudy': give a path or"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, env):
    make_args, needle = CASES[case]
    r = runner.invoke(app, make_args(env))
    text = r.output.strip()
    assert r.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert needle in text, text
    print(f"\nBADINPUT {case} :: {text}")  # shown with -s: the list of cases and their messages
    finished = [m for m in env["out"].glob("**/metrics.json") if json.loads(m.read_text()).get("status") == "ok"]
    assert not finished


def test_nan_loss_marks_run_failed_with_step(env):
    write(env["data"] / "TOYREG" / "train.tsv", "sentence\tscore\nthe cat\t1e30\na dog\t-1e30\n")
    r = runner.invoke(app, train(env, "--task", env["toyreg"]))
    assert r.exit_code == 2 and "loss became inf at step 1: lower train.lr" in r.output
    m = json.loads(next(env["out"].glob("**/metrics.json")).read_text())
    assert m["status"] == "failed" and "at step 1" in m["error"]


def test_disk_full_keeps_earlier_files(tmp_path, monkeypatch):
    import errno
    import os
    from adapterbench.errors import UserError
    from adapterbench.fileio import atomic_write
    target = tmp_path / "metrics.json"
    atomic_write(target, "old")
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device.*files written before are intact"):
        atomic_write(target, "new")
    monkeypatch.setattr(os, "fsync", real)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
