"""Studies (plan, dependencies, dedup, skip-done, resume after kill -9, two workers) and
report numbers from hand-written metrics.json files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.study import locks as L
from adapterbench.study import status as P
from adapterbench.study import archived as R
from adapterbench.study import plan as S
from adapterbench.study.execute import execute
from adapterbench.errors import UserError
from adapterbench.cli import app
from adapterbench.results.report import build_report, paired_p, Cell
from adapterbench.results.render import render

runner = CliRunner()


def write_study(tmp_path, task_yamls, data_dir, seeds=(1, 2), extra_methods=""):
    y = tmp_path / "study.yaml"
    y.write_text(f"""name: t
tasks: [{task_yamls['toy']}]
seeds: [{', '.join(map(str, seeds))}]
models: [tiny-bert]
out_dir: {tmp_path / 'runs'}
defaults:
  data: {{data_dir: {data_dir}}}
  train: {{epochs: 1, batch_size: 8, limit: 16}}
methods:
  - {{name: full}}
  - {{name: pfeiffer}}
  - {{name: pfeiffer, label: pfeiffer-rf64, method: {{reduction_factor: 64}}}}
  - {{name: fusion, source_method: pfeiffer, sources: [{task_yamls['toy']}, {task_yamls['toyreg']}]}}
{extra_methods}""")
    return y


def plan_numbers(output: str) -> set[int]:
    """The run numbers (first column) of the plan table `run` printed."""
    return {int(m.group(1)) for m in re.finditer(r"^│ (\d+) ", output, re.M)}


def test_dry_run_shows_the_runs_only_selects(tmp_path, task_yamls, data_dir):
    """--only narrows the printed plan to its rows and the runs they need, numbered as in the whole
    study (so `needs` still names them), and says how many of the study's runs are left out."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 0 and plan_numbers(r.output) == {0, 1, 2, 3, 4} and "of the study's" not in r.output
    r = runner.invoke(app, ["run", str(y), "--dry-run", "--only", "fusion"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and plan_numbers(r.output) == {1, 3, 4}, r.output   # fusion and its two sources
    assert "3 of the study's 5 runs" in said and "#1,#3" in r.output
    assert not (tmp_path / "runs").exists()


def test_plan_dependencies_dedup_and_hashes(tmp_path, task_yamls, data_dir):
    st = S.load_study(write_study(tmp_path, task_yamls, data_dir))
    nodes = S.plan(st)
    # per seed: full, pfeiffer(toy), pfeiffer-rf64, pfeiffer(toyreg) as a fusion source, fusion
    assert len(nodes) == 2 * 5
    fusions = [n for n in nodes if n.stage == "fuse"]
    assert len(fusions) == 2
    for f in fusions:
        deps = [nodes[d] for d in f.deps]
        assert [d.label for d in deps] == ["pfeiffer", "pfeiffer"] and all(d.index < f.index for d in deps)
        assert {d.seed for d in deps} == {f.seed}
        assert f.config["method"]["adapters"] == [str(d.folder.resolve()) for d in deps]
    toy_pf = [n for n in nodes if n.label == "pfeiffer" and n.task == str(task_yamls["toy"])]
    assert len(toy_pf) == 2  # trained once per seed, though the fusion needs it too
    hashes = {n.folder.name.rsplit("-", 1)[1] for n in nodes}
    assert len(hashes) == len(nodes)
    rf = [n for n in nodes if n.label == "pfeiffer-rf64"][0]
    assert rf.folder.parent == toy_pf[0].folder.parent and rf.folder != toy_pf[0].folder


@pytest.mark.slow
def test_multitask_entry_is_one_run_over_all_tasks(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,), extra_methods="  - {name: mtl}\n")
    y.write_text(y.read_text().replace(f"tasks: [{task_yamls['toy']}]",
                                       f"tasks: [{task_yamls['toy']}, {task_yamls['toyreg']}]"))
    nodes = S.plan(S.load_study(y))
    mt = [n for n in nodes if n.stage == "multitask"]
    assert len(mt) == 1 and mt[0].task == f"{task_yamls['toy']},{task_yamls['toyreg']}"
    assert mt[0].folder.parent.name == "toy-toyreg"  # slugged
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    assert json.loads((mt[0].folder / "metrics.json").read_text())["status"] == "ok"


def test_unknown_study_key_and_source(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir)
    y.write_text(y.read_text() + "epochs: 3\n")
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 2 and "unknown config key 'study study.yaml.epochs'" in r.output
    y = write_study(tmp_path, task_yamls, data_dir, extra_methods="  - {name: fusion, label: f2, source_method: nope}\n")
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 2 and "source_method 'nope'" in r.output


def test_run_then_skip_done_and_report(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    assert "5 ran, 0 already done, 0 failed" in r.output
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("**/metrics.json")}
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.output.count("done") >= 5
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0 and "0 ran, 5 already done" in r.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("**/metrics.json")}
    r = runner.invoke(app, ["report", str(tmp_path / "runs"), "--format", "csv", "--no-plot"])
    assert r.exit_code == 0 and "pfeiffer-rf64,toy," in r.output


def test_only_runs_the_named_rows_and_what_they_need(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    nodes = S.plan(S.load_study(y))
    keep = S.selected(nodes, ["fus*"])
    assert sorted(nodes[i].label for i in keep) == ["fusion", "pfeiffer", "pfeiffer"]   # + its two sources
    r = runner.invoke(app, ["run", str(y), "--only", "fusion"])
    assert r.exit_code == 0, r.output
    assert "3 ran, 0 already done, 0 failed" in r.output
    labels = sorted(json.loads(p.read_text())["label"] for p in (tmp_path / "runs").glob("**/metrics.json"))
    assert labels == ["fusion", "pfeiffer", "pfeiffer"]
    # a study's fusion run writes its attention, and the archive carries it per source and layer
    from adapterbench.records import archive_record
    fus = next(p.parent for p in (tmp_path / "runs").glob("fuse/**/metrics.json"))
    attention = archive_record(fus)["fusion_attention"]
    assert sorted(attention) == ["toy", "toyreg"] and len(attention["toy"]) == 2     # two layers
    assert all(abs(a + b - 1) < 1e-4 for a, b in zip(attention["toy"], attention["toyreg"]))
    r = runner.invoke(app, ["status", str(y), "--by-row"], env={"COLUMNS": "200"})
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]]
             for ln in r.output.splitlines() if ln.count("│") > 3}
    assert lines["pfeiffer"][:3] == ["2", "2", "0"] and lines["fusion"][:2] == ["1", "1"]   # runs, done, running
    assert lines["full"][:4] == ["1", "0", "0", "1"] and lines["full"][-1] == "0.0 (+1 runs ?)"   # queued, no peer
    assert lines["pfeiffer"][-1] == "0.0"
    # --todo: only what is still to do, by row and by run; the totals stay the study's
    r = runner.invoke(app, ["status", str(y), "--by-row", "--todo"], env={"COLUMNS": "200"})
    assert {ln.split("│")[1].strip() for ln in r.output.splitlines() if ln.count("│") > 3} == {"full", "pfeiffer-rf64"}
    assert "done 3, running 0, queued 2" in r.output
    r = runner.invoke(app, ["status", str(y), "--todo"], env={"COLUMNS": "200"})
    states = [ln.split("│")[6].strip() for ln in r.output.splitlines() if re.match(r"^│ \d+ ", ln)]
    assert states == ["queued", "queued"] and "done 3, running 0, queued 2" in r.output
    r = runner.invoke(app, ["run", str(y), "--only", "nothing-*"])
    assert r.exit_code == 2 and "matches no run" in r.output and "pfeiffer-rf64" in r.output


def test_status_sent_to_a_file_keeps_whole_row_names(tmp_path, task_yamls, data_dir):
    """Output that goes to no terminal (a file, a pipe, a job's log) is laid out 200 columns wide,
    not rich's 80: the by-row table keeps a long row name whole, and long lines wrap at 200."""
    label = "pfeiffer rf 64 lr 3e-4 (a long variant name)"
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,),
                    extra_methods=f"  - {{name: pfeiffer, label: '{label}', method: {{reduction_factor: 32}}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "adapterbench.cli", "status", str(y), "--by-row"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [ln.split("│")[1].strip() for ln in r.stdout.splitlines() if ln.count("│") > 3]
    assert label in rows and not any("…" in x for x in rows)
    total = next(ln for ln in r.stdout.splitlines() if ln.startswith("still to run: "))
    assert 80 < len(total) <= 200                          # a long line is wrapped at 200 columns, not 80


