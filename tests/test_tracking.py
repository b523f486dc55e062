"""Live tracking: every run writes TensorBoard event files (accelerate's tracker API) whose
scalars are the numbers of log.jsonl; turning tracking on or off never renames a run; a
tracker asked for but not installed is one line."""

import json

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
