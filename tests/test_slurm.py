"""Studies on a real SLURM (scripts/slurm_local.sh starts a one-node SLURM; .ci/run does it
before the tests): the smoke study as a job array through submitit, every run done exactly once;
a worker preempted mid-run (scancel --signal=USR2, the signal SLURM sends before a time limit
or a preemption) is requeued by submitit and its run resumes to the weights of an uninterrupted
run. Where SLURM is not up these tests skip, saying why; with ADAPTERBENCH_REQUIRE_SLURM=1 (CI)
they fail instead."""

import glob
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def slurm_up() -> str | None:
    """None when a SLURM node takes jobs here, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sudo bash scripts/slurm_local.sh)"
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if p.returncode != 0 or not any(s in p.stdout for s in ("idle", "mixed", "alloc")):
        return f"no SLURM node is up ({(p.stdout + p.stderr).strip()[:100]}): sudo bash scripts/slurm_local.sh"
    return None


@pytest.fixture(autouse=True)
def need_slurm():
    why = slurm_up()
    if why:
        if os.environ.get("ADAPTERBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM is required here (ADAPTERBENCH_REQUIRE_SLURM=1): {why}")
        pytest.skip(why)


@pytest.fixture()
def glue_here(tmp_path, monkeypatch) -> Path:
    """The real GLUE data (these studies read RTE, and the smoke study MRPC) and tmp_path as the
    working folder, where the workers write."""
    if not os.environ.get("ADAPTERBENCH_DATA_DIR"):
        pytest.skip("needs ADAPTERBENCH_DATA_DIR (RTE and MRPC)")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def submit_with_reference(tmp_path: Path, name: str, train: str) -> str:
    """A one-run study (pfeiffer on RTE, tiny-bert) trained here uninterrupted (ref/), then
    submitted to SLURM (runs/); its job id."""
    study = tmp_path / f"{name}.yaml"
    study.write_text(f"name: {name}\nmodels: [tiny-bert]\ntasks: [rte]\nseeds: [1]\ndefaults:\n  train: {train}\n"
                     f"methods:\n  - {{name: pfeiffer}}\n")
    assert runner.invoke(app, ["run", str(study), "--out", str(tmp_path / "ref")]).exit_code == 0
    r = runner.invoke(app, ["run", str(study), "--launcher", "slurm", "--time", "20"])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / "runs" / name / "launch.json").read_text())["jobs"][0]


def finish_requeued(run: Path, job: str, deadline: float) -> None:
    """Wait for a requeued worker to finish `run` (a requeued job waits ~2 minutes: start it now)."""
    while json.loads((run / "metrics.json").read_text())["status"] != "ok":
        assert time.time() < deadline, "the requeued worker did not finish the run"
        pending = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout
        if "BeginTime" in pending:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)


def same_as_uninterrupted(run: Path, ref: Path) -> None:
    """The interrupted-and-resumed run's history, steps and weights equal the uninterrupted one's."""
    from safetensors.torch import load_file
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    assert got["history"] == want["history"] and got["steps"] == want["steps"]
    a, b = load_file(run / "adapter" / "adapter.safetensors"), load_file(ref / "adapter" / "adapter.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_smoke_study_as_a_slurm_job_array(tmp_path, glue_here):
    r = runner.invoke(app, ["run", "smoke", "--launcher", "slurm", "--workers", "2", "--wait", "--time", "20"])
    assert r.exit_code == 0, r.output
    launch = json.loads((tmp_path / "runs" / "smoke" / "launch.json").read_text())
    assert launch["launcher"] == "slurm" and len(launch["jobs"]) == 2
    logs = sorted(Path(launch["log_folder"]).glob("*_log.out"))
    started = [line.split(":")[0] for lg in logs for line in lg.read_text().splitlines() if line.endswith(": start")]
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "smoke").glob("**/metrics.json")]
    assert len(started) == len(set(started)) == len(metrics) == 16      # every run exactly once
    assert all(m["status"] == "ok" for m in metrics)
    r = runner.invoke(app, ["status", "smoke"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "done 16, running 0, queued 0, failed 0, blocked 0" in r.output


def test_preempted_worker_is_requeued_and_resumes_identically(tmp_path, glue_here):
    job = submit_with_reference(tmp_path, "preempt", "{limit: 512, eval_limit: 16, epochs: 3, batch_size: 8, "
                                                "checkpoint_every: 4}")
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs/preempt/extract/pfeiffer/rte/*/checkpoint/latest.json")):
        assert time.time() < deadline, "the worker never wrote a checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)          # as SLURM does before preempting
    run = Path(glob.glob(str(tmp_path / "runs/preempt/extract/pfeiffer/rte/*/checkpoint"))[0]).parent
    while json.loads((run / "metrics.json").read_text())["status"] == "running":
        assert time.time() < deadline, "the worker did not stop"
        time.sleep(0.2)
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    finish_requeued(run, job, deadline + 120)
    assert any(json.loads(x).get("resumed") for x in (run / "log.jsonl").read_text().splitlines())
    same_as_uninterrupted(run, Path(glob.glob(str(tmp_path / "ref/extract/pfeiffer/rte/*/metrics.json"))[0]).parent)


def test_preemption_checkpoints_at_the_signal_with_default_settings(tmp_path, glue_here):
    """At the default checkpoint settings (one per epoch) a worker preempted mid-epoch loses
    nothing: SLURM's pre-timeout signal (USR2, submitit's) makes the loop checkpoint at the
    current step before submitit requeues the job, and the requeued run resumes from that step
    to the weights of an uninterrupted run."""
    job = submit_with_reference(tmp_path, "preempt_default", "{limit: 512, eval_limit: 16, epochs: 2, batch_size: 8, "
                                                        "log_every: 1}")
    deadline = time.time() + 180

    def records(run):
        return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.endswith("}")]
    while True:                                  # mid-way through the first epoch
        found = glob.glob(str(tmp_path / "runs/preempt_default/extract/pfeiffer/rte/*/log.jsonl"))
        if found and any(rec.get("step", 0) >= 10 for rec in records(Path(found[0]).parent)):
            break
        assert time.time() < deadline, "the worker never got to step 10"
        time.sleep(0.1)
    run = Path(found[0]).parent
    subprocess.run(["scancel", "--signal=USR2", job], check=True)          # as SLURM does before a time limit
    finish_requeued(run, job, deadline + 180)
    log = records(run)
    saved = [rec for rec in log if rec.get("why") == "SIGUSR2"]
    resumed = [rec for rec in log if rec.get("resumed")]
    assert len(saved) == 1 and saved[0]["epoch"] == 0 and saved[0]["checkpoint"] >= 10, log
    assert resumed and resumed[0]["step"] == saved[0]["checkpoint"]        # nothing trained twice, nothing lost
    same_as_uninterrupted(run, Path(glob.glob(str(tmp_path / "ref/extract/pfeiffer/rte/*/metrics.json"))[0]).parent)


def test_submission_problems_are_one_line_and_status_says_what_slurm_says(tmp_path, glue_here):
    """An unknown partition, GPUs the partition does not have, or more time than it allows are
    one line each (they used to pend forever or end in a traceback); after a submission,
    `status` shows SLURM's state of each recorded job."""
    from adapterbench.study.launch import partition_minutes
    for extra, words in ((["--partition", "nosuch"], "not a SLURM partition here"),
                         (["--gpus-per-worker", "1"], "did not take the job")):
        r = runner.invoke(app, ["run", "smoke", "--launcher", "slurm", *extra])
        said = r.output.strip().splitlines()
        assert r.exit_code == 2 and said[-1].startswith("error:") and words in said[-1], r.output
        assert sum(line.startswith("error:") for line in said) == 1 and "Traceback" not in r.output, r.output
    limit = partition_minutes(None)
    if limit is not None:
        r = runner.invoke(app, ["run", "smoke", "--launcher", "slurm", "--time", str(limit + 1)])
        assert r.exit_code == 2 and "would never start" in r.output, r.output
    r = runner.invoke(app, ["run", "smoke", "--launcher", "slurm", "--workers", "1", "--only", "full"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["status", "smoke"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "SLURM: " in r.output, r.output
    job = json.loads((tmp_path / "runs" / "smoke" / "launch.json").read_text())["jobs"][0]
    subprocess.run(["scancel", job.split("_")[0]], check=False)


def test_tune_workers_share_one_journal_on_slurm(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """Two SLURM workers of `tune` take trials from one Optuna journal: every trial once."""
    from .test_tune import check_shared_journal, tune_args
    out = tmp_path / "t"
    r = runner.invoke(app, tune_args(tiny_bert_dir, task_yamls, data_dir, out, "--trials", "4", "--space",
                                     "train.lr=loguniform(1e-4,1e-2)", "--launcher", "slurm", "--workers", "2",
                                     "--wait", "--time", "20"))
    assert r.exit_code == 0, r.output
    study, hosts = check_shared_journal(out, 4)
    assert r.output.count("'done': ") == 2                         # both workers ran to the end, from one journal
    assert json.loads((out / "launch.json").read_text())["launcher"] == "slurm"