def test_failed_run_is_reported_and_others_go_on(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    (data_dir / "TOYREG" / "train.tsv").write_text("sentence\tscore\nthe cat\tnan\n")  # fusion source breaks
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 1
    assert "3 ran, 0 already done, 1 failed, 1 blocked" in r.output
    failed = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/metrics.json")]
    assert sum(m["status"] == "failed" for m in failed) == 1
    r = runner.invoke(app, ["run", str(y)])
    assert "0 ran, 3 already done, 1 failed, 1 blocked" in r.output
    (data_dir / "TOYREG" / "train.tsv").write_text("sentence\tscore\nthe cat\t1.0\na dog\t2.0\n")
    r = runner.invoke(app, ["run", str(y), "--retry-failed"])
    assert r.exit_code == 0 and "2 ran, 3 already done, 0 failed" in r.output


def spawn(study: Path, out: Path):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "adapterbench.cli", "run", str(study)], stdout=open(out, "w"),
                            stderr=subprocess.STDOUT, env=env)


def starts(log: Path) -> list[str]:
    return [line.split(":")[0] for line in log.read_text().splitlines() if line.endswith(": start")]


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1, 2))
    log1 = tmp_path / "w1.log"
    p = spawn(y, log1)
    deadline = time.time() + 240
    while log1.read_text().count(": ok") < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = [json.loads(m.read_text()) for m in (tmp_path / "runs").glob("**/metrics.json")]
    n_ok = sum(m["status"] == "ok" for m in done_before)
    assert 2 <= n_ok < 10
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    assert f"{10 - n_ok} ran, {n_ok} already done, 0 failed" in r.output
    assert all(json.loads(m.read_text())["status"] == "ok" for m in (tmp_path / "runs").glob("**/metrics.json"))
    assert not list((tmp_path / "runs").glob("**/*.lock"))


@pytest.mark.slow
def test_two_workers_share_one_folder(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1, 2))
    S.plan(S.load_study(y))  # build the tiny model once before the race
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [spawn(y, lg) for lg in logs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [lg.read_text()[-2000:] for lg in logs]
    started = starts(logs[0]) + starts(logs[1])
    assert len(started) == 10 and len(set(started)) == 10      # every run trained exactly once
    assert starts(logs[0]) and starts(logs[1])                 # and both workers did some
    statuses = [json.loads(m.read_text())["status"] for m in (tmp_path / "runs").glob("**/metrics.json")]
    assert statuses == ["ok"] * 10


def fake_run(root: Path, label: str, task: str, seed: int, value: float, pct=1.0, secs=10.0):
    d = root / label / task / f"s{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "status": "ok", "label": label, "method": label, "task": task, "seed": seed, "main_value": value,
        "trainable_percent": pct, "train_seconds": secs}))


def test_report_numbers_from_handwritten_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERBENCH_DATA_DIR", raising=False)   # no majority-class row: fake runs only
    full = {"rte": [60.0, 62.0, 64.0], "mrpc": [80.0, 81.0, 82.0]}
    pf = {"rte": [65.0, 67.5, 69.0], "mrpc": [80.0, 81.5, 82.0]}
    for label, table in (("full", full), ("pfeiffer", pf)):
        for task, vals in table.items():
            for seed, v in enumerate(vals, start=1):
                fake_run(tmp_path, label, task, seed, v, pct=100.0 if label == "full" else 1.5)
    fake_run(tmp_path, "broken", "rte", 1, 0.0)
    (tmp_path / "broken" / "rte" / "s1" / "metrics.json").write_text(json.dumps({"status": "failed"}))
    rep = build_report(tmp_path)
    assert [r.label for r in rep.rows] == ["full", "pfeiffer"]   # failed runs are left out
    row = rep.by_label["pfeiffer"]
    assert row.cells["rte"].mean == pytest.approx(67.1666667)
    assert row.cells["rte"].std == pytest.approx(2.0207259, rel=1e-6)      # sample std (ddof 1)
    assert rep.delta(row, "full", "rte") == pytest.approx(5.1666667)
    assert rep.mean_delta(row, "full") == pytest.approx((5.1666667 + 0.1666667) / 2)
    # paired t-test by seed: diffs rte (5, 5.5, 5) -> significant; mrpc (0, 0.5, 0) -> not
    from scipy.stats import ttest_rel
    assert paired_p(row.cells["rte"], rep.by_label["full"].cells["rte"]) == pytest.approx(
        ttest_rel([65.0, 67.5, 69.0], [60.0, 62.0, 64.0]).pvalue)
    assert rep.mark(row, "rte") == "†" and rep.mark(row, "mrpc") == ""
    assert rep.improved(row, "full") == "1/2"
    md = render(rep, "md")
    assert "| pfeiffer | 81.17 ± 1.04 (3) | 67.17 ± 2.02 (3)† | 74.17 | +2.67 | 1.50 | 10 | 1/2 |" in md
    assert "paired t-test" in md
    tex = render(rep, "latex")
    assert r"67.17 $\pm$ 2.02 (3)$^\dagger$" in tex and tex.count(r"\\") == 3
    csv_text = render(rep, "csv")
    assert "pfeiffer,rte,67.1667,2.0207,3,5.1667," in csv_text


