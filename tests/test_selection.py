"""The held-out selection protocol (train.selection): a seeded, stratified slice of the
training split decides the epoch and early stopping; the dev set is scored for the curves and
the reported number but decides nothing. Every run keeps its per-example predictions per epoch."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.recipe.splits import heldout_size, heldout_split
from adapterbench.fileio import load_tensors

runner = CliRunner()


def flip_dev_labels(src, dst):
    """A copy of the fixture data whose TOY dev labels are all flipped (neg <-> pos)."""
    shutil.copytree(src, dst)
    path = dst / "TOY" / "dev.tsv"
    lines = path.read_text().splitlines()
    flip = {"neg": "pos", "pos": "neg"}
    out = [lines[0]] + ["\t".join([*row.split("\t")[:-1], flip[row.split("\t")[-1]]]) for row in lines[1:]]
    path.write_text("\n".join(out) + "\n")
    return dst


def extract(tiny_bert_dir, task_yamls, data, out, *extra):
    # full fine-tuning at this rate learns the toy task within 6 epochs (dev accuracy 50 -> 81)
    r = runner.invoke(app, ["finetune", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir),
                            "--data-dir", str(data), "--out", str(out), "train.epochs=6", "train.save_model=true",
                            "train.batch_size=4", "train.lr=3e-3", "train.heldout_min=12", "train.log_with=[none]",
                            *extra])
    assert r.exit_code == 0, r.output
    folder = next(out.glob("*/*/toy/*"))
    return (folder, json.loads((folder / "metrics.json").read_text()),
            json.loads((folder / "epoch_predictions.json").read_text()),
            load_tensors(folder / "model" / "model.safetensors"))


def test_dev_labels_decide_nothing_under_heldout_but_do_under_dev(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    flipped = flip_dev_labels(data_dir, tmp_path / "flipped")
    runs = {}
    for selection in ("heldout", "dev"):
        for name, data in (("orig", data_dir), ("flip", flipped)):
            runs[selection, name] = extract(tiny_bert_dir, task_yamls, data, tmp_path / f"{selection}-{name}",
                                            f"train.selection={selection}")
    (_, a, pa, wa), (_, b, pb, wb) = runs["heldout", "orig"], runs["heldout", "flip"]
    assert a["selection"] == b["selection"] == "heldout"
    # the dev labels changed what dev reports ...
    assert [h["dev"] for h in a["history"]] != [h["dev"] for h in b["history"]]
    # ... and nothing else: the chosen epoch, the weights, every held-out score and prediction
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert [h["heldout"] for h in a["history"]] == [h["heldout"] for h in b["history"]]
    assert [e["heldout"] for e in pa["epochs"]] == [e["heldout"] for e in pb["epochs"]]
    assert [e["dev"] for e in pa["epochs"]] == [e["dev"] for e in pb["epochs"]]   # same model, same predictions
    # the reported number is dev at the epoch the held-out slice chose
    chosen = a["history"][[h["epoch"] for h in a["history"]].index(a["best_epoch"])]
    assert a["tasks"]["toy"]["dev"] == chosen["dev"]["toy"] and a["tasks"]["toy"]["heldout"] == chosen["heldout"]["toy"]
    assert a["best_epoch"] == max(a["history"], key=lambda h: h["heldout_main"])["epoch"]
    # under the papers' protocol the same flip moves the chosen epoch, and with it the weights
    (_, c, _, wc), (_, d, _, wd) = runs["dev", "orig"], runs["dev", "flip"]
    assert c["selection"] == "dev" and "heldout" not in c["tasks"]["toy"]
    assert c["best_epoch"] != d["best_epoch"] and any((wc[k] != wd[k]).any() for k in wc)
    assert c["tasks"]["toy"]["train_examples"] == 48 and a["tasks"]["toy"]["train_examples"] == 48 - 12


def test_predictions_recompute_the_reported_metric(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    from adapterbench import metrics as M
    import numpy as np
    folder, m, preds, _ = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "r")
    assert len(preds["epochs"]) == m["epochs_run"] and preds["best_epoch"] == m["best_epoch"]
    at = next(e for e in preds["epochs"] if e["epoch"] == m["best_epoch"])
    y = np.array(preds["labels"]["dev"]["toy"])
    for split in ("dev", "heldout"):
        got = M.compute(["accuracy", "f1"], np.array(preds["labels"][split]["toy"]), np.array(at[split]["toy"]))
        assert got == pytest.approx(m["tasks"]["toy"][split])
    assert len(y) == m["tasks"]["toy"]["dev_examples"] == 16
    assert len(preds["labels"]["heldout"]["toy"]) == m["tasks"]["toy"]["heldout_examples"] == 12


def test_last_selection_keeps_the_last_epoch(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    _, m, _, _ = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "r", "train.selection=last",
                         "train.patience=1")
    assert m["best_epoch"] == 5 and m["epochs_run"] == 6 and m["selection"] == "last"


@pytest.mark.parametrize("regression", [False, True])
def test_heldout_slice_is_seeded_stratified_and_disjoint(regression):
    examples = [{"id": i, "label": (i % 10) / 2 if regression else int(i % 4 == 0)} for i in range(400)]
    held, rest = heldout_split(examples, 40, regression, seed=3)
    again, _ = heldout_split(examples, 40, regression, seed=3)
    other, _ = heldout_split(examples, 40, regression, seed=4)
    assert held == again and held != other and len(held) == 40 and len(rest) == 360
    assert not {e["id"] for e in held} & {e["id"] for e in rest}
    assert [e["id"] for e in held] == sorted(e["id"] for e in held)   # file order
    mean = lambda xs: sum(e["label"] for e in xs) / len(xs)   # class share, or mean score
    assert mean(held) == pytest.approx(mean(examples), abs=0.1 if regression else 0.01)


def test_heldout_size_rule():
    assert heldout_size(2490, 2490, 0.1, 100) == 249          # RTE: 10%
    assert heldout_size(250, 250, 0.1, 100) == 100            # CB: at least 100
    assert heldout_size(67349, 20000, 0.1, 100) == 2000       # SST-2 at train.limit 20,000: 10% of what trains
    assert heldout_size(48, 48, 0.1, 100) == 24               # never more than half the split


def test_protocol_keys_are_checked(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    for bad, says in (("train.selection=test", "train.selection"), ("train.heldout_fraction=1.5", "heldout_fraction"),
                      ("train.heldout_min=0", "heldout_min")):
        r = runner.invoke(app, ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir),
                                "--data-dir", str(data_dir), "--out", str(tmp_path / "o"), bad])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def sweep_study(tmp_path, task_yamls, data_dir, seeds="[2, 3]", sweep_seed=1):
    y = tmp_path / "sweep.yaml"
    y.write_text(f"""name: sw
