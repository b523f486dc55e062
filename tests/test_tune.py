"""`adapterbench tune`: Optuna's TPE over a space of config keys, decided on the held-out slice
only; every trial an ordinary run folder; the journal resumes (a rerun adds no trial); the best
config is a run config `extract --config` accepts; bad spaces are one line each."""

import json

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()
optuna = pytest.importorskip("optuna")


def tune_args(tiny_bert_dir, task_yamls, data_dir, out, *extra):
    return ["tune", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir", str(data_dir),
            "--out", str(out), "--method", "pfeiffer", "train.epochs=2", "train.heldout_min=8", "train.log_with=[none]",
            *extra]


def test_tune_finishes_resumes_and_writes_the_best_config(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    out = tmp_path / "t"
    args = tune_args(tiny_bert_dir, task_yamls, data_dir, out, "--trials", "3", "--space",
                     "train.lr=loguniform(1e-4,1e-2)", "--space", "method.reduction_factor=choice(8,16)")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "3 trials done" in r.output and (out / "optuna.journal").is_file()
    study = optuna.load_study(study_name="tune", storage=__import__("adapterbench.study.tune", fromlist=["x"]).storage(out))
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 3
    runs = {t.user_attrs["run"] for t in done if "run" in t.user_attrs}
    for t in done:
        if t.state.name == "COMPLETE":
            m = json.loads((tmp_path / t.user_attrs["run"] / "metrics.json").read_text()) \
                if not t.user_attrs["run"].startswith("/") else json.loads(open(t.user_attrs["run"] + "/metrics.json").read())
            assert m["selection"] == "heldout"
            assert t.value == pytest.approx(m["tasks"]["toy"]["heldout"]["accuracy"])   # chosen on held-out, not dev
            assert m["label"] == "pfeiffer (tune)"
    assert len(runs) == len([t for t in done if t.state.name == "COMPLETE"])
    best = study.best_trial
    text = (out / "best.yaml").read_text()
    assert f"lr: {best.params['train.lr']}" in text or str(best.params["train.lr"]) in text
    assert (out / "optimization_history.png").stat().st_size > 1000
    # the same command again: nothing new
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "3 trials done" in r.output
    assert len(optuna.load_study(study_name="tune", storage=__import__("adapterbench.study.tune", fromlist=["x"]).storage(out)).trials) == 3
    # the best config trains as it is
    r = runner.invoke(app, ["extract", "--config", str(out / "best.yaml"), "--model", str(tiny_bert_dir),
                            "--data-dir", str(data_dir), "--out", str(tmp_path / "again"), "train.max_steps=1"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("space,says", [
    ("train.lrr=loguniform(1e-4,1e-2)", "unknown config key 'train.lrr'"),
    ("train.lr=logu(1e-4,1e-2)", "must be KEY=SPEC"),
    ("train.lr", "must be KEY=SPEC"),
    ("train.lr=uniform(1e-2,1e-4)", "the range is empty"),
    ("train.lr=loguniform(0,1e-2)", "loguniform needs low > 0"),
    ("train.epochs=int(1.5,3)", "int takes two integers"),
    ("method.reduction_factor=choice(8,8)", "choice needs distinct values"),
    ("train.lr=uniform(a,b)", "takes two numbers"),
    ("train.lr=uniform(1,nan)", "the range is empty"),
])
def test_bad_spaces_are_one_line(space, says, tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = runner.invoke(app, tune_args(tiny_bert_dir, task_yamls, data_dir, tmp_path / "t", "--space", space))
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) <= 3
    assert not (tmp_path / "t" / "optuna.journal").exists()


def test_tune_refuses_dev_selection(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    r = runner.invoke(app, tune_args(tiny_bert_dir, task_yamls, data_dir, tmp_path / "t", "--space",
                                     "train.lr=loguniform(1e-4,1e-2)", "train.selection=dev"))
    assert r.exit_code == 2 and "held-out slice" in r.output


def check_shared_journal(out, trials: int):
    """Every trial ran once: as many finished trials as asked, each with its own run folder and
    values, and no run folder trained by two trials."""
    from adapterbench.study.tune import storage
    study = optuna.load_study(study_name="tune", storage=storage(out))
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) >= trials
    runs = [t.user_attrs["run"] for t in done if t.state.name == "COMPLETE"]
    assert len(runs) == len(set(runs))
    trained = list((out / "trials").glob("**/metrics.json"))
    assert len([m for m in trained if json.loads(m.read_text())["status"] == "ok"]) == len(runs)   # each trained once
    hosts = {(t.user_attrs.get("host"), t.user_attrs.get("pid")) for t in done}
    return study, hosts


@pytest.mark.slow
def test_two_local_workers_share_one_journal(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    out = tmp_path / "t"
    r = runner.invoke(app, tune_args(tiny_bert_dir, task_yamls, data_dir, out, "--trials", "4", "--space",
                                     "train.lr=loguniform(1e-4,1e-2)", "--launcher", "submitit-local", "--workers",
                                     "2", "--wait"))
    assert r.exit_code == 0, r.output
    study, hosts = check_shared_journal(out, 4)
    assert r.output.count("'done': ") == 2                         # both workers ran to the end, from one journal
    r = runner.invoke(app, tune_args(tiny_bert_dir, task_yamls, data_dir, out, "--trials", "4", "--space",
                                     "train.lr=loguniform(1e-4,1e-2)"))
    assert r.exit_code == 0 and f"{len(study.trials)} trials done" in r.output, r.output


def test_trials_that_all_fail_stop_the_search_in_one_line(task_yamls, data_dir, tmp_path):
    """A trial that fails on its input (here a model folder that does not exist: found only when
    the trial loads it) is not the search's business: three in a row stop `tune` with one line
    naming the cause, instead of drawing failed trials for ever (they never count as finished)."""
    args = tune_args(tmp_path / "no-such-model", task_yamls, data_dir, tmp_path / "t", "--trials", "2", "--space",
                     "train.lr=loguniform(1e-4,1e-2)")
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith("error: 3 trials in a row failed, the last with: model folder")
    assert "Traceback" not in r.output
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="tune", storage=JournalStorage(JournalFileBackend(str(tmp_path / "t" / "optuna.journal"))))
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