def test_report_reference_and_plot(tmp_path):
    fake_run(tmp_path, "full", "rte", 1, 60.0)
    fake_run(tmp_path, "pfeiffer", "rte", 1, 70.0)
    out = tmp_path / "table.md"
    r = runner.invoke(app, ["report", str(tmp_path), "--reference", "adapterfusion-bert-base", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "| paper: pfeiffer | 71.04 |" in text and "| paper: fusion | 76.82 |" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    r = runner.invoke(app, ["report", str(tmp_path), "--reference", "nope"])
    assert r.exit_code == 2 and "unknown reference 'nope'" in r.output
    assert Cell({1: 2.0}).std == 0.0


@pytest.mark.slow
def test_fewshot_axis_merge_entries_and_target_exclusion(tmp_path, task_yamls, data_dir):
    """shots axis + merge entries: sources trained once on full data, the target's own adapter
    left out, same-track filtering, merged adapter -> init_from of a few-shot run, ' k=N' rows."""
    toy2 = tmp_path / "toy2.yaml"
    toy2.write_text(task_yamls["toy"].read_text().replace("name: toy", "name: toy2"))
    src = f"[{task_yamls['toy']}, {toy2}, {task_yamls['toyreg']}]"
    y = tmp_path / "fs.yaml"
    y.write_text(f"""name: fs
tasks: [{task_yamls['toy']}]
seeds: [1]
shots: [2, 4]
models: [tiny-bert]
out_dir: {tmp_path / 'runs'}
defaults:
  data: {{data_dir: {data_dir}}}
  train: {{epochs: 2, eval_every: 2, batch_size: 4}}
methods:
  - {{name: pfeiffer, label: src, train: {{limit: 16}}}}
  - {{name: pfeiffer, label: mavg, source_method: src, sources: {src}, merge: {{strategy: avg}}}}
  - {{name: pfeiffer, label: mtrack, source_method: src, sources: {src}, merge: {{strategy: align, same_track: true}}}}
  - {{name: fusion, label: fus, source_method: src, sources: {src}, include_target: false}}
""")
    nodes = S.plan(S.load_study(y))
    merges = [n for n in nodes if n.stage == "merge"]
    assert len(merges) == 2                                   # one per entry, shared by k = 2 and 4
    sources = [n for n in nodes if n.label.startswith("src")]  # toy2, toyreg (full data) + src k=2/4 on toy
    assert sorted(n.config["train"].get("shots", 0) for n in sources) == [0, 0, 2, 4]
    # the target's own adapter is no source; a same-track merge plans only its track's sources
    assert {m.label: len(m.config["adapters"]) for m in merges} == {"mavg": 2, "mtrack (transfer)": 1}
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    for m in merges:
        cfg = json.loads((m.folder / "adapter_config.json").read_text())["merge"]
        tasks = {s["task"] for s in cfg["sources"]}
        assert tasks == ({"toy2"} if m.label == "mtrack (transfer)" else {"toy2", "toyreg"})
        assert cfg["kind"].startswith("transfer" if m.label.endswith("(transfer)") else "merge")
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/metrics.json")]
    fewshot = {(m["label"], m["shots"]): m for m in metrics if m.get("shots")}
    # a same-track "merge" with one source is transfer and says so in its row label
    assert set(fewshot) == {(f"{l} k={k}", k) for l in ("src", "mavg", "mtrack (transfer)", "fus") for k in (2, 4)}
    assert fewshot[("mavg k=4", 4)]["tasks"]["toy"]["train_examples"] == 8       # 4 per class, 2 classes
    assert [h["epoch"] for h in fewshot[("mavg k=4", 4)]["history"]] == [1]   # eval_every 2 of 2 epochs
    assert fewshot[("mavg k=4", 4)]["epochs_run"] == 2
    run = next(p.parent for p in (tmp_path / "runs").glob("extract/**/metrics.json")
               if json.loads(p.read_text())["label"] == "mavg k=2")
    cfg = (run / "config.yaml").read_text()
    assert str(next(m.folder for m in merges if m.label == "mavg")) in cfg     # init_from the merged adapter
    fus = next(p.parent for p in (tmp_path / "runs").glob("fuse/**/metrics.json"))
    assert "toy2" in (fus / "fusion" / "sources.json").read_text()
    assert '"task": "toy"' not in (fus / "fusion" / "sources.json").read_text()
    rep = build_report(tmp_path / "runs", versus="src")
    assert [r.label for r in rep.rows][:3] == ["src", "src k=2", "fus k=2"]   # full-data sources first
    assert rep.base_row(rep.by_label["mavg k=4"], "src").label == "src k=4"


def write_merge_fusion_study(tmp_path, task_yamls, data_dir, name):
    """A study whose runs name other runs' folders: pfeiffer sources (`src`) on toy2 and toyreg, a
    run on toy that starts from their average (`mavg`, a merge node before it), and their fusion
    on toy (`fus`); out_dir runs/<name>, relative to where it is run."""
    toy2 = tmp_path / "toy2.yaml"
    toy2.write_text(task_yamls["toy"].read_text().replace("name: toy", "name: toy2"))
    y = tmp_path / f"{name}.yaml"
    y.write_text(f"""name: {name}
tasks: [{task_yamls['toy']}]
seeds: [1]
models: [tiny-bert]
out_dir: runs/{name}
defaults:
  data: {{data_dir: {data_dir}}}
  train: {{epochs: 1, batch_size: 4, limit: 8}}
methods:
  - {{name: pfeiffer, label: src}}
  - {{name: pfeiffer, label: mavg, source_method: src, sources: [{toy2}, {task_yamls['toyreg']}], merge: {{strategy: avg}}}}
  - {{name: fusion, label: fus, source_method: src, sources: [{toy2}, {task_yamls['toyreg']}]}}
""")
    return y


def test_a_moved_study_folder_keeps_its_fusion_and_merge_runs(tmp_path, task_yamls, data_dir, monkeypatch):
    """Runs that use other runs' folders (fusion sources, a merged start) name them relative to
    the study folder: moved, or planned from another directory, the study finds every run done;
    folders that earlier versions named by full paths are still found where they were."""
    from adapterbench.config import config_hash
    from adapterbench.recipe.stages import resolve, run_identity, tasks_of
    y = write_merge_fusion_study(tmp_path, task_yamls, data_dir, "mv")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    before = S.plan(S.load_study(y))
    names = lambda nodes: [nd.folder.resolve().relative_to(Path("runs/mv").resolve()) for nd in nodes]  # noqa: E731
    assert {nd.stage for nd in before} == {"extract", "merge", "fuse"}
    where_before = names(before)
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "a" / "runs", tmp_path / "b" / "runs")
    monkeypatch.chdir(tmp_path / "b")
    after = S.plan(S.load_study(y))
    assert names(after) == where_before
    assert all(S.status_of(nd.folder) == "ok" for nd in after)
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0 and "0 ran, 6 already done" in r.output, r.output
    # as an earlier version named them: the merged adapter by its sources' full paths, the
    # runs that use other folders by a hash of those full paths; found, not retrained
    fus, merged = next(nd for nd in after if nd.stage == "fuse"), next(nd for nd in after if nd.stage == "merge")
    start = next(nd for nd in after if nd.label == "mavg" and nd.stage == "extract")
    how = {k: v for k, v in merged.config.items() if k not in ("adapters", "target")}
    old_merge = merged.folder.with_name(f"tiny-bert-{S.merge_digest(merged.config['adapters'], merged.config['target'], how)}")
    merged.folder.rename(old_merge)
    for nd, config in ((fus, fus.config), (start, {**start.config, "init_from": str(old_merge)})):
        cfg = resolve(config, nd.stage)
        old = nd.folder.with_name(nd.folder.name.rsplit("-", 1)[0] + "-" +
                                  config_hash(run_identity(cfg, tasks_of(cfg)), portable_paths=False))
        assert old != nd.folder
        nd.folder.rename(old)
    legacy = S.plan(S.load_study(y))
    assert {nd.folder for nd in legacy if nd.stage in ("merge", "fuse") or nd.label == "mavg"} >= {old_merge}
    assert all(S.status_of(nd.folder) == "ok" for nd in legacy)
    assert not fus.folder.exists() and not start.folder.exists()


def test_an_archive_from_before_portable_identities_still_skips_its_fusion_and_merge_runs(
        tmp_path, task_yamls, data_dir, monkeypatch):
    """Fusion runs and runs that start from a merged adapter, archived when their folder names
    hashed their sources' full paths, are matched by config (sources compared inside the study
    folder, a merged start by its merge record), so --skip-archived retrains none of them; a
    record whose config differs is stale and its run trains again, with the sources it needs."""
    y = write_merge_fusion_study(tmp_path, task_yamls, data_dir, "old")
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["run", str(y)]).exit_code == 0
    archive = tmp_path / "runs.jsonl"
    assert runner.invoke(app, ["archive", "runs/old", "--out", str(archive)]).exit_code == 0
    shutil.rmtree(tmp_path / "runs")
    records = [json.loads(x) for x in archive.read_text().splitlines()]
    for r in records:     # as an earlier version named them: other hashes, another merged folder
        if r["label"] in ("fus", "mavg"):
            r["run"] = r["run"].rsplit("-", 1)[0] + "-0000000" + str(len(r["label"]))
        if r["label"] == "mavg":
            r["config"]["init_from"] = "old/merge/mavg/toy/tiny-bert-00000000"
    write = lambda rs: archive.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write(records)
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "6 runs skipped" in said and "0 ran" in said and "cell" not in said, said
    nodes = S.plan(S.load_study(y))
    assert len(R.archive_matches(nodes, R.archive_records(archive), range(len(nodes)))) == 5   # merges: not archived
    fus = next(r for r in records if r["label"] == "fus")
    fus["config"]["train"]["lr"] = 0.5
    merged = next(r for r in records if r["label"] == "mavg")
    merged["merge"]["strategy"] = "align"
    write(records)
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "1 runs skipped" in said and "2 runs to do have a cell" in said, said
    assert "5 ran" in said            # fus, the merge, the run that starts from it, and the 2 sources


