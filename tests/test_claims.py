"""Claims reports: verdicts computed from hand-written metrics (gain, parity, not testable),
the --metric choice, the written document, and bad claims files."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterbench.results.claims import Claim, judge, load_claims, verdict
from adapterbench.cli import app
from adapterbench.errors import UserError
from adapterbench.results.report import collect

runner = CliRunner()


def fake_run(root: Path, label: str, task: str, seed: int, value: float, acc: float | None = None):
    d = root / label.replace(" ", "_") / task / f"s{seed}"
    d.mkdir(parents=True)
    dev = {"f1": value, **({"accuracy": acc} if acc is not None else {})}
    (d / "metrics.json").write_text(json.dumps({
        "status": "ok", "label": label, "method": label, "task": task, "seed": seed, "main_value": value,
        "metrics": {"dev": dev}, "trainable_percent": 1.0, "train_seconds": 5.0}))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in records))
    return path


def report_claims(runs: Path, tmp_path: Path, claims: str):
    """`report RUNS --claims` with a claims file of this text: (the CLI's result, the document's path)."""
    spec, out = tmp_path / "claims.yaml", tmp_path / "results.md"
    spec.write_text(claims)
    return runner.invoke(app, ["report", str(runs), "--claims", str(spec), "--out", str(out), "--no-plot"]), out


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    table = {"full": {"rte": [60, 62, 64], "mrpc": [80, 81, 82]},
             "fusion": {"rte": [66, 67.5, 70], "mrpc": [84, 85.5, 86]},          # clearly better
             "houlsby": {"rte": [60.2, 61.5, 64.1], "mrpc": [79.9, 81.2, 81.8]},  # about equal
             "camtl": {"rte": [50, 52], "mrpc": [70, 71]}}                       # 2 seeds
    for label, tasks in table.items():
        for task, vals in tasks.items():
            for seed, v in enumerate(vals, start=1):
                fake_run(root, label, task, seed, float(v), acc=float(v) - 10)
    fake_run(root, "lonely", "rte", 1, 50.0)
    return root


def stratified_p(per_task: list[list[float]], shift: float = 0.0) -> tuple[float, float]:
    """(Δ, one-sided p) computed here by hand: tasks as strata, Welch–Satterthwaite df."""
    from scipy.stats import t
    means = [np.mean(d) for d in per_task]
    parts = [np.var(d, ddof=1) / len(d) for d in per_task]
    se = np.sqrt(sum(parts)) / len(per_task)
    df = sum(parts) ** 2 / sum(p * p / (len(d) - 1) for p, d in zip(parts, per_task))
    delta = float(np.mean(means))
    return delta, float(t.sf((delta + shift) / se, df))


def test_gain_claim_confirmed_by_the_stratified_test(runs):
    v = verdict(Claim(id="f", title="f", a="fusion", b="full"), collect(runs))
    delta, p = stratified_p([[4, 4.5, 4], [6, 5.5, 6]])     # mrpc, rte; seeds 1..3
    assert v.word == "confirmed" and v.n == 6
    assert v.delta == pytest.approx((5.8333333 + 4.1666667) / 2) == pytest.approx(delta)
    assert v.p == pytest.approx(p) and v.ci[0] > 0
    assert [row[0] for row in v.per_task] == ["mrpc", "rte"]


def test_gain_claim_contradicted_when_the_other_way(runs):
    v = verdict(Claim(id="f", title="f", a="full", b="fusion"), collect(runs))
    assert v.word == "contradicted" and v.delta < 0 and v.ci[1] < 0


def test_parity_claim_is_a_non_inferiority_test(runs):
    rows = collect(runs)
    within = verdict(Claim(id="h", title="h", a="houlsby", b="full", kind="parity", margin=2.0), rows)
    assert within.word == "confirmed"
    assert within.p == pytest.approx(stratified_p([[-0.1, 0.2, -0.2], [0.2, -0.5, 0.1]], shift=2.0)[1])
    tight = verdict(Claim(id="h", title="h", a="houlsby", b="full", kind="parity", margin=0.0), rows)
    assert tight.word == "inconclusive" and tight.ci[0] < 0 < tight.ci[1]


def test_inconclusive_gives_power_and_the_seeds_that_would_settle_it(runs):
    """houlsby vs full: Δ near 0 with a CI that holds both 0 and the paper's +0.2: inconclusive,
    with the power at the paper's Δ and the seeds per task for 80%; a paper Δ of +1 lies outside
    the CI: contradicted."""
    from adapterbench.results import stats
    v = verdict(Claim(id="h", title="h", a="houlsby", b="full", paper_delta={"rte": 0.2, "mrpc": 0.2}), collect(runs))
    assert v.word == "inconclusive" and v.paper == 0.2 and v.ci[0] < 0 < 0.2 < v.ci[1]
    assert 0 < v.power < 0.8 and v.seeds_needed > 3
    assert stats.power(v.estimate, 0.2, v.seeds_needed) >= 0.8 > stats.power(v.estimate, 0.2, v.seeds_needed - 1)
    far = verdict(Claim(id="h", title="h", a="houlsby", b="full", paper_delta=1.0), collect(runs))
    assert far.word == "contradicted" and far.ci[1] < 1.0
    assert f"about {v.seeds_needed} seeds" in v.note


def test_holm_adjusts_across_the_gain_claims_only(runs):
    from adapterbench.results.claims import decide, judge
    rows = collect(runs)
    claims = [Claim(id="a", title="a", a="fusion", b="full"), Claim(id="b", title="b", a="fusion", b="houlsby"),
              Claim(id="c", title="c", a="houlsby", b="full", kind="parity", margin=2.0)]
    vs = [judge(c, rows) for c in claims]
    raw = [v.p for v in vs]
    decide(claims, vs)
    lo, hi = sorted(raw[:2])
    assert sorted(v.p for v in vs[:2]) == pytest.approx([2 * lo, max(2 * lo, hi)])
    assert vs[2].p == raw[2]


def test_a_claim_across_selection_protocols_is_refused(runs):
    d = runs / "heldout_full" / "rte" / "s1"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"status": "ok", "label": "full-h", "method": "full", "task": "rte",
                                                "seed": 1, "main_value": 60.0, "metrics": {"dev": {"f1": 60.0}},
                                                "selection": "heldout"}))
    with pytest.raises(UserError, match="'full-h' selects its epochs on heldout, 'fusion' on dev"):
        judge(Claim(id="x", title="x", a="full-h", b="fusion"), collect(runs))


def test_not_testable_cases(runs):
    rows = collect(runs)
    assert judge(Claim(id="x", title="x", a="nope", b="full"), rows).word == "not testable here"
    assert "seeds" in judge(Claim(id="x", title="x", a="lonely", b="full"), rows).note
    v = judge(Claim(id="x", title="x", a="lonely", b="full", tasks=["mrpc"]), rows)
    assert v.word == "not testable here" and "mrpc" in v.note
    v = judge(Claim(id="x", title="x", a="fusion", b="full", testable=False, why="needs MNLI"), rows)
    assert v.word == "not testable here" and v.note == "needs MNLI"
    v = judge(Claim(id="c", title="c", a="camtl", b="full"), rows)
    assert v.n == 4 and ("rte", 51.0, 61.0, -10.0) == v.per_task[1][:4]   # means over the seeds both have


def test_a_claim_without_enough_seeds_shows_the_runs_so_far_without_a_verdict(runs):
    """A study under way: one task with a single shared seed, another missing from row a. No
    verdict, no mean, no p; the per-task table holds what exists so far."""
    fake_run(runs, "partial", "rte", 1, 70.0)
    rows = collect(runs)
    v = judge(Claim(id="p", title="p", a="partial", b="full", tasks=["rte", "mrpc"]), rows)
    assert v.word == "not testable here" and v.delta is None and v.p is None
    assert "rte" in v.note and "no verdict" in v.note
    assert v.per_task == [("rte", 70.0, 60.0, 10.0, None, 1)]
    from adapterbench.results.document import claim_section
    text = claim_section(1, Claim(id="p", title="p", a="partial", b="full"), v)
    assert "| rte | 70.00 | 60.00 | +10.00 | – | 1 |" in text and "**mean**" not in text


def test_metric_option_scores_by_accuracy(runs):
    assert collect(runs, "accuracy")["full"].cells["rte"].by_seed[1] == 50.0
    assert collect(runs)["full"].cells["rte"].by_seed[1] == 60.0
    assert collect(runs, "accuracy")["lonely"].cells["rte"].by_seed[1] == 50.0   # no accuracy: main metric


def test_report_claims_writes_the_document(runs, tmp_path):
    spec = tmp_path / "claims.yaml"
    spec.write_text("""
