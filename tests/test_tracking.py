"""Live tracking: every run writes TensorBoard event files (accelerate's tracker API) whose
scalars are the numbers of log.jsonl; turning tracking on or off never renames a run; a
tracker asked for but not installed is one line."""

import json

import pytest
import torch

from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()


def scalars_of(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for events in folder.glob("tracking/events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def test_event_files_hold_the_numbers_of_log_jsonl(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    args = ["multitask", "--tasks", f"{task_yamls['toy']},{task_yamls['toyreg']}", "--method", "mtl", "--model",
            str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "runs"),
            "train.epochs=2", "train.batch_size=8", "train.log_every=2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob("multitask/mtl/*/*"))
    tb = scalars_of(run)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [x for x in records if "loss" in x]
    assert steps and {"loss", "lr", "grad_norm", "samples_per_s"} <= set(tb)
    for x in steps:
        for key in ("loss", "lr", "grad_norm"):
            assert abs(tb[key][x["step"]] - x[key]) <= 1e-6 * max(1.0, abs(x[key])), (key, x)
    devs = [x for x in records if "dev" in x]
    assert len(devs) == 2
    for x in devs:
        assert abs(tb["dev/toy/accuracy"][x["step"]] - x["dev"]["toy"]["accuracy"]) < 1e-4
        assert abs(tb["main"][x["step"]] - x["main"]) < 1e-4
    shares = [x for x in records if "sampling_share" in x and "loss" not in x]        # one per epoch
    assert len(shares) == 2 and all(abs(sum(x["sampling_share"].values()) - 1) < 1e-9 for x in shares)
    assert abs(tb["sampling_share/toy"][shares[0]["step"]] - shares[0]["sampling_share"]["toy"]) < 1e-6
    # and live, in every step record: the share of this epoch's examples so far (step 2: 16 examples)
    assert all("sampling_share" in x and abs(sum(x["sampling_share"].values()) - 1) < 1e-9 for x in steps)
    first = steps[0]
    assert first["step"] == 2 and (first["sampling_share"]["toy"] * 16) % 1 < 1e-9
    assert abs(tb["sampling_share/toyreg"][2] - first["sampling_share"]["toyreg"]) < 1e-6

    # tracking off: the same run, already done (log_with never enters the identity)
    r = runner.invoke(app, [*args, "train.log_with=[none]"])
    assert r.exit_code == 0 and "already done" in r.output


def test_fusion_attention_per_layer_is_tracked(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    base = ["--model", str(tiny_bert_dir), "--data-dir", str(data_dir), "train.max_steps=2"]
    srcs = []
    for name in ("toy", "toyreg"):
        assert runner.invoke(app, ["extract", "--task", str(task_yamls[name]), *base, "--out",
                                   str(tmp_path / name)]).exit_code == 0
        srcs += ["--adapters", str(next((tmp_path / name).glob("extract/*/*/*")))]
    r = runner.invoke(app, ["fuse", "--target", str(task_yamls["toy"]), *srcs, *base, "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "f").glob("fuse/*/*/*"))
    tb = scalars_of(run)
    for layer in (0, 1):
        got = [tb[f"modules/site{layer}/attention/source_{n}"] for n in (0, 1)]
        step = next(iter(got[0]))
        assert abs(got[0][step] + got[1][step] - 1.0) < 1e-4      # attention over the two sources sums to 1


def test_tracker_not_installed_is_one_line(task_yamls, data_dir, tmp_path):
    import importlib.util
    missing = next(t for t in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(t) is None)
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", "tiny-bert", "--data-dir",
                            str(data_dir), "--out", str(tmp_path), f"train.log_with=[{missing}]"])
    assert r.exit_code == 2 and f"pip install {missing}" in r.output and len(r.output.strip().splitlines()) <= 2
    assert not list(tmp_path.glob("**/metrics.json"))


def wandb_records(path):
    """The records of an offline W&B run file (`run-<id>.wandb`: LevelDB-log blocks of 32 KiB,
    7-byte record headers: crc, length, type; after a 7-byte file header)."""
    import struct
    from pathlib import Path
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    block, hdr, pos, buf, out = 32768, 7, 7, b"", []
    while pos + hdr <= len(data):
        if block - pos % block < hdr:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + hdr])
        chunk, pos = data[pos + hdr:pos + hdr + length], pos + hdr + length
        if kind == 0 and length == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_and_mlflow_file_runs_for_a_comparison(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    """W&B (offline) and MLflow (its default store here: <out>/mlflow.db) see the run under the
    project, with the run folder's name, the row label as group, method/task/model/seed tags and
    the whole config, and the final metrics; nothing lands in the working directory; TensorBoard
    keeps one run (its hparams in the run's own event file, no timestamped sub-run)."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(out), "train.epochs=2", "train.heldout_min=8", "label=my row",
                            "train.tracker_project=cmp", "train.log_with=[tensorboard,wandb,mlflow]"])
    assert r.exit_code == 0, r.output
    run = next(out.glob("extract/*/*/*"))
    m = json.loads((run / "metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["runs", "data", "toy.yaml", "toyreg.yaml"])
    # W&B
    records = wandb_records(next(run.glob("wandb/offline-run-*/run-*.wandb")))
    runrec = next(x.run for x in records if x.WhichOneof("record_type") == "run")
    assert (runrec.display_name, runrec.project, runrec.run_group) == (run.name, "cmp", "my row")
    assert {"method:pfeiffer", "task:toy", "seed:42", "stage:extract"} <= set(runrec.tags)
    config = {u.key: json.loads(u.value_json) for u in runrec.config.update}
    assert config["method.name"] == "pfeiffer" and config["train.selection"] == "heldout"
    assert config["label"] == "my row" and config["train.epochs"] == 2
    summary = {u.key: json.loads(u.value_json) for x in records if x.WhichOneof("record_type") == "summary"
               for u in x.summary.update if u.key}
    assert summary["final/dev/toy/accuracy"] == m["tasks"]["toy"]["dev"]["accuracy"]
    assert summary["final/heldout/toy/accuracy"] == m["tasks"]["toy"]["heldout"]["accuracy"]
    # MLflow, found by name in the store beside the study's runs
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["cmp"], filter_string=f"attributes.run_name = '{run.name}'")
    assert len(found) == 1
    row = found.iloc[0]
    assert row["params.method.name"] == "pfeiffer" and row["params.train.selection"] == "heldout"
    assert row["tags.task"] == "toy" and row["tags.group"] == "my row" and row["tags.seed"] == "42"
    assert row["metrics.final/dev/toy/accuracy"] == m["tasks"]["toy"]["dev"]["accuracy"]
    assert row["status"] == "FINISHED"
    # TensorBoard: one run folder, scalars and the hparams summary in it
    assert all(p.is_file() for p in (run / "tracking").iterdir())
    tb = scalars_of(run)
    assert tb["final/dev/toy/accuracy"] and "main" in tb


def test_mlflow_file_store_is_one_line(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(tmp_path / "runs"), "train.log_with=[mlflow]"])
    assert r.exit_code == 2 and "MLFLOW_ALLOW_FILE_STORE=true" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) <= 3
    assert not list(tmp_path.glob("runs/**/metrics.json")) or all(
        json.loads(p.read_text())["status"] != "ok" for p in tmp_path.glob("runs/**/metrics.json"))


def test_a_study_files_its_runs_under_its_name(tmp_path, task_yamls, data_dir):
    from adapterbench.study import plan as S
    from .test_study import write_study
    nodes = S.plan(S.load_study(write_study(tmp_path, task_yamls, data_dir)))
    assert {n.config["train"]["tracker_project"] for n in nodes} == {"t"}


def test_accelerate_precision_setting_cannot_change_a_run(tiny_bert_dir, task_yamls, data_dir, tmp_path, monkeypatch):
    """ACCELERATE_MIXED_PRECISION=bf16 (accelerate launch --mixed_precision bf16, or a saved
    accelerate config) beside train.precision=fp32: one warning line, and the weights are the
    fp32 run's, bit for bit."""
    from adapterbench.fileio import load_tensors
    base = ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir", str(data_dir),
            "train.epochs=1", "train.precision=fp32", "train.log_with=[none]"]
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "a")]).exit_code == 0
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "ACCELERATE_MIXED_PRECISION=bf16" in r.output and "is ignored" in r.output
    a, b = (next((tmp_path / x).glob("extract/*/*/*")) for x in "ab")
    assert a.name == b.name
    wa, wb = (load_tensors(f / "adapter" / "adapter.safetensors") for f in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_error_text_in_brackets_is_printed_as_is(tmp_path):
    r = runner.invoke(app, ["extract", "--task", str(tmp_path / "[split]" / "t.yaml"), "train.log_with=[none]"])
    assert r.exit_code == 2 and "[split]" in r.output