def test_explicit_adapter_globs(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    y.write_text(y.read_text().replace("  - {name: fusion", "  - {name: fusion, adapters: [" +
                                       str(tmp_path / "pre" / "*") + "]"))
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 2 and "matches no folder" in r.output and str(tmp_path / "pre") in r.output
    for t in ("toy", "toyreg"):
        r = runner.invoke(app, ["extract", "--task", str(task_yamls[t]), "--model", "tiny-bert", "--seed", "3",
                                "--out", str(tmp_path / "pre"), "--data-dir", str(data_dir),
                                "train.epochs=1", "train.limit=8"])
        assert r.exit_code == 0, r.output
    y.write_text(y.read_text().replace(str(tmp_path / "pre" / "*"), str(tmp_path / "pre" / "extract/*/*/*")))
    fus = [n for n in S.plan(S.load_study(y)) if n.stage == "fuse"][0]
    assert fus.deps == [] and len(fus.config["method"]["adapters"]) == 2   # fusion keeps the target's own


def test_report_few_shot_rows_compare_at_same_k(tmp_path):
    for seed, (a16, b16, a32, b32) in enumerate([(50, 55, 60, 60.5), (52, 58, 61, 60), (51, 56.5, 62, 63)], 1):
        fake_run(tmp_path, "adapter k=16", "rte", seed, a16)
        fake_run(tmp_path, "merged k=16", "rte", seed, b16)
        fake_run(tmp_path, "adapter k=32", "rte", seed, a32)
        fake_run(tmp_path, "merged k=32", "rte", seed, b32)
    rep = build_report(tmp_path, versus="adapter")
    assert [r.label for r in rep.rows] == ["adapter k=16", "merged k=16", "adapter k=32", "merged k=32"]
    m16, m32 = rep.by_label["merged k=16"], rep.by_label["merged k=32"]
    assert rep.delta(m16, "adapter", "rte") == pytest.approx(5.5)
    assert rep.delta(m32, "adapter", "rte") == pytest.approx(0.1666667)
    assert rep.mark(m16, "rte") == "†" and rep.mark(m32, "rte") == ""
    md = render(rep, "md")
    assert "Δ adapter" in md and "against the 'adapter' row" in md


def test_fusion_with_mta_adapters(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    text = y.read_text().replace(f"tasks: [{task_yamls['toy']}]", f"tasks: [{task_yamls['toy']}, {task_yamls['toyreg']}]")
    text = text[:text.index("methods:")] + """methods:
  - {name: mt-a}
  - {name: fusion, label: fusion-mta, source_method: mt-a}
"""
    y.write_text(text)
    nodes = S.plan(S.load_study(y))
    mta = [n for n in nodes if n.stage == "multitask"]
    fus = [n for n in nodes if n.stage == "fuse"]
    assert len(mta) == 1 and len(fus) == 2 and all(f.deps == [mta[0].index] for f in fus)
    assert fus[0].config["method"]["adapters"][0].endswith("multitask/adapters/toy")
    assert all(f.config["method"]["encoder"] == str(mta[0].folder.resolve() / "multitask" / "base_model") for f in fus)
    r = runner.invoke(app, ["run", str(y)])
    assert r.exit_code == 0, r.output
    assert "3 ran, 0 already done, 0 failed" in r.output
    merging = text.replace("{name: fusion, label: fusion-mta, source_method: mt-a}",
                           "{name: pfeiffer, label: merge-mta, source_method: mt-a, merge: {strategy: avg}}")
    y.write_text(merging)
    with pytest.raises(UserError, match="multi-task run, whose adapters need its own fine-tuned encoder"):
        S.plan(S.load_study(y))


def test_report_rows_filter(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERBENCH_DATA_DIR", raising=False)   # no majority-class row: fake runs only
    for label, v in (("full", 60.0), ("merge-avg k=32", 61.0), ("merge-align k=32", 62.0), ("adapter k=32", 59.0)):
        fake_run(tmp_path, label, "rte", 1, v)
    r = runner.invoke(app, ["report", str(tmp_path), "--rows", "adapter*,merge-*", "--versus", "adapter", "--no-plot"])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("| ") and "method" not in l]
    assert [l.split(" | ")[0][2:] for l in lines] == ["adapter k=32", "merge-align k=32", "merge-avg k=32"]
    r = runner.invoke(app, ["report", str(tmp_path), "--rows", "nope*", "--no-plot"])
    assert r.exit_code == 2 and "matches no row" in r.output


@pytest.mark.slow
def test_archive_reports_like_the_run_folders(tmp_path, task_yamls, data_dir):
    """`adapterbench archive` writes one JSON line per finished run; report reads the archive
    and prints the same table as from the run folders."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1, 2))
    assert runner.invoke(app, ["run", str(y)]).exit_code == 0
    archive = tmp_path / "runs.jsonl"
    r = runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)])
    assert r.exit_code == 0 and "10 finished runs" in r.output
    lines = [json.loads(x) for x in archive.read_text().splitlines()]
    assert len(lines) == 10 and all({"label", "seed", "config_hash", "config", "tasks", "history"} <= set(x)
                                    for x in lines)
    assert str(tmp_path) not in archive.read_text()          # no machine path: relative to the study's parent
    fusion = next(x for x in lines if x["label"] == "fusion")
    assert all(p.startswith("runs/extract/pfeiffer/") for p in fusion["config"]["method"]["adapters"])
    from_folders = runner.invoke(app, ["report", str(tmp_path / "runs"), "--no-plot"])
    from_archive = runner.invoke(app, ["report", str(archive), "--no-plot"])
    assert from_folders.exit_code == from_archive.exit_code == 0
    table = lambda out: out.split("run folders:")[0]
    assert table(from_folders.output) == table(from_archive.output)


def test_archive_updates_an_archive_and_keeps_runs_the_folder_lost(tmp_path):
    """A study folder that was lost (or holds only the newer runs) must not erase archived
    results: archiving it again keeps the archive's other lines, rewrites the runs it holds, and
    --replace writes the folder's runs alone. A damaged archive is named, never overwritten."""
    fake_run(tmp_path / "runs", "full", "rte", 1, 60.0)
    fake_run(tmp_path / "runs", "full", "rte", 2, 62.0)
    archive = tmp_path / "runs.jsonl"
    assert runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)]).exit_code == 0
    shutil.rmtree(tmp_path / "runs")                         # the folder is lost ...
    fake_run(tmp_path / "runs", "full", "rte", 3, 64.0)      # ... and a new one holds seed 3 alone
    r = runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)])
    said = " ".join(r.output.split())                        # rich wraps long lines
    assert r.exit_code == 0 and "3 finished runs" in said and ": 1 from" in said and "2 kept from the archive" in said
    seeds = lambda: sorted(json.loads(x)["seed"] for x in archive.read_text().splitlines())
    assert seeds() == [1, 2, 3]
    metrics = next((tmp_path / "runs").rglob("metrics.json"))          # a rerun of seed 3 replaces its line
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "main_value": 66.0}))
    assert runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)]).exit_code == 0
    lines = [json.loads(x) for x in archive.read_text().splitlines()]
    assert sorted(x["seed"] for x in lines) == [1, 2, 3] and next(x for x in lines if x["seed"] == 3)["main_value"] == 66.0
    r = runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive), "--replace"])
    assert r.exit_code == 0 and seeds() == [3]
    # a folder with no run folder at all (a wrong path) is named; --replace from a folder with
    # no finished run would empty the archive: refused, the archive untouched
    (tmp_path / "other").mkdir()
    r = runner.invoke(app, ["archive", str(tmp_path / "other"), "--out", str(archive)])
    assert r.exit_code == 2 and "no run folder under" in " ".join(r.output.split()) and seeds() == [3]
    unfinished = tmp_path / "other" / "full" / "rte" / "minilm-s9-abc"
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.json").write_text(json.dumps({"status": "running"}))
    r = runner.invoke(app, ["archive", str(tmp_path / "other"), "--out", str(archive), "--replace"])
    assert r.exit_code == 2 and "--replace would empty" in " ".join(r.output.split()) and seeds() == [3]
    r = runner.invoke(app, ["archive", str(tmp_path / "other"), "--out", str(archive)])
    assert r.exit_code == 0 and seeds() == [3]                # without --replace: the archive's runs kept
    archive.write_text(archive.read_text() + "{not json\n")
    before = archive.read_text()
    r = runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "line 2: not valid JSON" in said and "--replace" in said
    assert archive.read_text() == before