tasks: [{task_yamls['toy']}]
seeds: {seeds}
models: [tiny-bert]
out_dir: {tmp_path / 'runs'}
sweep: {{seed: {sweep_seed}}}
defaults:
  data: {{data_dir: {data_dir}}}
  train: {{epochs: 2, batch_size: 8, heldout_min: 12, log_with: [none]}}
methods:
  - {{name: full, lr_sweep: [1.0e-5, 3.0e-3]}}
  - {{name: fusion, source_method: pfeiffer, sources: [{task_yamls['toy']}, {task_yamls['toyreg']}]}}
  - {{name: pfeiffer, lr_sweep: [1.0e-4, 3.0e-3]}}
""")
    return y


@pytest.mark.slow
def test_lr_sweep_decides_on_held_out_then_the_reported_seeds_run(tmp_path, task_yamls, data_dir):
    """A row with lr_sweep: its sweep runs (sweep seed, each rate) are planned first; the reported
    seeds wait (a dry run says so); `run` trains the sweep, chooses the rate with the best mean
    held-out score, plans the row's seeds at that rate (and a fusion over the chosen adapters),
    and trains them in the same command."""
    from adapterbench.study import plan as S
    y = sweep_study(tmp_path, task_yamls, data_dir)
    dry = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "full: not planned yet, lr sweep 0 of 2 runs done" in dry.output
    assert "fusion: not planned yet, waits for pfeiffer's learning rate" in dry.output
    status = runner.invoke(app, ["status", str(y), "--by-row"], env={"COLUMNS": "200"})
    assert status.exit_code == 0 and "queued 4" in status.output, status.output
    assert ("full: not planned yet, lr sweep 0 of 2 runs done (its runs are not counted above)" in status.output
            and "fusion: not planned yet, waits for pfeiffer's learning rate" in status.output)
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    st = S.load_study(y)
    nodes = S.plan(st)
    assert not st.waiting and set(st.chosen) == {"full", "pfeiffer"}
    for label in ("full", "pfeiffer"):
        sweep = [n for n in nodes if n.label.startswith(f"{label} lr=")]
        assert len(sweep) == 2 and {n.seed for n in sweep} == {1}
        score = {n.config["train"]["lr"]: S.heldout_score(n.folder) for n in sweep}
        best = max(score, key=lambda lr: (score[lr], -lr))
        assert st.chosen[label]["lr"] == best
        reported = [n for n in nodes if n.label == label]
        assert {n.seed for n in reported} == {2, 3} and all(n.config["train"]["lr"] == best for n in reported)
        assert all(S.state(n) == "done" for n in reported)
    fusions = [n for n in nodes if n.stage == "fuse"]
    assert len(fusions) == 2 and all(S.state(n) == "done" for n in fusions)
    # the study folder lost, the archive kept: its sweeps still choose, so the rows are planned at
    # the same rates and nothing is trained again
    archive = tmp_path / "sw.jsonl"
    assert runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)]).exit_code == 0
    shutil.rmtree(tmp_path / "runs")
    from adapterbench.study.execute import open_study
    again = open_study(y, archive=archive)
    assert {n.folder for n in S.plan(again)} == {n.folder for n in nodes} and again.chosen == st.chosen
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    assert r.exit_code == 0 and "not planned yet" not in r.output and "0 ran" in r.output, r.output
    # an archive without full's runs: full's sweep runs first, and the plan that grows once it has
    # chosen still skips what the archive holds, so only full's 4 runs train (not pfeiffer, fusion)
    lines = [x for x in archive.read_text().splitlines() if not json.loads(x)["label"].startswith("full")]
    archive.write_text("".join(x + "\n" for x in lines))
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "full: not planned yet" in said and "4 ran" in said, said
    trained = sorted((json.loads(m.read_text())["method"], json.loads(m.read_text())["seed"])
                     for m in (tmp_path / "runs").rglob("metrics.json"))
    assert trained == [("full", 1), ("full", 1), ("full", 2), ("full", 3)], trained


def test_a_row_without_runs_on_a_task_is_scaled_by_its_examples(tmp_path):
    """`status --by-row` groups the runs by row, but estimates each from the whole plan: a row from
    its sweep rows' runs of the same task; on a task none of them ran, from the row's time per
    training example times the examples that task's finished runs (any row) trained on; a task
    no run has finished stays unknown."""
    from adapterbench.study import status as P
    def row(label, task, state, seconds=None, examples=None, stage="extract"):
        return P.StatusRow(label=label, stage=stage, task=task, state=state, seconds=seconds, examples=examples,
                           folder=tmp_path / "x")
    rows = [row("pfeiffer lr=0.001", "rte", "archived", 100.0, {"rte": 1000}),
            row("pfeiffer lr=0.001", "mrpc", "archived", 600.0, {"mrpc": 3000}),
            row("full lr=2e-05", "cola", "archived", 50.0, {"cola": 8000}, stage="finetune"),
            row("pfeiffer", "rte", "queued"), row("pfeiffer", "cola", "queued"), row("pfeiffer", "sst2", "queued")]
    # rates 0.1 and 0.2 s per example: median 0.15 x 8000 CoLA examples = 1200 s
    want = {"seconds": pytest.approx(100.0 + 1200.0), "estimated": 2, "unknown": 1}
    assert P.remaining(rows) == want
    assert P.remaining([r for r in rows if r.label == "pfeiffer"], peers=P.peers_of(rows)) == want
    assert P.remaining([r for r in rows if r.label == "pfeiffer"])["unknown"] == 3   # its group alone knows nothing
    # a row with no run at all (CA-MTL beside a running MTL): the other rows of its stage and task
    mt = [P.StatusRow(label="mtl", stage="multitask", task="rte,cola", state="running", whole_seconds=5000.0,
                      pace_seconds=2000.0, folder=tmp_path / "y"),
          P.StatusRow(label="camtl", stage="multitask", task="rte,cola", state="queued", folder=tmp_path / "z")]
    assert P.remaining(mt) == {"seconds": pytest.approx(2000.0 + 5000.0), "estimated": 2, "unknown": 0}


def test_a_sweep_seed_that_is_reported_is_refused(tmp_path, task_yamls, data_dir):
    y = sweep_study(tmp_path, task_yamls, data_dir, seeds="[1, 2]")
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 2 and "the sweep seed 1 is also a reported seed" in r.output


def test_a_row_is_estimated_from_its_lr_sweep_runs(tmp_path):
    """Before any reported run finishes, a row's run-hours come from its sweep's runs of the same
    task (and the other way round); a task no run of the row has finished stays unknown."""
    from adapterbench.study import status as P
    row = lambda label, task, state, seconds=None: P.StatusRow(label=label, stage="extract", task=task,  # noqa: E731
                                                               state=state, seconds=seconds, folder=tmp_path / "x")
    rows = [row("full lr=2e-05", "rte", "archived", 100.0), row("full lr=5e-05", "rte", "archived", 300.0),
            row("full", "rte", "queued"), row("full", "rte", "queued"), row("full", "cola", "queued")]
    assert P.remaining(rows) == {"seconds": pytest.approx(400.0), "estimated": 2, "unknown": 1}


def test_archive_keeps_predictions_beside_it_gzipped_per_row(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """`archive` moves each run's per-epoch predictions out of the archive line into a gzipped
    file per row beside it (byte-identical when nothing changed), gives them back whole through
    `read_predictions` (enough to recompute the reported metric), keeps them for runs whose
    folder is gone, moves an older archive's inline predictions out, and names a damaged file."""
    import gzip
    from adapterbench import metrics as M
    from adapterbench.archive import read_predictions
    import numpy as np
    a = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "one", "train.epochs=2")
    b = extract(tiny_bert_dir, task_yamls, data_dir, tmp_path / "two", "train.epochs=2", "seed=2")
    out = tmp_path / "docs" / "fair.jsonl"
    assert runner.invoke(app, ["archive", str(tmp_path / "one"), "--out", str(out)]).exit_code == 0
    line = json.loads(out.read_text())
    assert "predictions" not in line and line["predictions_file"] == "fair.predictions/full.jsonl.gz"
    shard = tmp_path / "docs" / "fair.predictions" / "full.jsonl.gz"
    first = shard.read_bytes()
    assert runner.invoke(app, ["archive", str(tmp_path / "one"), "--out", str(out)]).exit_code == 0
    assert shard.read_bytes() == first                      # no churn in a committed file
    # a second study into the same archive; the first study's folder is gone, its predictions are not
    shutil.rmtree(tmp_path / "one")
    assert runner.invoke(app, ["archive", str(tmp_path / "two"), "--out", str(out)]).exit_code == 0
    got = read_predictions(out)
    assert len(out.read_text().splitlines()) == 2 and len(gzip.decompress(shard.read_bytes()).splitlines()) == 2
    for folder, m, preds, _ in (a, b):
        assert got[m["label"], folder.name] == preds
        at = next(e for e in preds["epochs"] if e["epoch"] == m["best_epoch"])
        score = M.compute(["accuracy", "f1"], np.array(preds["labels"]["dev"]["toy"]), np.array(at["dev"]["toy"]))
        assert score == pytest.approx(m["tasks"]["toy"]["dev"])
    # an archive written before the predictions moved out: its inline predictions are read, then moved
    old = tmp_path / "old" / "runs.jsonl"
    old.parent.mkdir()
    old.write_text(json.dumps({**json.loads(out.read_text().splitlines()[0]), "predictions": a[2]}
                              | {"predictions_file": None}) + "\n")
    assert list(read_predictions(old).values()) == [a[2]]
    assert runner.invoke(app, ["archive", str(tmp_path / "two"), "--out", str(old)]).exit_code == 0
    assert "\"predictions\":" not in old.read_text() and len(read_predictions(old)) == 2
    shard.write_bytes(first[:40])                           # a damaged file: one line that names it
    r = runner.invoke(app, ["archive", str(tmp_path / "two"), "--out", str(out)])
    assert r.exit_code == 2 and "full.jsonl.gz" in r.output and "git checkout" in r.output


