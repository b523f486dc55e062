"""Interrupting a training stage and running the same command again resumes from the last
checkpoint (weights, optimizer, scheduler, RNG, sampler position) and ends with the same
metrics and weights as an uninterrupted run."""

import json
import time
import os
import signal

import pytest
import yaml
from typer.testing import CliRunner

from adapterbench.recipe import train as T
from adapterbench.cli import app
from adapterbench.fileio import load_tensors
from adapterbench.recipe.runfolder import machine_name

runner = CliRunner()


def crash_before(monkeypatch, step: int):
    """Training raises KeyboardInterrupt before global step `step` (as if killed after the
    checkpoint before it); returns the real train_step, to put back."""
    real = T.train_step

    def crashing(*args):
        if args[-1] + 1 == step:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(T, "train_step", crashing)
    return real


def command(tiny_bert_dir, task_yamls, data_dir, out, method, *extra):
    return ["extract" if method != "full" else "finetune", "--task", str(task_yamls["toy"]), "--model",
            str(tiny_bert_dir), "--method", method, "--data-dir", str(data_dir), "--out", str(out),
            "train.epochs=3", "train.batch_size=8", "train.lr=1e-3", "train.checkpoint_every=4", *extra]


@pytest.mark.parametrize("method,crash_at,extra", [("pfeiffer", 10, ()), ("houlsby", 6, ()), ("full", 13, ()),
                                                   ("pfeiffer", 11, ("train.group_by_length=true",))])
def test_resume_gives_the_same_result(method, crash_at, extra, tiny_bert_dir, task_yamls, data_dir, tmp_path,
                                      monkeypatch):
    extra = (*extra, "train.heldout_min=8")     # 40 of the 48 examples train: 5 steps per epoch
    ref = runner.invoke(app, command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "ref", method, *extra))
    assert ref.exit_code == 0, ref.output
    ref_run = next((tmp_path / "ref").glob("*/*/toy/*"))

    real_step = T.train_step

    def crashing(*args):
        if args[-1] + 1 == crash_at:
            raise KeyboardInterrupt  # as if killed after the checkpoint before this step
        return real_step(*args)

    monkeypatch.setattr(T, "train_step", crashing)
    r = runner.invoke(app, command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "run", method, *extra))
    assert r.exit_code == 130
    run = next((tmp_path / "run").glob("*/*/toy/*"))
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    latest = json.loads((run / "checkpoint" / "latest.json").read_text())["checkpoint"]
    assert 0 < int(latest.split("-")[1]) < crash_at  # the newest complete checkpoint before the crash

    monkeypatch.setattr(T, "train_step", real_step)
    r = runner.invoke(app, command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "run", method, *extra))
    assert r.exit_code == 0, r.output
    got, want = (json.loads((p / "metrics.json").read_text()) for p in (run, ref_run))
    assert got["status"] == "ok" and got["history"] == want["history"] and got["tasks"] == want["tasks"]
    assert got["steps"] == want["steps"] == 15
    head_a = load_tensors(run / ("model" if method == "full" else "adapter") / "head.safetensors")
    head_b = load_tensors(ref_run / ("model" if method == "full" else "adapter") / "head.safetensors")
    assert all((head_a[k] == head_b[k]).all() for k in head_a)
    assert not (run / "checkpoint").exists()
    assert any(json.loads(line).get("resumed") for line in (run / "log.jsonl").read_text().splitlines())