def unfinished_run(root: Path, seed: int, attempt: str, log: list[dict], status: str = "running") -> Path:
    """A multi-task run folder as a run still going writes it (config, env, metrics, log.jsonl)."""
    d = root / "multitask" / "camtl" / "rte-sst2" / f"tiny-bert-s{seed}-abc{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"task: rte,sst2\nmethod: {{name: camtl}}\nmodel: {{name: tiny-bert}}\n"
                                   f"seed: {seed}\nlabel: camtl\nout_dir: {root}\n")
    (d / "env.json").write_text(json.dumps({"time": attempt}))
    (d / "metrics.json").write_text(json.dumps({"status": status}))
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 9')   # a line being written
    return d


def test_archive_keeps_unfinished_runs_progress_past_a_lost_folder(tmp_path):
    """`archive --unfinished`: a run still going leaves one line (its last step, dev scores per
    epoch, each epoch's sampling shares, machines); a lost folder's line is kept beside the new
    attempt's, and an attempt that finished drops its line (its result is in the archive)."""
    root, archive, progress = tmp_path / "runs", tmp_path / "runs.jsonl", tmp_path / "unfinished.jsonl"
    fake_run(root, "full", "rte", 1, 60.0)
    step = lambda s, e, share: {"step": s, "epoch": e, "loss": 1.0 / s, "samples_per_s": 5.0, "steps_total": 300,
                                "sampling_share": share}
    scored = lambda e, s, v: {"epoch": e, "step": s, "dev": {"rte": {"accuracy": v}, "sst2": {"accuracy": v}}, "main": v}
    first = [{"machine": "CPU A"}, step(10, 0, {"rte": 0.9, "sst2": 0.1}), step(100, 0, {"rte": 0.7, "sst2": 0.3}),
             scored(0, 100, 55.0), {"resumed": True, "epoch": 0, "step": 100}, {"machine": "CPU B"},
             scored(0, 100, 56.0), step(150, 1, {"rte": 0.5, "sst2": 0.5})]
    folder = unfinished_run(root, 2, "2026-12-01T10:00:00+0000", first)
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "latest.json").write_text(json.dumps({"checkpoint": "step-140-e1"}))
    r = runner.invoke(app, ["archive", str(root), "--out", str(archive), "--unfinished", str(progress)])
    assert r.exit_code == 0 and "1 unfinished runs' progress written" in " ".join(r.output.split()), r.output
    (line,) = [json.loads(x) for x in progress.read_text().splitlines()]
    assert (line["label"], line["run"], line["seed"], line["status"]) == ("camtl", folder.name, 2, "running")
    assert (line["step"], line["steps_total"], line["checkpoint_step"]) == (150, 300, 140)
    assert line["machines"] == ["CPU A", "CPU B"]
    assert [(h["epoch"], h["main"]) for h in line["history"]] == [(0, 56.0)]          # the last scoring of epoch 0
    assert [(e["epoch"], e["step"], e["sampling_share"]["rte"]) for e in line["epochs"]] == [(0, 100, 0.7), (1, 150, 0.5)]
    assert line["config"]["out_dir"] == "runs"                  # no machine's folders in committed data
    assert [json.loads(x)["seed"] for x in archive.read_text().splitlines()] == [1]    # unfinished: not a result
    shutil.rmtree(root / "multitask")                            # the folder is lost; the run starts again
    folder = unfinished_run(root, 2, "2026-12-03T11:00:00+0000", [{"machine": "CPU A"}, step(10, 0, {"rte": 1.0})])
    r = runner.invoke(app, ["archive", str(root), "--out", str(archive), "--unfinished", str(progress)])
    assert r.exit_code == 0 and "1 kept (folders no longer there)" in " ".join(r.output.split()), r.output
    lines = sorted((json.loads(x) for x in progress.read_text().splitlines()), key=lambda x: x["attempt"])
    assert [(x["attempt"][:10], x["step"]) for x in lines] == [("2026-12-01", 150), ("2026-12-03", 10)]
    metrics = {"status": "ok", "label": "camtl", "method": "camtl", "task": "rte,sst2", "seed": 2, "main_value": 70.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))   # the new attempt finishes
    r = runner.invoke(app, ["archive", str(root), "--out", str(archive), "--unfinished", str(progress)])
    assert r.exit_code == 0 and "1 dropped (finished since)" in " ".join(r.output.split()), r.output
    assert [json.loads(x)["attempt"][:10] for x in progress.read_text().splitlines()] == ["2026-12-01"]
    assert sorted(json.loads(x)["seed"] for x in archive.read_text().splitlines()) == [1, 2]
    r = runner.invoke(app, ["archive", str(root), "--out", str(archive), "--unfinished", str(archive)])
    assert r.exit_code == 2 and "is the archive itself" in " ".join(r.output.split())
    before = progress.read_text()
    progress.write_text(before + "{not json\n")
    r = runner.invoke(app, ["archive", str(root), "--out", str(archive), "--unfinished", str(progress)])
    said = " ".join(r.output.split())                          # rich wraps long lines
    assert r.exit_code == 2 and "line 2: not valid JSON" in said and "to start it anew" in said