def test_archive_predictions_files_follow_the_rows_the_archive_holds(tmp_path):
    """One predictions file per row (its sweep rows with it); a row no line holds any more (an
    archive written again with --replace) leaves no file behind, and a run without predictions
    names none."""
    from adapterbench.archive import read_predictions, store_predictions
    out = tmp_path / "a.jsonl"
    rec = lambda label, run, p=None: {"label": label, "run": run, **({"predictions": p} if p else {})}  # noqa: E731
    lines = store_predictions(out, {("full lr=2e-05", "r1"): rec("full lr=2e-05", "r1", {"e": 1}),
                                    ("full", "r2"): rec("full", "r2", {"e": 2}),
                                    ("head", "r3"): rec("head", "r3", {"e": 3}), ("old", "r4"): rec("old", "r4")})
    out.write_text("".join(f"{line}\n" for line in lines))
    assert sorted(p.name for p in (tmp_path / "a.predictions").iterdir()) == ["full.jsonl.gz", "head.jsonl.gz"]
    assert read_predictions(out) == {("full lr=2e-05", "r1"): {"e": 1}, ("full", "r2"): {"e": 2}, ("head", "r3"): {"e": 3}}
    assert "predictions_file" not in json.loads(lines[-1])
    store_predictions(out, {("full", "r2"): rec("full", "r2", {"e": 2})})
    assert [p.name for p in (tmp_path / "a.predictions").iterdir()] == ["full.jsonl.gz"]
