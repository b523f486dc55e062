"""Every file the project ships validates: tasks (down to their data where it is at hand),
studies (their whole plan), claims files and example run configs; each opens with the
command that uses it."""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.config import split_labels
from adapterbench.tasks import configs_dir

runner = CliRunner()
SHIPPED = sorted(p for p in configs_dir().glob("*/*.yaml"))
HERE = {"rte", "mrpc", "cola", "stsb", "sst2", "wnli", "cb", "sick"}   # data in ../shared/data/glue


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_validates(path):
    r = runner.invoke(app, ["validate", str(path)])
    if path.parent.name == "tasks" and (path.stem not in HERE or not os.environ.get("ADAPTERBENCH_DATA_DIR")):
        # no data here (MNLI, QQP, QNLI train, ...): the definition is fine or the one line names the data
        assert r.exit_code == 0 or (r.exit_code == 2 and len(r.output.strip().splitlines()) <= 3), r.output
        return
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("ok") or "ok (run config" in r.output


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name in ("studies", "runs", "claims")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_opens_with_its_command(path):
    head = "\n".join(path.read_text().splitlines()[:25])
    assert "adapterbench " in head, f"{path} should say in its opening comment which command uses it"


ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *SHIPPED]


def documented_commands(path: Path) -> list[tuple[int, list[str], bool]]:
    """Every `adapterbench ...` command line a file shows (a README or guide line, a YAML
    comment), as (line, its words up to a shell operator, comment or the next `adapterbench`,
    whether it is shown as code: a code block or backticks in Markdown, an indented example in
    a YAML comment); continuation lines joined."""
    import re
    import shlex
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    found, block = [], False
    for i, line in enumerate(text.splitlines(), 1):
        block = block != line.lstrip().startswith("```")
        for m in re.finditer(r"(?:^|[\s`(=])(?:\.venv/bin/)?adapterbench((?: +(?:(?!adapterbench)[^`|;&#<>])*)?)", line):
            try:
                words = shlex.split(m.group(1).split("  #")[0])
            except ValueError:
                continue
            code = (block or line[max(m.start() - 1, 0):m.start() + 2].count("`") > 0 if path.suffix == ".md"
                    else line.startswith("#   "))
            if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                found.append((i, words, code))
    return found


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist_with_their_options(path):
    """A command a document or a shipped file's comment shows names a real command and only
    options that command has (a removed option such as report's old --baselines fails here)."""
    import typer.main
    group = typer.main.get_command(app)
    top = {o for p in group.params for o in p.opts}
    words_seen = 0
    for line, words, code in documented_commands(path):
        if words[0] not in group.commands:
            if not code:
                continue       # prose that names the program ("adapterbench wrote ...")
            raise AssertionError(f"{path.name}:{line}: no command '{words[0]}' (adapterbench {' '.join(words)})")
        cmd = group.commands[words[0]]
        known = top | {o for p in cmd.params for o in p.opts} | {"--help"}
        for w in words[1:]:
            if w.startswith("--"):
                assert w.split("=")[0].rstrip(").,;:") in known, f"{path.name}:{line}: adapterbench {words[0]} has no option {w}"
        words_seen += 1
    if path.suffix == ".md" and path.name in ("README.md", "training.md", "studies.md"):
        assert words_seen >= 3, f"{path.name}: expected its example commands to be found"


def test_user_task_folder_adds_to_the_shipped_tasks(tmp_path, task_yamls):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "toy.yaml").write_text(task_yamls["toy"].read_text().replace("dir: TOY", f"dir: {task_yamls['toy'].parent.parent / 'data' / 'TOY'}"))
    r = runner.invoke(app, ["--tasks-dir", str(folder), "ls", "tasks"])
    assert r.exit_code == 0 and "toy" in r.output and "rte" in r.output     # added, not replacing


def test_include_deep_merges_a_variant():
    from adapterbench.tasks import load_task
    mm = load_task("mnli_mismatched")
    assert mm.sources.local.files["dev"] == "dev_mismatched.tsv"
    assert mm.sources.local.files["train"] == "train.tsv" and mm.sources.local.columns == {"label": "gold_label"}
    assert mm.labels == load_task("mnli").labels