def test_a_lost_study_folder_resumes_from_its_archive(tmp_path, task_yamls, data_dir):
    """--skip-archived: the runs an archive holds are not trained again, except the sources a
    run still to do needs (here seed 2's fusion, dropped from the archive, retrains its pfeiffer
    sources and nothing else); a cell archived under another hash is counted, not skipped."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1, 2))
    assert runner.invoke(app, ["run", str(y)]).exit_code == 0
    archive = tmp_path / "runs.jsonl"
    assert runner.invoke(app, ["archive", str(tmp_path / "runs"), "--out", str(archive)]).exit_code == 0
    shutil.rmtree(tmp_path / "runs")
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "10 runs skipped" in said and "0 ran" in said and not (tmp_path / "runs").exists()
    lines = archive.read_text().splitlines()
    kept = [x for x in lines if not (json.loads(x)["label"] == "fusion" and json.loads(x)["seed"] == 2)]
    archive.write_text("".join(x + "\n" for x in kept))
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "7 runs skipped" in said and "3 ran" in said, said
    # the estimate printed before it starts is for those 3 runs, from the times the archive recorded
    assert re.search(r"estimated: ≈ \d+\.\d run-hours for 3 runs to do \(", said), said
    ran = sorted((m.parent.parent.parent.name, m.parent.parent.name, json.loads(m.read_text())["seed"])
                 for m in (tmp_path / "runs").rglob("metrics.json"))
    assert [(stage_label, s) for stage_label, _, s in ran] == [("fusion", 2), ("pfeiffer", 2), ("pfeiffer", 2)]
    moved = [json.dumps({**json.loads(x), "run": "tiny-bert-s1-00000000"}) if json.loads(x)["label"] == "full"
             and json.loads(x)["seed"] == 1 else x for x in kept]            # seed 1's full under another hash
    archive.write_text("".join(x + "\n" for x in moved))
    shutil.rmtree(tmp_path / "runs")
    r = runner.invoke(app, ["run", str(y), "--skip-archived", str(archive), "--dry-run"])
    assert r.exit_code == 0
    nodes = S.plan(S.load_study(y))
    skip, stale = R.archived(nodes, R.archive_records(archive))
    assert stale == 1
    assert plan_numbers(r.output) == set(range(len(nodes))) - skip     # the plan shows what is left to run
    assert runner.invoke(app, ["run", str(y), "--skip-archived", str(tmp_path / "none.jsonl")]).exit_code == 2
    # status --archive: what --skip-archived skips shows as archived; what is left is estimated by
    # the times the archive recorded (the run's own, its cell's, else its row's median)
    r = runner.invoke(app, ["status", str(y), "--archive", str(archive)])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "archived 6, running 0, queued 4" in said and "1 runs to do have a cell" in said, said
    took = {(x["label"], x["seed"], x["task"]): P.recorded_seconds(x) for x in map(json.loads, moved)}
    rows = P.status_table(nodes)
    R.mark_archived(rows, nodes, archive)
    want = (took[("full", 1, "toy")] + took[("pfeiffer", 2, "toy")] + took[("pfeiffer", 2, "toyreg")] +
            took[("fusion", 1, "toy")])                 # seed 2's fusion: its row's one archived run
    assert P.remaining(rows) == {"seconds": pytest.approx(want), "estimated": 4, "unknown": 0}


def test_report_refuses_two_runs_in_one_cell_and_splits_models(tmp_path):
    fake_run(tmp_path / "a", "full", "rte", 1, 60.0)
    fake_run(tmp_path / "b", "full", "rte", 1, 70.0)       # another config, same label/task/seed
    r = runner.invoke(app, ["report", str(tmp_path), "--no-plot"])
    assert r.exit_code == 2 and "two runs fill the cell full / rte / seed 1" in r.output
    m = json.loads((tmp_path / "b" / "full" / "rte" / "s1" / "metrics.json").read_text())
    (tmp_path / "b" / "full" / "rte" / "s1" / "metrics.json").write_text(json.dumps({**m, "model": "other"}))
    rep = build_report(tmp_path)
    assert sorted(r.label for r in rep.rows) == ["full [None]", "full [other]"]


def test_entry_seeds_extend_the_study_seeds(tmp_path, task_yamls, data_dir):
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    text = y.read_text().replace("{name: pfeiffer}", "{name: pfeiffer, seeds: [1, 2, 3]}", 1)
    y.write_text(text)
    nodes = S.plan(S.load_study(y))
    seeds = sorted(n.seed for n in nodes if n.label == "pfeiffer" and n.task.endswith("toy.yaml"))
    assert seeds == [1, 2, 3]
    assert sorted({n.seed for n in nodes if n.label != "pfeiffer"}) == [1]


def test_majority_baseline_row_from_the_tasks_data(tmp_path, monkeypatch, task_yamls, data_dir):
    """The report prints each task's majority-class baseline (train's most frequent label, or
    its mean for regression, predicted for every dev example) as a row."""
    from adapterbench.results.report import majority_baseline
    monkeypatch.setenv("ADAPTERBENCH_DATA_DIR", str(data_dir))
    value, name = majority_baseline(str(task_yamls["toy"]), None)
    assert name == "accuracy" and value == 50.0                      # TOY dev: 8 neg, 8 pos
    value, name = majority_baseline(str(task_yamls["toyreg"]), None)
    assert name == "pearson" and value == 0.0                        # a constant has no correlation
    assert majority_baseline("mnli", None) == (None, None)          # no data here (hub offline): no row, no error


def test_stale_lock_from_another_host_is_taken_over_by_its_heartbeat(tmp_path, task_yamls, data_dir):
    """A lock whose heartbeat is older than the timeout is taken over from any host; a lock
    with a fresh heartbeat on another host is respected; status shows who holds a run and where
    it is (its last logged step)."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    nodes = S.plan(S.load_study(y))
    nd = nodes[0]
    lock = L.lock_path(nd)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fresh = {"pid": 1, "host": "node-17", "job": "4242_3", "started": time.time(), "heartbeat": time.time()}
    lock.write_text(json.dumps(fresh))
    assert not L.try_lock(nd) and S.state(nd) == "running"
    row = P.status_table(nodes)[0]
    assert row.state == "running" and "node-17" in row.detail and "4242_3" in row.detail
    assert "epoch" not in row.detail                          # nothing logged yet
    nd.folder.mkdir(parents=True, exist_ok=True)
    (nd.folder / "config.yaml").write_text("train: {epochs: 3, batch_size: 8}\n")
    (nd.folder / "log.jsonl").write_text(
        '{"step": 30, "epoch": 1, "loss": 0.5, "samples_per_s": 11.0}\n{"epoch": 1, "step": 32, "dev": {}}\n'
        '{"step": 40, "epoch": 1, "loss": 0.4, "samples_per_s": 12.54}\n{"step": 5')   # a line being written
    row = P.status_table(nodes)[0]
    # the pace between its last two step records: 10 steps in 40/12.54 - 30/11 batch-seconds
    assert row.detail.endswith("; epoch 2/3, step 40, 21.6 samples/s")
    assert row.pace_seconds is None                           # a log from before steps_total
    (nd.folder / "log.jsonl").write_text('{"step": 40, "epoch": 1, "samples_per_s": 12.5, "steps_total": 120}\n')
    row = P.status_table(nodes)[0]
    assert row.detail.endswith("; epoch 2/3, step 40/120, 12.5 samples/s")
    (nd.folder / "checkpoint").mkdir()                           # what a restart would keep
    (nd.folder / "checkpoint" / "latest.json").write_text('{"checkpoint": "step-32-e1"}')
    assert P.status_table(nodes)[0].detail.endswith("; epoch 2/3, step 40/120, 12.5 samples/s; checkpoint at step 32")
    # the time left at its own pace: 80 steps x 8 examples / 12.5 per second, whatever its peers took
    assert P.status_table(nodes)[0].pace_seconds == pytest.approx(51.2)
    assert P.remaining([replace(row, expect=9999.0)]) == {"seconds": pytest.approx(51.2), "estimated": 1, "unknown": 0}
    # a queued run of the same row and task with no finished run anywhere (another seed): the
    # running run's whole time at its pace, 120 steps x 8 / 12.5 = 76.8 s; another task's: unknown
    assert row.whole_seconds == pytest.approx(76.8)
    queued = replace(row, state="queued", seed=2, pace_seconds=None, whole_seconds=None)
    other = replace(queued, task="another")
    assert P.remaining([row, queued, other]) == {"seconds": pytest.approx(51.2 + 76.8), "estimated": 2, "unknown": 1}
    # a run that sped up after a resume: paced by this leg's last steps, not by its average
    # since step 0. Before the resume, 20 steps at 8/12.5 s each (12.8 s); after it, step 30 at
    # 12.8 + 10 x 8 / 40 = 14.8 s and step 40 at 16.8 s: averages of 16.2 and 19.0 samples/s,
    # a pace of 40 samples/s between them. Left: 80 steps x 8 / 40 = 16 s (the average says 33.7)
    (nd.folder / "log.jsonl").write_text(
        '{"step": 10, "epoch": 0, "samples_per_s": 12.5, "steps_total": 120}\n'
        '{"step": 20, "epoch": 0, "samples_per_s": 12.5, "steps_total": 120}\n'
        '{"checkpoint": 20, "epoch": 0, "why": "SIGUSR1"}\n{"resumed": true, "epoch": 0, "step": 20}\n'
        f'{{"step": 30, "epoch": 0, "samples_per_s": {240 / 14.8}, "steps_total": 120}}\n'
        f'{{"step": 40, "epoch": 0, "samples_per_s": {320 / 16.8}, "steps_total": 120}}\n')
    assert P.status_table(nodes)[0].pace_seconds == pytest.approx(16.0)
    assert P.status_table(nodes)[0].detail.endswith("step 40/120, 40.0 samples/s; checkpoint at step 32")
    with open(nd.folder / "log.jsonl", "a") as f:                 # one record of a new leg: its average
        f.write('{"resumed": true, "epoch": 0, "step": 40}\n{"step": 50, "epoch": 0, "samples_per_s": 20.0, '
                '"steps_total": 120}\n')
    assert P.status_table(nodes)[0].pace_seconds == pytest.approx(70 * 8 / 20.0)
    with open(nd.folder / "log.jsonl", "a") as f:                 # a multi-task run: who fed the epoch so far
        f.write('{"step": 60, "epoch": 0, "samples_per_s": 20.0, "steps_total": 120, '
                '"sampling_share": {"rte": 0.711, "cola": 0.012}}\n')
    assert P.status_table(nodes)[0].detail.endswith("; epoch so far: rte 71%, cola 1%; checkpoint at step 32")
    with open(nd.folder / "log.jsonl", "a") as f:                 # its dev scorings: epoch 0 scored twice
        f.write('{"epoch": 0, "step": 40, "dev": {"rte": {"accuracy": 50.0}}, "main": 50.0}\n'
                '{"epoch": 0, "step": 40, "dev": {"rte": {"accuracy": 58.377}}, "main": 58.377}\n'
                '{"epoch": 1, "step": 80, "dev": {"rte": {"accuracy": 61.5}}, "main": 61.5}\n{"epoch": 2, "dev": ')
    assert P.status_table(nodes)[0].detail.endswith(
        "; epoch so far: rte 71%, cola 1%; dev by epoch: 58.38, 61.50; checkpoint at step 32")
    lock.write_text(json.dumps({**fresh, "heartbeat": time.time() - L.LOCK_TIMEOUT - 5}))
    assert S.state(nd) == "pending" and L.try_lock(nd)
    mine = json.loads(lock.read_text())
    assert mine["pid"] == os.getpid() and mine["host"] != "node-17" and "heartbeat" in mine
    L.unlock(nd)