title: Toy results
intro: Made from hand-written runs.
tables:
  - {id: main, title: Everything, rows: "full,fusion,houlsby", reference: adapterfusion-bert-base}
  - {id: rteonly, title: RTE only, rows: [full, lonely], tasks: [rte], metric: accuracy}
  - {id: later, title: Not run yet, rows: "merge-*"}
claims:
  - id: fusion-gain
    title: Fusion beats full fine-tuning
    paper: Someone 2021
    claim: Fusion is better.
    a: fusion
    b: full
    paper_delta: {rte: 5.8, mrpc: 5.1}
    discussion: Because the toy numbers say so.
  - {id: missing, title: Something we cannot run, a: fusion, b: full, testable: false, why: no MNLI here}
""")
    out = tmp_path / "docs" / "results.md"
    r = runner.invoke(app, ["report", str(runs), "--claims", str(spec), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "fusion-gain: confirmed" in r.output and "missing: not testable here" in r.output
    text = out.read_text()
    assert text.startswith("# Toy results") and "Made from hand-written runs." in text
    assert "| 1 | Fusion beats full fine-tuning | confirmed | +5.00 |" in text
    assert "| rte | 67.83 | 62.00 | +5.83 |" in text and "+5.80 |" in text
    assert "Because the toy numbers say so." in text and "no MNLI here" in text
    assert "paper: full" in text                     # the reference rows beside ours
    assert (tmp_path / "docs" / "results" / "main.png").stat().st_size > 1000
    assert "![Everything](results/main.png)" in text
    rte_only = text.split("## RTE only")[1].split("##")[0]
    assert "| method | rte | mean |" in rte_only and "| full | 52.00 ± 2.00 (3) |" in rte_only
    assert "_No finished runs yet for rows merge-*._" in text


@pytest.mark.parametrize("content,needle", [
    ("claims:\n  - {id: a, title: t, a: x, b: y, kind: better}\n", "kind 'better' must be gain or parity"),
    ("claims:\n  - {id: a, title: t, a: x, b: y, colour: red}\n", "unknown key 'colour'"),
    ("claims:\n  - {id: a, title: t, a: x}\n", "needs 'b'"),
    ("tables:\n  - {title: t}\n", "needs 'id' and 'rows'"),
    ("verdicts: []\n", "unknown key 'verdicts'"),
    ("tables:\n  - {id: f, rows: fusion, plot: heatmap}\n", "plot = 'heatmap' must be bars .scores. or attention"),
])
def test_bad_claims_files(tmp_path, content, needle):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_claims(f)


def test_claims_need_a_markdown_out(runs, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("claims: []\n")
    r = runner.invoke(app, ["report", str(runs), "--claims", str(f)])
    assert r.exit_code == 2 and "--out FILE.md" in r.output


def test_shipped_claims_files_parse_and_name_study_rows():
    from adapterbench.study.plan import load_study
    from adapterbench.tasks import configs_dir
    files = sorted((configs_dir() / "claims").glob("*.yaml"))
    assert files
    for f in files:
        spec = load_claims(f)
        study = load_study(configs_dir() / "studies" / f"{f.stem}.yaml")
        labels = {m.label or m.name for m in study.methods}
        for c in spec["claims"]:
            for row in (c.a, c.b):
                assert row.split(" k=")[0] in labels, (f.name, row)


def test_settings_table_states_each_rows_budget(tmp_path):
    """--settings: lr, epoch budget, the selection protocol, epochs run / best epoch (1-based means), warm-up, data and
    precision from each run's resolved config (and how many bf16 runs computed their products as
    fp32 GEMMs), the machines the runs trained on; values that differ within a row are all shown."""
    root = tmp_path / "runs"
    for seed, (lr, best, run) in enumerate([(1e-4, 1, 4), (1e-4, 3, 6), (3e-4, 2, 5)], start=1):
        fake_run(root, "pfeiffer", "rte", seed, 60.0 + seed)
        d = root / "pfeiffer" / "rte" / f"s{seed}"
        m = json.loads((d / "metrics.json").read_text())
        gemm = {"bf16_matmul": "fp32 GEMM of bf16-rounded operands", "selection": "heldout"} if seed == 3 else {}
        # where they trained: seeds 1 and 2 on one GPU, seed 3 resumed on a CPU after starting on it
        where = {"GPU A": 50.0} if seed < 3 else {"GPU A": 20.0, "EPYC (AVX2, 1 thread)": 90.0}
        (d / "metrics.json").write_text(json.dumps({**m, "best_epoch": best, "epochs_run": run, "pooling": "mean",
                                                    "machine_seconds": where, **gemm}))
        (d / "config.yaml").write_text(
            f"train: {{lr: {lr}, epochs: 10, patience: 3, warmup_ratio: 0.1, batch_size: 32, limit: 20000, "
            f"precision: bf16}}\n")
    fake_run(root, "adapter k=32", "rte", 1, 55.0)
    (root / "adapter_k=32" / "rte" / "s1" / "config.yaml").write_text(
        "train: {lr: 0.001, epochs: 10, patience: 0, warmup_ratio: 0.0, batch_size: 8, shots: 32, precision: fp32}\n")
    r = runner.invoke(app, ["report", str(root), "--settings", "--no-plot", "--no-majority"])
    assert r.exit_code == 0, r.output
    assert ("| pfeiffer | pfeiffer | 1e-4 / 3e-4 | ≤ 10 (patience 3) | dev / heldout | 5.0 | 3.0 | 10% | 32 | ≤ 20,000 | "
            "bf16 (1 of 3 runs: fp32 GEMMs) | mean | EPYC (AVX2, 1 thread) + GPU A (1) / GPU A (2) | 3 |") in r.output
    assert ("| adapter k=32 | adapter k=32 | 1e-3 | 10 | dev | – | – | 0% | 8 | 32/class | fp32 | ? | not recorded | 1 |"
            in r.output)
    bad = runner.invoke(app, ["report", str(root), "--settings", "--format", "csv"])
    assert bad.exit_code == 2 and "use it with --format md" in bad.output


def test_claims_table_from_another_archive_with_settings(runs, tmp_path):
    """A claims table can read its own runs (`runs:`, e.g. a learning-rate sweep's archive) and
    show its rows' settings (`settings: true`); the document's other tables keep the main runs."""
    sweep = tmp_path / "sweep.jsonl"
    lines = [{"status": "ok", "label": f"head lr={lr}", "method": "head", "task": "rte", "seed": 1,
              "main_value": v, "best_epoch": 0, "epochs_run": 4, "config": {"train": {"lr": float(lr), "epochs": 10}}}
             for lr, v in (("1e-3", 51.0), ("3e-3", 57.5))]
    write_jsonl(sweep, lines)
    r, out = report_claims(runs, tmp_path, f"tables:\n  - {{id: main, rows: full}}\n"
                                           f"  - {{id: sweep, rows: 'head *', runs: {sweep}, settings: true}}\n")
    assert r.exit_code == 0, r.output
    main, swept = out.read_text().split("## sweep")
    assert "| full | 81.00 ± 1.00 (3) | 62.00 ± 2.00 (3) |" in main and "head lr" not in main
    assert "| head lr=3e-3 | 57.50 (1) |" in swept             # one seed: no std to show
    assert "| head lr=1e-3 | head | 1e-3 | 10 | dev | 4.0 | 1.0 |" in swept and "| full |" not in swept


def test_unfinished_runs_show_how_far_they_got_and_which_attempts_were_lost(runs, tmp_path):
    """`unfinished:` a table lists its rows' unfinished attempts (from `archive --unfinished`) at
    its seeds: step, dev score per epoch, the last epoch's shares; an attempt a later one replaced
    (still going, or finished: its run is among the results) is marked lost. Not a result: the table's cells and verdicts stay the finished runs'. Without
    finished runs the list still shows; a missing file is named."""
    def attempt(label, seed, started, step, history=(), share=None):
        return {"run": f"m-s{seed}-abc", "label": label, "seed": seed, "attempt": started, "step": step, "task": "rte,mrpc",
                "snapshot": "2026-12-03T12:00:00+0000", "steps_total": 3792,
                "history": [{"epoch": e, "main": v} for e, v in enumerate(history)],
                "epochs": [{"epoch": len(history), "step": step, "sampling_share": share}] if share else []}
    lines = [attempt("mt-a", 2, "2026-12-01T09:00:00+0000", 2130, (58.38,), {"mrpc": 0.162, "rte": 0.684}),
             attempt("mt-a", 2, "2026-12-03T11:51:00+0000", 60, (), {"rte": 0.63, "mrpc": 0.16}),
             attempt("mt-a", 3, "2026-12-02T08:00:00+0000", 1303, (47.29,)),
             attempt("mt-a", 9, "2026-12-02T08:00:00+0000", 5), attempt("mtl", 2, "2026-12-02T08:00:00+0000", 5),
             {**attempt("mt-a", 1, "2026-12-02T08:00:00+0000", 40), "run": "m-s1-abc", "status": "failed"},
             {**attempt("full", 2, "2026-12-01T08:00:00+0000", 70), "run": "s2"}]    # the run finished since
    going = write_jsonl(tmp_path / "unfinished.jsonl", lines)
    r, out = report_claims(runs, tmp_path, "tables:\n"
                           f"  - {{id: mt, rows: 'full,mt-a', seeds: [1, 2, 3], unfinished: {going}}}\n"
                           f"  - {{id: none, rows: mt-a, seeds: [2], unfinished: {going}}}\n")
    assert r.exit_code == 0, r.output
    mt, none = out.read_text().split("## none")
    assert "| full | 81.00 ± 1.00 (3) | 62.00 ± 2.00 (3) |" in mt and "| mt-a |" not in mt.split("| row | seed")[0]
    listed = [line for line in mt.splitlines() if line.startswith("| mt-a |")]
    assert listed == [
        "| mt-a | 1 | 2026-12-02T08:00 | 2026-12-03T12:00 | 40 of 3792 (failed) | – |  |",
        "| mt-a | 2 | 2026-12-01T09:00 | 2026-12-03T12:00 | 2130 of 3792 (lost) | 58.38 | epoch 2: rte 68.4%, mrpc 16.2% |",
        "| mt-a | 2 | 2026-12-03T11:51 | 2026-12-03T12:00 | 60 of 3792 | – | epoch 1: rte 63.0%, mrpc 16.0% |",
        "| mt-a | 3 | 2026-12-02T08:00 | 2026-12-03T12:00 | 1303 of 3792 | 47.29 |  |"]
    assert [line for line in mt.splitlines() if line.startswith("| full | 2 |")] == [
        "| full | 2 | 2026-12-01T08:00 | 2026-12-03T12:00 | 70 of 3792 (lost) | – |  |"]
    assert "snapshots, not results" in mt and "| mtl |" not in mt
    assert "_No finished runs yet for rows mt-a._" in none and none.count("| mt-a | 2 |") == 2
    r, _ = report_claims(runs, tmp_path, f"tables:\n  - {{id: mt, rows: mt-a, unfinished: {tmp_path / 'no.jsonl'}}}\n")
    assert r.exit_code == 2 and "no.jsonl does not exist" in " ".join(r.output.split())


def test_majority_row_never_waits_on_the_hub(tmp_path, monkeypatch):
    """Without a local copy of the task's data the majority-class row is left out; the Hub is not tried."""
    from adapterbench import data
    from adapterbench.results import report
    def no_hub(*a, **k):
        raise AssertionError("the report tried the Hub")
    monkeypatch.setattr(data, "read_hub_split", no_hub)
    monkeypatch.setenv("ADAPTERBENCH_DATA_DIR", str(tmp_path))
    assert report.majority_baseline("rte", None) == (None, None)


def test_extras_table_shows_sampling_shares_and_merge_alignment(tmp_path):
    """extras: a multi-task run's share of examples per task, a merged start's units moved (mean
    over sites) and relative change per source, a fusion run's attention per source (the target's
    own starred); runs with nothing extra are left out."""
    lines = [
        {"status": "ok", "label": "camtl", "method": "camtl", "task": "rte", "seed": 2, "main_value": 60.0,
         "tasks": {"rte": {"main_value": 55.0}, "mrpc": {"main_value": 65.0}},
         "share_of_examples": {"rte": 0.873, "mrpc": 0.127}, "fraction_used_per_task": {"rte": 1.0, "mrpc": 0.24}},
        {"status": "ok", "label": "merge-track-align k=32", "method": "pfeiffer", "task": "rte", "seed": 1,
         "main_value": 55.0, "merge": {"strategy": "align", "kind": "merge", "sources": [
             {"task": "sick", "units_moved": {"0.ffn": 0.0, "1.ffn": 0.0}, "relative_change": 1.5},
             {"task": "cb", "units_moved": {"0.ffn": 0.5, "1.ffn": 0.25}, "relative_change": 0.25}]}},
        {"status": "ok", "label": "full", "method": "full", "task": "rte", "seed": 1, "main_value": 61.0},
        {"status": "ok", "label": "fusion", "method": "fusion", "task": "rte", "seed": 2, "main_value": 59.0,
         "fusion_attention": {"rte": [0.2, 0.1], "sick": [0.5, 0.8], "cb": [0.3, 0.1]}}]
    archive = tmp_path / "runs.jsonl"
    archive.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from adapterbench.results.render import extras_rows
    header, body = extras_rows(archive)
    assert [r[0] for r in body] == ["camtl", "fusion", "merge-track-align k=32"]
    assert body[1][3] == "attention (mean over layers): sick 65%, cb 20%, rte* 15%; peak sick 80% at layer 1"
    body = [body[0], body[2]]
    assert body[0][1:3] == ["mrpc,rte", "2"] and "share of examples: mrpc 12.7%, rte 87.3%" in body[0][3]
    assert "of each training set used: mrpc 24%, rte 100%" in body[0][3]
    assert body[1][3] == ("align of sick (units moved 0%, ‖θ−θ₀‖/‖θ₀‖ 1.50), cb (units moved 38%, "
                          "‖θ−θ₀‖/‖θ₀‖ 0.25) [merge]")
    assert extras_rows(archive, ["full"])[1] == []


def test_claims_document_before_any_run_finished(tmp_path):
    """An empty archive (a study just started) gives a document whose claims are all not testable;
    an archive that does not exist is one clear error."""
    spec = tmp_path / "c.yaml"
    spec.write_text("tables:\n  - {id: main, rows: full}\nclaims:\n  - {id: x, title: X beats Y, a: x, b: y}\n")
    empty = tmp_path / "runs.jsonl"
    empty.write_text("")
    out = tmp_path / "r.md"
    r = runner.invoke(app, ["report", str(empty), "--claims", str(spec), "--out", str(out), "--no-plot"])
    assert r.exit_code == 0 and "x: not testable here" in r.output
    assert "_No finished runs yet for rows full._" in out.read_text()
    r = runner.invoke(app, ["report", str(tmp_path / "nope.jsonl"), "--claims", str(spec), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_seeds_keep_a_tables_cells_to_the_reported_seeds(runs, tmp_path):
    """`seeds:` in a claims table (and `report --seeds`) leave out runs of other seeds, e.g. the
    extra seeds a study trained for another row's sake; the claims still pair over shared seeds."""
    fake_run(runs, "fusion", "rte", 4, 90.0)   # an extra seed that only fusion has
    spec = tmp_path / "claims.yaml"
    spec.write_text("tables:\n  - {id: all, rows: fusion}\n  - {id: reported, rows: fusion, seeds: [1, 2, 3]}\n"
                    "claims:\n  - {id: f, title: f, a: fusion, b: full}\n")
    out = tmp_path / "results.md"
    r = runner.invoke(app, ["report", str(runs), "--claims", str(spec), "--out", str(out), "--no-plot"])
    assert r.exit_code == 0, r.output
    everything, reported = out.read_text().split("## reported")
    assert "| fusion | 85.17 ± 1.04 (3) | 73.38 ± 11.21 (4) |" in everything
    assert "| fusion | 85.17 ± 1.04 (3) | 67.83 ± 2.02 (3) |" in reported
    cli = runner.invoke(app, ["report", str(runs), "--rows", "fusion", "--seeds", "1,2,3", "--no-plot", "--no-majority"])
    assert cli.exit_code == 0 and "| fusion | 85.17 ± 1.04 (3) | 67.83 ± 2.02 (3) |" in cli.output, cli.output
    bad = runner.invoke(app, ["report", str(runs), "--seeds", "two"])
    assert bad.exit_code == 2 and "--seeds 'two'" in bad.output
    spec.write_text("tables:\n  - {id: t, rows: fusion, seeds: 2}\n")
    with pytest.raises(UserError, match=r"tables\[0\].seeds = 2 must be a list"):
        load_claims(spec)


def test_verdict_line_reads_p_below_a_thousandth(runs):
    from adapterbench.results.document import claim_section
    c = Claim(id="f", title="f", a="fusion", b="full")
    v = verdict(c, collect(runs))
    assert v.p < 0.001
    text = claim_section(1, c, v)
    assert "Holm-adjusted over the gain claims < 0.001 (α 0.05, one-sided)." in text and "p = <" not in text


def test_a_claim_by_accuracy_says_what_tasks_without_it_use(runs):
    from adapterbench.results.document import claim_section
    fake_run(runs, "fusion", "stsb", 1, 80.0)
    fake_run(runs, "fusion", "stsb", 2, 81.0)
    fake_run(runs, "full", "stsb", 1, 79.0)
    fake_run(runs, "full", "stsb", 2, 79.5)
    c = Claim(id="f", title="f", a="fusion", b="full", metric="accuracy")
    v = judge(c, collect(runs, "accuracy"))
    assert ("stsb", 80.5, 79.25) == v.per_task[-1][:3]        # no accuracy: its main metric
    assert "(accuracy where a task reports it, else its main metric, dev;" in claim_section(1, c, v)


def test_attention_plot_averages_each_targets_runs(tmp_path):
    """`plot: attention`: a fusion row's target x source matrix, each cell the mean over layers and
    the table's seeds, the targets' own adapters on the diagonal; drawn as one heatmap per row."""
    def rec(task, seed, att):
        return {"status": "ok", "label": "fusion", "method": "fusion", "task": task, "seed": seed,
                "main_value": 60.0, "fusion_attention": att}
    lines = [rec("rte", 2, {"sick": [0.6, 0.4], "rte": [0.4, 0.6]}), rec("rte", 3, {"sick": [0.2, 0.2], "rte": [0.8, 0.8]}),
             rec("rte", 9, {"sick": [1.0, 1.0], "rte": [0.0, 0.0]}),      # a seed the table leaves out
             rec("mrpc", 2, {"sick": [0.1, 0.1], "rte": [0.0, 0.0], "mrpc": [0.9, 0.9]})]
    archive = tmp_path / "runs.jsonl"
    archive.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from adapterbench.results.report import attention_matrix, selected_records
    targets, sources, matrix = attention_matrix(selected_records(archive, None, [2, 3]), "fusion", ["mrpc", "rte"])
    assert targets == ["mrpc", "rte"] and sources == ["mrpc", "rte", "sick"]
    assert np.allclose(matrix[1][1:], [0.65, 0.35]) and np.isnan(matrix[1][0])   # rte: no mrpc source
    assert np.allclose(matrix[0], [0.9, 0.0, 0.1])
    spec = tmp_path / "c.yaml"
    spec.write_text("tables:\n  - {id: att, rows: fusion, seeds: [2, 3], extras: true, plot: attention}\n")
    out = tmp_path / "docs" / "r.md"
    r = runner.invoke(app, ["report", str(archive), "--claims", str(spec), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "![fusion: attention per target](r/att-fusion.png)" in out.read_text()
    assert (tmp_path / "docs" / "r" / "att-fusion.png").stat().st_size > 1000
    assert not (tmp_path / "docs" / "r" / "att.png").exists()


def test_a_table_with_seeds_says_which_runs_are_still_to_come(runs, tmp_path):
    """A table that names its seeds lists, below it, each named row with no run and each row's
    missing seeds (per task where tasks differ), so a table from a study under way does not pass
    for a finished one; a complete table, or one without seeds, gets no such line. A row the
    study ran at fewer seeds (`seeds_by_row`) waits only for those; a bad mapping is one line."""
    spec = tmp_path / "claims.yaml"
    spec.write_text("tables:\n"
                    "  - {id: part, rows: 'full,camtl,lonely,head,hou*', tasks: [rte, mrpc], seeds: [1, 2, 3]}\n"
                    "  - {id: whole, rows: 'full,houlsby,camtl', seeds: [1, 2, 3], seeds_by_row: {camtl: [1, 2]}}\n"
                    "  - {id: unsaid, rows: 'full,camtl'}\n")
    out = tmp_path / "results.md"
    r = runner.invoke(app, ["report", str(runs), "--claims", str(spec), "--out", str(out), "--no-plot"])
    assert r.exit_code == 0, r.output
    part, whole, unsaid = out.read_text().split("## ")[1:]
    assert ("_Still to come (runs this table names that have not finished): camtl (seed 3), "
            "lonely (rte: seeds 2, 3; mrpc: seeds 1, 2, 3), head (no run yet)._") in part
    assert "Still to come" not in whole and "Still to come" not in unsaid    # camtl's seeds are 1 and 2 there
    for bad, words in (("{camtl: [3, 4]}", "must list some of the table's seeds"), ("[1, 2]", "must map rows"),
                       ("{lonely: [1]}", "not a row of the table")):
        spec.write_text(f"tables:\n  - {{id: t, rows: 'full,camtl', seeds: [1, 2, 3], seeds_by_row: {bad}}}\n")
        r = runner.invoke(app, ["report", str(runs), "--claims", str(spec), "--out", str(out), "--no-plot"])
        assert r.exit_code == 2 and words in r.output and "tables[0].seeds_by_row" in r.output, r.output


def test_protocol_sensitivity_and_selection_optimism(runs, tmp_path):
    """A held-out archive judged beside the dev-selected runs: both verdicts per claim, whether the
    protocol changed it, and each row's optimism (dev at the dev-best epoch minus dev at the
    epoch the held-out slice chose) read from the runs' per-epoch scores."""
    def rec(label, task, seed, value, dev_curve, best):
        return {"status": "ok", "label": label, "method": label, "task": task, "seed": seed, "main_value": value,
                "metrics": {"dev": {"f1": value}}, "selection": "heldout", "best_epoch": best, "run": f"{label}-{task}-{seed}",
                "history": [{"epoch": e, "main": v} for e, v in enumerate(dev_curve)]}
    lines = []
    for seed, (a, b) in enumerate([(61, 60), (60, 62), (63, 61)], start=1):
        for task in ("rte", "mrpc"):
            lines.append(rec("fusion", task, seed, a, [a - 1, a, a + 2], 1))     # dev would pick epoch 2: +2
            lines.append(rec("full", task, seed, b, [b, b - 3], 0))              # dev agrees: 0
    fair = write_jsonl(tmp_path / "fair.jsonl", lines)
    r, out = report_claims(fair, tmp_path, f"compare_protocols: {runs}\nclaims:\n"
                                           "  - {id: f, title: fusion beats full, a: fusion, b: full}\n")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "## Protocol sensitivity" in text
    section = text.split("## Protocol sensitivity")[1]
    row = next(x for x in section.splitlines() if x.startswith("| 1 | fusion beats full |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "inconclusive" and cells[5] == "heldout" and cells[6] == "confirmed" and cells[8] == "dev"
    assert cells[9] == "yes"
    assert "| fusion | 6 | +2.00 | +2.00 |" in text and "| full | 6 | +0.00 | +0.00 |" in text
    # a rerun still under way (the held-out archive lacks a row): no verdict here, so nothing changed yet
    write_jsonl(fair, [x for x in lines if x["label"] == "full"])
    r, out = report_claims(fair, tmp_path, f"compare_protocols: {runs}\nclaims:\n"
                                           "  - {id: f, title: fusion beats full, a: fusion, b: full}\n")
    row = next(x for x in out.read_text().split("## Protocol sensitivity")[1].splitlines()
               if x.startswith("| 1 | fusion beats full |"))
    cells = [c.strip() for c in row.split("|")]
    assert r.exit_code == 0 and cells[3] == "not testable here" and cells[6] == "confirmed"
    assert cells[9] == "– (runs missing)"
    # the same claims beside another encoder's archive: its own heading, both may stand together
    write_jsonl(fair, lines)
    r, out = report_claims(fair, tmp_path, f"compare_protocols: {runs}\ncompare_encoders: {fair}\nclaims:\n"
                                           "  - {id: f, title: fusion beats full, a: fusion, b: full}\n")
    text = out.read_text()
    assert r.exit_code == 0 and "## Protocol sensitivity" in text and "## Encoder sensitivity" in text
    row = next(x for x in text.split("## Encoder sensitivity")[1].splitlines() if x.startswith("| 1 | fusion beats full |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == cells[6] == "inconclusive" and cells[9] == "no"      # the same archive: nothing changes