@pytest.mark.skipif(not os.environ.get("ADAPTERBENCH_DATA_DIR"), reason="run identities include the data's content")
@pytest.mark.parametrize("archive_name,study,least", [("runs.jsonl", "reproduce_full", 50),
                                                      ("fair.jsonl", "reproduce_fair", 16)])
def test_committed_archive_is_the_shipped_study(tmp_path, archive_name, study, least):
    """Every run in a committed archive (docs/results/runs.jsonl, fair.jsonl) is a run of its
    study as shipped: the same resolved config (source folders relative to the study, as the
    archive writes them) and, for runs that name no other folder, the same identity (config +
    data content). The planner reads the archive's finished sweeps, as `run --skip-archived`
    does, so the rows their rates chose are planned. An edited budget, rate or data file makes
    this fail until the study is re-run."""
    import json
    from pathlib import Path

    from adapterbench.study import plan as S
    from adapterbench.study.execute import open_study
    from adapterbench.config import config_hash, to_dict
    from adapterbench.archive import relative_to
    from adapterbench.recipe.stages import resolve

    archive = Path(__file__).parent.parent / "docs" / "results" / archive_name
    records = [json.loads(line) for line in archive.read_text().splitlines()]
    st = open_study(configs_dir() / "studies" / f"{study}.yaml", str(tmp_path / study), archive=archive)
    plan = {}
    for node in S.plan(st):
        if node.stage != "merge":
            cfg = relative_to(to_dict(resolve(node.config, node.stage)), (tmp_path,))
            plan[(cfg["label"], cfg["task"], cfg["seed"])] = (node, cfg)
    # the archived merged starts were named by their sources' full paths (before identities were
    # portable): compare their place only
    merged_start = lambda c: {**c, "init_from": c["init_from"] and str(Path(c["init_from"]).parent)}  # noqa: E731
    # both configs name source folders as the archive does (relative, under different out_dirs): hash them as written
    same = lambda c: config_hash(merged_start(c), portable_paths=False)  # noqa: E731
    assert len(records) >= least
    for r in records:
        node, cfg = plan[(r["config"]["label"], r["config"]["task"], r["config"]["seed"])]
        assert same(r["config"]) == same(cfg), (r["label"], r["task"], r["seed"])
        if not cfg["init_from"] and not cfg["method"].get("adapters"):
            assert node.folder.name == r["run"], (r["label"], r["task"], r["seed"])


@pytest.mark.parametrize("name", ["reproduce_fair", "reproduce_base"])
def test_claims_tables_wait_for_the_seeds_their_study_plans(name):
    """A claims file's tables name, per row, the seeds its study reports (the study's seeds, or
    the entry's own: `seeds_by_row`), so `still_to_come` neither waits for seeds never planned
    nor passes a row as finished before its last seed."""
    from adapterbench.results.claims import load_claims
    from adapterbench.study.plan import load_study
    study = load_study(configs_dir() / "studies" / f"{name}.yaml")
    planned = {e.label or e.name: sorted(e.seeds or study.seeds) for e in study.methods}
    tables = [t for t in load_claims(configs_dir() / "claims" / f"{name}.yaml")["tables"] if t.get("seeds")]
    assert tables
    for t in tables:
        for row in split_labels(t["rows"]):
            assert sorted((t.get("seeds_by_row") or {}).get(row, t["seeds"])) == planned[row], (t["id"], row)