def test_a_queued_run_with_a_checkpoint_is_paced_from_its_checkpoint(tmp_path, task_yamls, data_dir):
    """A run stopped with a checkpoint (no worker holds it) resumes from the checkpoint's step,
    not from its last logged one: status counts the steps after the checkpoint at its logged pace."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    nodes = S.plan(S.load_study(y))
    nd = nodes[0]
    nd.folder.mkdir(parents=True)
    (nd.folder / "config.yaml").write_text("train: {epochs: 3, batch_size: 8}\n")
    (nd.folder / "log.jsonl").write_text('{"step": 40, "epoch": 1, "samples_per_s": 12.5, "steps_total": 120}\n')
    row = P.status_table(nodes)[0]
    assert row.state == "queued" and row.pace_seconds is None          # no checkpoint: starts afresh
    assert P.remaining([row]) == {"seconds": 0.0, "estimated": 0, "unknown": 1}
    (nd.folder / "checkpoint").mkdir()
    (nd.folder / "checkpoint" / "latest.json").write_text('{"checkpoint": "step-32-e1"}')
    row = P.status_table(nodes)[0]
    assert row.state == "queued" and row.detail == "has a checkpoint at step 32: resumes"
    with open(nd.folder / "log.jsonl", "a") as f:                 # its first epoch's dev scoring
        f.write('{"epoch": 0, "step": 30, "dev": {"toy": {"accuracy": 70.0}}, "main": 70.0}\n')
    assert P.status_table(nodes)[0].detail == "has a checkpoint at step 32: resumes; dev by epoch: 70.00"
    assert row.pace_seconds == pytest.approx((120 - 32) * 8 / 12.5)
    assert P.remaining([row]) == {"seconds": pytest.approx(56.32), "estimated": 1, "unknown": 0}


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_same_workers(tmp_path, task_yamls, data_dir, monkeypatch):
    """--launcher submitit-local: two workers through submitit's local executor share the study
    by the lock files; every run once, job ids recorded in launch.json."""
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(1,))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["run", str(y), "--launcher", "submitit-local", "--workers", "2", "--wait", "--time", "10"])
    assert r.exit_code == 0, r.output
    launch = json.loads((tmp_path / "runs" / "launch.json").read_text())
    assert launch["launcher"] == "submitit-local" and len(launch["jobs"]) == 2
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/metrics.json")]
    assert len(metrics) == 5 and all(m["status"] == "ok" for m in metrics)
    logs = list(Path(launch["log_folder"]).glob("*_log.out"))
    started = [line for lg in logs for line in lg.read_text().splitlines() if line.endswith(": start")]
    assert len(started) == 5


def test_archive_finds_a_merge_record_from_another_folder(tmp_path, monkeypatch):
    """A study's relative init_from (runs/<study>/merge/...) is relative to where it ran; archiving
    from elsewhere still finds the merge's record (by looking up from the run folder)."""
    from adapterbench.records import archive_record
    base = tmp_path / "studies"
    run = base / "runs" / "s" / "extract" / "pfeiffer" / "rte" / "minilm-l6-s1-abc"
    merged = base / "runs" / "s" / "merge" / "m1"
    run.mkdir(parents=True)
    merged.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "main_value": 55.0, "label": "m k=32"}))
    (run / "config.yaml").write_text("init_from: runs/s/merge/m1\n")
    (merged / "adapter_config.json").write_text(json.dumps({"merge": {"strategy": "align", "sources": []}}))
    monkeypatch.chdir(tmp_path)
    rec = archive_record(run)
    assert rec["merge"] == {"strategy": "align", "sources": []} and rec["config_hash"] == "abc"
    (run / "config.yaml").write_text("init_from: runs/s/merge/missing\n")
    assert "merge" not in archive_record(run)


def test_same_track_merge_plans_only_its_tracks_sources(tmp_path, task_yamls):
    """A same-track merge trains only the sources in the target's track (no other task's adapter
    is planned for it), and one with none in the track is one clear error at plan time."""
    toy2 = tmp_path / "toy2.yaml"
    toy2.write_text(task_yamls["toy"].read_text().replace("name: toy", "name: toy2"))
    y = tmp_path / "m.yaml"
    body = f"""name: m
tasks: [{task_yamls['toy']}]
seeds: [7]
models: [tiny-bert]
out_dir: {tmp_path / 'runs'}
methods:
  - {{name: pfeiffer, label: src, seeds: [1]}}
  - {{name: pfeiffer, label: mt, source_method: src, sources: SOURCES, merge: {{strategy: align, same_track: true}}}}
"""
    y.write_text(body.replace("SOURCES", f"[{toy2}, {task_yamls['toyreg']}]"))
    nodes = S.plan(S.load_study(y))
    trained = sorted((Path(n.task).stem, n.seed) for n in nodes if n.stage == "extract" and n.label == "src")
    assert ("toyreg", 7) not in trained and ("toy2", 7) in trained
    y.write_text(body.replace("SOURCES", f"[{task_yamls['toyreg']}]"))
    with pytest.raises(UserError, match="no source task is in track"):
        S.plan(S.load_study(y))


def test_remaining_time_from_finished_runs_of_the_same_row_and_task(tmp_path):
    """status's estimate: median of the same (row, stage, task)'s finished runs; a running run
    less its current leg; a resumed run counted by its training time; no peer -> unknown."""
    def folder(name, **metrics):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(metrics))
        return str(d)

    def row(label, task, state, f):
        return P.StatusRow(label=label, stage="extract", task=task, state=state, folder=f)

    rows = [row("pfeiffer", "rte", "done", folder("a", status="ok", wall_seconds=100, train_seconds=90)),
            row("pfeiffer", "rte", "done", folder("b", status="ok", wall_seconds=50, train_seconds=300)),  # resumed
            row("pfeiffer", "rte", "done", folder("c", status="ok", wall_seconds=200, train_seconds=150)),
            row("pfeiffer", "rte", "queued", folder("d")),
            row("pfeiffer", "rte", "running", folder("e", status="running", started=1000.0)),
            row("pfeiffer", "mrpc", "queued", folder("f")),            # no finished mrpc run
            row("full", "rte", "queued", folder("g")),                 # nor a finished 'full' run
            row("pfeiffer", "rte", "failed", folder("h", status="failed")),
            row("merge", "rte", "done", folder("m", status="ok")),      # a merge records no times: 0 s
            row("merge", "rte", "queued", folder("n"))]
    left = P.remaining(rows, now=1150.0)
    # median of 100, 300, 200 = 200: the queued run 200, the running one 200 - 150 = 50, the merge 0
    assert left == {"seconds": 250.0, "estimated": 3, "unknown": 2}
    assert P.remaining(rows, now=5000.0)["seconds"] == 200.0        # overdue: never negative


def test_no_wait_leaves_runs_held_by_another_worker_to_it(tmp_path, task_yamls, data_dir):
    """wait_for_others=False (run --no-wait-others): a run another live worker holds, and the
    fusion that needs it, are left to that worker; everything else runs, and the call returns
    instead of polling until the other worker finishes."""
    st = S.load_study(write_study(tmp_path, task_yamls, data_dir, seeds=(1,)))
    nodes = S.plan(st)
    held = next(n for n in nodes if n.label == "pfeiffer" and n.task == str(task_yamls["toyreg"]))
    fusion = next(n for n in nodes if n.stage == "fuse")
    other = subprocess.Popen(["sleep", "120"])            # the other worker: alive on this host
    try:
        L.lock_path(held).parent.mkdir(parents=True, exist_ok=True)
        L.lock_path(held).write_text(json.dumps({**L.lock_record(), "pid": other.pid}))
        assert S.state(held) == "running"
        t0 = time.time()
        res = execute(st, nodes, poll=30.0, wait_for_others=False)
        assert time.time() - t0 < 25     # returned without one 30-second poll
        assert sorted(res["left"]) == sorted([held.index, fusion.index])
        assert len(res["ran"]) == len(nodes) - 2 and not res["failed"]
        assert S.state(held) == "running" and S.state(fusion) == "pending"
    finally:
        other.kill()
        other.wait()
    assert S.state(held) == "pending"    # its holder died: the next worker takes it over