def test_changed_config_does_not_resume(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    """A checkpoint is only resumed by the same resolved config (the folder hash sees to the rest)."""
    from adapterbench.recipe.runfolder import resumable
    cmd = command(tiny_bert_dir, task_yamls, data_dir, tmp_path, "pfeiffer")
    real_step = T.train_step
    monkeypatch.setattr(T, "train_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if a[-1] == 8
                        else real_step(*a))
    assert runner.invoke(app, cmd).exit_code == 130
    run = next(tmp_path.glob("*/*/toy/*"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert resumable(run, cfg)
    assert "checkpoint_minutes" in cfg["train"]
    # keys that never change a result may differ, and a key added since the run started may be missing
    same = {**cfg, "train": {**cfg["train"], "checkpoint_every": 50, "checkpoint_minutes": 10, "log_with": []}}
    assert resumable(run, same)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {k: v for k, v in cfg["train"].items()
                                                                       if k != "checkpoint_minutes"}}))
    assert resumable(run, cfg)
    cfg["train"]["lr"] = 0.5
    assert not resumable(run, cfg)


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    """`kill -USR1 PID` mid-epoch: a checkpoint at the next step, logged with its reason, the run
    goes on; killed later, it resumes from that checkpoint to the uninterrupted run's result; the
    process's own SIGUSR1 handler is back after training."""
    base = [a for a in command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "ref", "pfeiffer",
                               "train.selection=dev")     # all 48 examples train: 6 steps per epoch
            if not a.startswith("train.checkpoint_every")]
    ref = runner.invoke(app, base)
    assert ref.exit_code == 0, ref.output
    real_step = T.train_step

    def signalled(*args):
        if args[-1] == 7:                       # the 8th step (epoch 2 of 3, 6 steps each)
            os.kill(os.getpid(), signal.SIGUSR1)
        if args[-1] == 10:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(T, "train_step", signalled)
    cmd = [a if a != str(tmp_path / "ref") else str(tmp_path / "run") for a in base]
    assert runner.invoke(app, cmd).exit_code == 130
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    run = next((tmp_path / "run").glob("*/*/toy/*"))
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["checkpoint"] == "step-8-e1"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"checkpoint": 8, "epoch": 1, "why": "SIGUSR1"} in records
    assert sum("checkpoint" in r for r in records) == 1             # the epoch-end ones are not logged
    monkeypatch.setattr(T, "train_step", real_step)
    assert runner.invoke(app, cmd).exit_code == 0
    got, want = (json.loads((p / "metrics.json").read_text())
                 for p in (run, next((tmp_path / "ref").glob("*/*/toy/*"))))
    assert got["history"] == want["history"] and got["tasks"] == want["tasks"] and got["steps"] == 18


@pytest.mark.parametrize("continued", [True, False])
def test_time_the_process_spent_stopped_is_no_training_time(continued, tiny_bert_dir, task_yamls, data_dir,
                                                            tmp_path, monkeypatch):
    """A worker stopped mid-step (SIGSTOP, Ctrl-Z: here a 4 s sleep that ends with the SIGCONT a
    stopped process gets) is not charged for the stop: that step counts at the run's mean step
    time, so train_seconds and samples/s say what training cost. Without the SIGCONT (a step
    that really was slow) the time counts."""
    import time
    real_step = T.train_step

    def stopped(*args):
        if args[-1] == 7:
            time.sleep(4)
            if continued:
                os.kill(os.getpid(), signal.SIGCONT)
        return real_step(*args)

    monkeypatch.setattr(T, "train_step", stopped)
    started = time.time()
    r = runner.invoke(app, command(tiny_bert_dir, task_yamls, data_dir, tmp_path, "pfeiffer", "train.selection=dev"))
    assert r.exit_code == 0, r.output
    m = json.loads(next(tmp_path.glob("*/*/toy/*/metrics.json")).read_text())
    assert m["steps"] == 18 and m["wall_seconds"] >= 4 and time.time() - started >= 4
    assert (m["train_seconds"] < 3) if continued else (m["train_seconds"] >= 4)
    assert signal.getsignal(signal.SIGCONT) is signal.SIG_DFL


