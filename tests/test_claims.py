"""Claims reports: verdicts computed from hand-written metrics (gain, parity, not testable),
the --metric choice, the written document, and bad claims files."""

import json
from pathlib import Path

import pytest
from scipy.stats import ttest_1samp
from typer.testing import CliRunner

from adapterbench.claims import Claim, judge, load_claims
from adapterbench.cli import app
from adapterbench.errors import UserError
from adapterbench.report import collect

runner = CliRunner()


def fake_run(root: Path, label: str, task: str, seed: int, value: float, acc: float | None = None):
    d = root / label.replace(" ", "_") / task / f"s{seed}"
    d.mkdir(parents=True)
    dev = {"f1": value, **({"accuracy": acc} if acc is not None else {})}
    (d / "metrics.json").write_text(json.dumps({
        "status": "ok", "label": label, "method": label, "task": task, "seed": seed, "main_value": value,
        "metrics": {"dev": dev}, "trainable_percent": 1.0, "train_seconds": 5.0}))


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


def test_gain_claim_confirmed_with_the_paired_test(runs):
    v = judge(Claim(id="f", title="f", a="fusion", b="full"), collect(runs))
    diffs = [6, 5.5, 6, 4, 4.5, 4]     # rte then mrpc, seeds 1..3
    assert v.word == "confirmed" and v.n == 6
    assert v.delta == pytest.approx((5.8333333 + 4.1666667) / 2)
    assert v.p == pytest.approx(ttest_1samp(diffs, 0).pvalue)
    assert [row[0] for row in v.per_task] == ["mrpc", "rte"]


def test_gain_claim_not_confirmed_when_the_other_way(runs):
    v = judge(Claim(id="f", title="f", a="full", b="fusion"), collect(runs))
    assert v.word == "not confirmed" and v.delta < 0


def test_parity_claim_is_a_non_inferiority_test(runs):
    rows = collect(runs)
    within = judge(Claim(id="h", title="h", a="houlsby", b="full", kind="parity", margin=2.0), rows)
    diffs = [0.2, -0.5, 0.1, -0.1, 0.2, -0.2]
    assert within.word == "confirmed"
    assert within.p == pytest.approx(ttest_1samp([d + 2.0 for d in diffs], 0, alternative="greater").pvalue)
    tight = judge(Claim(id="h", title="h", a="houlsby", b="full", kind="parity", margin=0.0), rows)
    assert tight.word == "not confirmed"


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
    from adapterbench.study import load_study
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