def test_first_rows_run_first_after_what_they_need(tmp_path, task_yamls, data_dir):
    """`first: [fusion]` puts the fusion row's runs, each after the sources it needs, before every
    other run (seed by seed); the same runs and folders are planned, dependencies renumbered. A
    label that is not a row is one line naming it."""
    y = write_study(tmp_path, task_yamls, data_dir)
    plain = S.plan(S.load_study(y))
    y.write_text(y.read_text().replace("methods:", "first: [fusion]\nmethods:"))
    nodes = S.plan(S.load_study(y))
    assert {n.folder for n in nodes} == {n.folder for n in plain} and [n.index for n in nodes] == list(range(10))
    assert [(n.label, n.seed) for n in nodes[:6]] == [("pfeiffer", 1), ("pfeiffer", 1), ("fusion", 1),
                                                       ("pfeiffer", 2), ("pfeiffer", 2), ("fusion", 2)]
    assert [n.label for n in nodes[6:]] == ["full", "pfeiffer-rf64"] * 2
    by_folder = {n.folder: n for n in plain}
    for n in nodes:   # the same dependencies, by folder, each placed before its run
        assert [nodes[d].folder for d in n.deps] == [plain[d].folder for d in by_folder[n.folder].deps]
        assert all(d < n.index for d in n.deps)
    # first_seeds: only seed 1 of the fusion row goes first; its seed 2 waits behind the other rows' seed 1
    y.write_text(y.read_text().replace("first: [fusion]", "first: [fusion]\nfirst_seeds: [1]"))
    nodes = S.plan(S.load_study(y))
    assert {n.folder for n in nodes} == {n.folder for n in plain}
    assert [(n.label, n.seed) for n in nodes[:5]] == [("pfeiffer", 1), ("pfeiffer", 1), ("fusion", 1),
                                                       ("full", 1), ("pfeiffer-rf64", 1)]
    assert all(d < n.index for n in nodes for d in n.deps)
    for bad, said in (("first_seeds: [1]", "first_seeds: [7]"), ("first: [fusion]\n", "")):
        text = y.read_text().replace(bad, said)
        (tmp_path / "bad.yaml").write_text(text)
        r = runner.invoke(app, ["run", str(tmp_path / "bad.yaml"), "--dry-run"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and "first_seeds" in r.output, r.output
        assert ("names seed 7, which no row runs" if said else "needs `first`") in r.output
    y.write_text(y.read_text().replace("\nfirst_seeds: [1]", ""))
    y.write_text(y.read_text().replace("first: [fusion]", "first: [fusoin]"))
    r = runner.invoke(app, ["run", str(y), "--dry-run"])
    assert r.exit_code == 2 and "first names 'fusoin'" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_run_that_needs_others_runs_as_soon_as_they_are_placed(tmp_path):
    """With `first`, a fusion comes right after the last of its sources is placed, ahead of the
    other tasks' runs (so the sources' folders are needed for the shortest time); a consumer
    outside the first rows (a merge row) still waits behind every first row."""
    def node(i, label, task, deps=()):
        return S.Node(i, "fuse" if deps else "extract", label, task, 2, "m", {}, tmp_path / f"{label}-{task}",
                      list(deps), label)
    plain = [node(0, "full", "a"), node(1, "pfeiffer", "a"), node(2, "pfeiffer", "b"), node(3, "fusion", "a", (1, 2)),
             node(4, "full", "b"), node(5, "fusion", "b", (1, 2)), node(6, "merged", "a", (1, 2))]
    nodes = S.run_order(plain, ["full", "pfeiffer", "fusion"])
    assert [(n.label, n.task) for n in nodes] == [("full", "a"), ("pfeiffer", "a"), ("pfeiffer", "b"), ("fusion", "a"),
                                                  ("fusion", "b"), ("full", "b"), ("merged", "a")]
    assert all(d < n.index for n in nodes for d in n.deps) and [n.index for n in nodes] == list(range(7))
    # a run that needs both a source and a run over that source comes after both
    chain = [node(0, "pfeiffer", "a"), node(1, "merge", "a", (0, 2)), node(2, "pfeiffer", "b"),
             node(3, "start", "a", (2, 1))]
    got = S.run_order(chain, [])
    assert all(d < n.index for n in got for d in n.deps), [(n.label, n.deps) for n in got]
    nodes = S.run_order(plain, [])         # no first rows: plan order, each fusion as soon as it can
    assert [(n.label, n.task) for n in nodes] == [("full", "a"), ("pfeiffer", "a"), ("pfeiffer", "b"), ("fusion", "a"),
                                                  ("fusion", "b"), ("merged", "a"), ("full", "b")]


@pytest.mark.slow
def test_calibrate_estimates_every_row_before_its_first_run(tmp_path, task_yamls, data_dir):
    """`run --dry-run --calibrate N` times each row's training on each of its tasks here and
    prints the run-hours of everything to do, rows a sweep holds back included (at the sweep's
    first rate), writing no run. Its token counts keep the budgets' arithmetic: two methods on
    the same training sets train on the same tokens, two epochs on twice one epoch's, MTL's
    epoch of all examples on what the single-task rows train on together; finished runs drop out."""
    from adapterbench.study import calibrate as C
    y = write_study(tmp_path, task_yamls, data_dir, seeds=(2,), extra_methods=(
        "  - {name: full, label: full-2ep, train: {epochs: 2}}\n"
        "  - {name: full, label: swept, lr_sweep: [1.0e-4, 1.0e-3]}\n"
        "  - {name: mtl}\n"))
    y.write_text(y.read_text().replace(f"tasks: [{task_yamls['toy']}]",
                                       f"tasks: [{task_yamls['toy']}, {task_yamls['toyreg']}]"))
    r = runner.invoke(app, ["run", str(y), "--dry-run", "--calibrate", "1"])
    assert r.exit_code == 0, r.output
    assert "calibrated: ≈" in r.output and "swept lr=0.0001" in r.output and not (tmp_path / "runs").exists()
    st = S.load_study(y)
    timed = []

    def timer(config, model, task, steps, spec):            # a fixed speed: the arithmetic is exact
        timed.append((config, Path(task).stem))
        return 1000.0
    rows = {e.row: e for e in C.estimate(st, S.plan(st), 1, timer)}
    assert sorted(timed) == sorted(set(timed)) == sorted((c, t) for c in ("full", "fusion2", "mtl", "pfeiffer")
                                                         for t in ("toy", "toyreg"))   # each timed once
    assert {"full", "pfeiffer", "pfeiffer-rf64", "fusion", "mtl", "full-2ep", "swept lr=0.0001", "swept lr=0.001",
            "swept"} <= set(rows)
    assert rows["swept"].runs == 2 and rows["swept lr=0.0001"].runs == 2 and rows["fusion"].runs == 2
    assert rows["full"].tokens > 0
    assert rows["full"].tokens == pytest.approx(rows["pfeiffer"].tokens) == pytest.approx(rows["swept"].tokens)
    assert rows["full-2ep"].tokens == pytest.approx(2 * rows["full"].tokens)
    assert rows["mtl"].tokens == pytest.approx(rows["full"].tokens)
    assert all(e.seconds == pytest.approx(e.tokens / 1000.0) and e.tokens_per_s == 1000.0 for e in rows.values())
    assert runner.invoke(app, ["run", str(y), "--only", "full"]).exit_code == 0
    st = S.load_study(y)
    left = {n.label for n in C.runs_to_do(st, S.plan(st))}
    assert "full" not in left and {"pfeiffer", "swept", "mtl"} <= left