def test_sigterm_checkpoints_then_stops_and_the_run_resumes(tiny_bert_dir, task_yamls, data_dir, tmp_path,
                                                           monkeypatch):
    """`kill PID` (or scancel) mid-epoch: the step finishes, a checkpoint is written, the run stops
    as interrupted with one line saying so; the same command resumes to the uninterrupted result."""
    base = [a for a in command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "ref", "pfeiffer", "train.log_every=1",
                               "train.selection=dev")
            if not a.startswith("train.checkpoint_every")]
    assert runner.invoke(app, base).exit_code == 0
    real_step = T.train_step

    def terminated(*args):
        if args[-1] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(T, "train_step", terminated)
    cmd = [a if a != str(tmp_path / "ref") else str(tmp_path / "run") for a in base]
    r = runner.invoke(app, cmd)
    assert r.exit_code == 130 and "SIGTERM: stopped after step 8, checkpointed" in r.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    run = next((tmp_path / "run").glob("*/*/toy/*"))
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["checkpoint"] == "step-8-e1"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"checkpoint": 8, "epoch": 1, "why": "SIGTERM"} in records
    assert max(r.get("step", 0) for r in records) == 8                 # nothing trained after it
    # the checkpoint carries the wall time of the leg it ends; the finished run adds its own to it
    state = run / "checkpoint" / "step-8-e1" / "state.json"
    first_leg = json.loads(state.read_text())
    assert first_leg["earlier_wall_seconds"] >= first_leg["train_seconds"] > 0
    state.write_text(json.dumps({**first_leg, "earlier_wall_seconds": 1000.0}))
    monkeypatch.setattr(T, "train_step", real_step)
    monkeypatch.setattr(T, "machine_name", lambda device: "machine B")    # resumed on another machine
    t0 = time.time()
    assert runner.invoke(app, cmd).exit_code == 0
    got, want = (json.loads((p / "metrics.json").read_text())
                 for p in (run, next((tmp_path / "ref").glob("*/*/toy/*"))))
    assert 1000.0 < got["wall_seconds"] <= 1000.0 + time.time() - t0
    assert got["history"] == want["history"] and got["tasks"] == want["tasks"] and got["steps"] == 18
    # each machine's share of the training time, and each leg's machine in the log
    here = machine_name("cpu")
    assert list(want["machine_seconds"]) == [here]
    assert want["machine_seconds"][here] == pytest.approx(want["train_seconds"], abs=0.01)
    assert sorted(got["machine_seconds"]) == sorted([here, "machine B"])
    assert sum(got["machine_seconds"].values()) == pytest.approx(got["train_seconds"], abs=0.01)
    legs = [json.loads(line)["machine"] for line in (run / "log.jsonl").read_text().splitlines() if '"machine"' in line]
    assert legs == [here, "machine B"]

    # a checkpoint written before runs recorded machines: its training time is 'not recorded'
    monkeypatch.setattr(T, "train_step", terminated)
    old = [a if a != str(tmp_path / "ref") else str(tmp_path / "old") for a in base]
    assert runner.invoke(app, old).exit_code == 130
    older = next((tmp_path / "old").glob("*/*/toy/*"))
    state = older / "checkpoint" / "step-8-e1" / "state.json"
    kept = json.loads(state.read_text())
    state.write_text(json.dumps({k: v for k, v in kept.items() if k != "machine_seconds"}))
    monkeypatch.setattr(T, "train_step", real_step)
    assert runner.invoke(app, old).exit_code == 0
    done = json.loads((older / "metrics.json").read_text())
    assert done["machine_seconds"]["not recorded"] == pytest.approx(kept["train_seconds"], abs=0.001)
    assert sorted(done["machine_seconds"]) == ["machine B", "not recorded"]


def test_sigterm_handled_by_someone_else_is_theirs_after_the_checkpoint():
    """A process whose SIGTERM or SIGUSR2 already has a handler (submitit's job: requeue on a
    time limit or preemption) gets it after the loop has checkpointed at the current step
    (issue 42: preemption loses nothing); a rank of a multi-process run (catch_term=False)
    leaves SIGTERM alone."""
    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))
    before_usr2 = signal.signal(signal.SIGUSR2, lambda *a: seen.append(a[0]))
    try:
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            seen.clear()
            with T.CheckpointRequests() as req:
                os.kill(os.getpid(), signum)
                assert req.stopping and req.due(1) == signal.Signals(signum).name and seen == []   # checkpoint first
                req.hand_over()
                assert seen == [signum]
            assert signal.getsignal(signum) is not signal.SIG_DFL and signal.getsignal(signum) != req._defer
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with T.CheckpointRequests(catch_term=False):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with T.CheckpointRequests():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGUSR2, before_usr2)