def test_committed_fair_predictions_recompute_every_reported_score():
    """Every run of the committed fair rerun has its per-epoch predictions in the gzipped file
    its archive line names (docs/results/fair.predictions/), and they give back, at every scored
    epoch, the dev and held-out scores its history reports (so the selection-optimism table, read
    from the histories, is what the predictions say), and at the chosen epoch the reported ones,
    task by task. Nothing committed under docs/ is over 1 MiB (the predictions are why the
    archive would be)."""
    import json

    import numpy as np

    from adapterbench import metrics as M
    from adapterbench.archive import read_predictions
    docs = Path(__file__).parent.parent / "docs"
    archive = docs / "results" / "fair.jsonl"
    predictions = read_predictions(archive)
    records = [json.loads(line) for line in archive.read_text().splitlines()]
    assert len(predictions) == len(records)
    for r in records:
        p = predictions[r["label"], r["run"]]
        assert p["best_epoch"] == r["best_epoch"] and p["selection"] == r["selection"] == "heldout"
        assert [e["epoch"] for e in p["epochs"]] == [h["epoch"] for h in r["history"]]
        score = lambda e, split, task, metric: M.compute(   # noqa: E731
            [metric], np.array(p["labels"][split][task]), np.array(e[split][task]))[metric]
        for e, h in zip(p["epochs"], r["history"]):
            for split in ("dev", "heldout"):
                for task, scores in h[split].items():
                    metric = r["tasks"][task]["main_metric"]
                    assert score(e, split, task, metric) == pytest.approx(scores[metric], abs=1e-6), (r["run"], split)
        at = next(e for e in p["epochs"] if e["epoch"] == r["best_epoch"])
        for task, scores in r["tasks"].items():
            for split in ("dev", "heldout"):
                metric = scores["main_metric"]
                want = scores[split][metric]
                assert score(at, split, task, metric) == pytest.approx(want, abs=1e-6), (r["run"], task)
    assert max(f.stat().st_size for f in docs.rglob("*") if f.is_file()) < 2 ** 20


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("archive,claims,document", [("runs.jsonl", "reproduce_full", "results.md"),
                                                     ("fair.jsonl", "reproduce_fair", "results-fair.md")])
def test_committed_results_document_is_the_regenerated_one(tmp_path, monkeypatch, archive, claims, document):
    """docs/results.md (and the fair rerun's docs/results-fair.md) is what its documented command
    makes from the committed archive (so no number in it was edited by hand, and a change to the
    statistics regenerates it); its plots are made beside it as the committed ones are."""
    import os
    from adapterbench.results.document import write_claims_report
    if not os.environ.get("ADAPTERBENCH_DATA_DIR"):
        pytest.skip("needs the data folder (the majority-class rows)")
    root = Path(__file__).parent.parent
    out = tmp_path / document
    monkeypatch.chdir(root)
    write_claims_report(Path("docs/results") / archive, Path(f"configs/claims/{claims}.yaml"), out)
    made = out.read_text().replace(str(out), f"docs/{document}")
    assert made == (root / "docs" / document).read_text()
    committed = root / "docs" / Path(document).stem
    plots = {p.name for p in committed.glob("*.png")} if document != "results.md" else {"forest.png"}
    assert plots <= {p.name for p in out.with_suffix("").glob("*.png")}
    assert all(p.stat().st_size > 10_000 for p in out.with_suffix("").glob("*.png"))


STUDIES = [p for p in SHIPPED if p.parent.name == "studies"]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_opening_command_runs_dry(path, tmp_path):
    """Each study's opening `adapterbench run ...` command, as its comment gives it, runs with
    --dry-run (the plan and its estimate, no training); its --out goes to a temporary folder."""
    runs = [words for _, words, _ in documented_commands(path)[:6]
            if words[0] == "run" and "--calibrate" not in words]          # calibrating times real steps
    assert runs, f"{path.name}: its opening comment shows no `adapterbench run` command"
    args = list(runs[-1] if path.name in runs[-1][1] or runs[-1][1] in (path.stem, str(path)) else runs[0])
    args[1] = str(path)                                        # configs/studies/x.yaml or x, from anywhere
    if "--out" in args:
        args[args.index("--out") + 1] = str(tmp_path / "runs")
    else:
        args += ["--out", str(tmp_path / "runs")]
    r = runner.invoke(app, [*args, "--dry-run"])
    if r.exit_code == 2:      # a study over adapters another study trains (its comment runs that one first)
        assert "train those adapters first" in r.output and len(r.output.strip().splitlines()) <= 2, r.output
        assert any(w[0] == "run" and w[1] != args[1] for _, w, _ in documented_commands(path)[:6]), r.output
        return
    assert r.exit_code == 0, r.output
    assert "estimated:" in r.output and not (tmp_path / "runs").exists()