def test_checkpoint_signal_outside_training_leaves_the_process_alive():
    """The CLI's entry point makes SIGUSR1 harmless outside a training loop (by default it
    ends a process); a training loop takes it over and gives it back."""
    from adapterbench.cli import keep_alive_on_checkpoint_signal
    before = signal.getsignal(signal.SIGUSR1)
    try:
        keep_alive_on_checkpoint_signal()
        quiet = signal.getsignal(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)            # would end pytest with the default action
        with T.CheckpointRequests() as req:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert req.due(1) == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is quiet
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_checkpoint_requests_by_steps_minutes_and_signal(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    req = T.CheckpointRequests(every=4, minutes=1.5)
    with req:
        assert req.due(3) == "" and req.due(4) == "every 4 steps"
        clock[0] += 89
        assert req.due(5) == ""
        clock[0] += 1
        assert req.due(5) == "every 1.5 min"
        req.reset()                             # a checkpoint was written: the minutes count anew
        assert req.due(6) == ""
        os.kill(os.getpid(), signal.SIGUSR1)
        assert req.due(6) == "SIGUSR1"
        req.reset()
        assert req.due(7) == ""
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_multitask_resume_gives_the_same_result(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    MT = T
    cmd = lambda out: ["multitask", "--tasks", f"{task_yamls['toy']},{task_yamls['toyreg']}", "--method", "camtl",
                       "--model", str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(out),
                       "--sampling", "uncertainty", "train.epochs=3", "train.batch_size=8", "train.lr=1e-3",
                       "train.checkpoint_every=5"]
    assert runner.invoke(app, cmd(tmp_path / "ref")).exit_code == 0
    real = crash_before(monkeypatch, 17)
    assert runner.invoke(app, cmd(tmp_path / "run")).exit_code == 130
    monkeypatch.setattr(MT, "train_step", real)
    r = runner.invoke(app, cmd(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    got, want = (json.loads(next(p.glob("multitask/camtl/*/*/metrics.json")).read_text())
                 for p in (tmp_path / "run", tmp_path / "ref"))
    assert got["history"] == want["history"] and got["tasks"] == want["tasks"]
    assert got["fraction_of_examples_used"] == want["fraction_of_examples_used"] and got["steps"] == want["steps"]
    assert got["picks_per_epoch"] == want["picks_per_epoch"]


@pytest.mark.slow
def test_kill_9_resume_with_length_grouping_is_identical(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """kill -9 of a separate process after a step checkpoint, with length-grouped batches: the
    rerun ends with the weights of an uninterrupted run (the batch order never draws from the
    global RNG, so resuming does not shift the dropout masks)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    cmd = lambda out: [sys.executable, "-m", "adapterbench", *command(tiny_bert_dir, task_yamls, data_dir, out, "pfeiffer",
                                                                      "train.group_by_length=true", "train.epochs=6",
                                                                      "train.checkpoint_every=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(cmd(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "run").glob("*/*/toy/*/checkpoint/latest.json")):
        assert time.time() < deadline and p.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert subprocess.run(cmd(tmp_path / "run"), env=env, capture_output=True).returncode == 0
    run, ref = (next((tmp_path / d).glob("*/*/toy/*/metrics.json")).parent for d in ("run", "ref"))
    assert any(json.loads(x).get("resumed") for x in (run / "log.jsonl").read_text().splitlines())
    a, b = load_tensors(run / "adapter" / "adapter.safetensors"), load_tensors(ref / "adapter" / "adapter.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_a_checkpoint_of_another_process_count_is_one_line(tiny_bert_dir, task_yamls, data_dir, tmp_path,
                                                           monkeypatch):
    """Ranks' generators are saved one per rank: a checkpoint that two processes wrote is not
    resumed by one (nor the reverse); one line says how, and the checkpoint is kept."""
    real_step = crash_before(monkeypatch, 6)
    args = command(tiny_bert_dir, task_yamls, data_dir, tmp_path / "run", "pfeiffer")
    assert runner.invoke(app, args).exit_code == 130
    run = next((tmp_path / "run").glob("*/*/toy/*"))
    latest = run / "checkpoint" / "latest.json"
    assert json.loads(latest.read_text())["processes"] == 1
    latest.write_text(json.dumps({**json.loads(latest.read_text()), "processes": 2}))
    monkeypatch.setattr(T, "train_step", real_step)
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "written by 2 process(es), this run has 1" in r.output and len(r.output.strip().splitlines()) == 1
    assert latest.is_file() and json.loads((run / "metrics.json").read_text())["status"] != "ok"
