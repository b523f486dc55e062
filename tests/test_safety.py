"""Safe by design (issue 42): every YAML a command reads goes through one strict reader
(duplicate keys, alias bombs, deep nesting, non-UTF-8: one line, exit 2), and deletes and
overwrites touch only what adapterbench wrote, never through a link."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.errors import UserError
from adapterbench.fileio import remove_checkpoints, staged
from adapterbench.recipe.runfolder import clear_run_folder, written_by_us

runner = CliRunner()

BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, a in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))
HOSTILE = {   # what a received or hand-edited YAML can hold, and the words its one line must say
    "duplicate key": (b"name: s\ntasks: [rte]\nmethods: [{name: full}]\nmethods: []\n", "given twice"),
    "alias bomb": (BOMB.encode(), "aliases expand"),
    "deep nesting": (b"a: " + b"[" * 1200 + b"]" * 1200 + b"\n", "nested too deeply"),
    "latin-1": ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8"),
}


def commands(path: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that reads a YAML a user gives it, by the way it takes the file."""
    return {"validate": ["validate", str(path)],
            "extract --config": ["extract", "--config", str(path), "--out", str(tmp / "runs")],
            "finetune --config": ["finetune", "--config", str(path), "--out", str(tmp / "runs")],
            "extract --task": ["extract", "--task", str(path), "--out", str(tmp / "runs")],
            "multitask --config": ["multitask", "--config", str(path), "--out", str(tmp / "runs")],
            "run": ["run", str(path), "--dry-run", "--out", str(tmp / "runs")],
            "status": ["status", str(path)],
            "report --claims": ["report", str(tmp), "--claims", str(path), "--out", str(tmp / "r.md")],
            "tune --config": ["tune", "--config", str(path), "--out", str(tmp / "tune"), "--trials", "1",
                              "--space", "train.lr=loguniform(1e-4,1e-2)"]}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("command", sorted(commands(Path("x"), Path("y"))))
def test_every_yaml_reader_refuses_hostile_files_in_one_line(kind, command, tmp_path):
    data, words = HOSTILE[kind]
    path = tmp_path / "hostile.yaml"
    path.write_bytes(data)
    r = runner.invoke(app, commands(path, tmp_path)[command])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and words in r.output and len(r.output.strip().splitlines()) <= 3, r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.md").exists()


def test_a_duplicate_key_is_refused_even_where_both_values_would_parse(tmp_path):
    """The last of two `train:` blocks used to win silently; now the file is named with its line."""
    path = tmp_path / "run.yaml"
    path.write_text("task: rte\ntrain: {lr: 1.0e-4}\nmethod: {name: pfeiffer}\ntrain: {epochs: 1}\n")
    r = runner.invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and "line 4" in r.output and "'train' is given twice" in r.output, r.output


def scratch(tmp_path: Path) -> Path:
    """A scratch disk holding a colleague's folders, and a run's checkpoints in it."""
    disk = tmp_path / "scratch"
    for name in ("their-results", "step-9-e0", "step-12-e1"):
        (disk / name).mkdir(parents=True)
        (disk / name / "f").write_text(name)
    (disk / "latest.json").write_text('{"checkpoint": "step-12-e1"}')
    (disk / "notes.txt").write_text("theirs")
    return disk


def test_checkpoints_on_a_linked_scratch_disk_are_the_only_thing_deleted(tmp_path):
    disk = scratch(tmp_path)
    link = tmp_path / "run" / "checkpoint"
    link.parent.mkdir()
    link.symlink_to(disk)
    remove_checkpoints(link, keep="step-12-e1")               # a new checkpoint: the older one goes
    assert sorted(p.name for p in disk.iterdir()) == ["latest.json", "notes.txt", "step-12-e1", "their-results"]
    remove_checkpoints(link)                                    # the run finished
    assert sorted(p.name for p in disk.iterdir()) == ["notes.txt", "their-results"]
    assert not link.exists() and not link.is_symlink()         # the link goes, its target's other files stay


def test_clearing_a_run_folder_deletes_only_what_adapterbench_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"status": "failed"}')
    (run / ".metrics.json.abcd1234.tmp").write_text("")        # a write interrupted by the failure
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter.safetensors").write_text("")
    (run / ".my_notes").write_text("mine")                      # a user's dot-file
    with pytest.raises(UserError, match=r"\.my_notes"):
        clear_run_folder(run)
    assert (run / ".my_notes").is_file() and (run / "metrics.json").is_file()   # nothing was deleted
    (run / ".my_notes").unlink()
    disk = scratch(tmp_path)
    (run / "checkpoint").symlink_to(disk)
    with pytest.raises(UserError, match="checkpoint/"):          # the scratch disk holds others' files
        clear_run_folder(run)
    for name in ("their-results", "notes.txt"):
        os.rename(disk / name, tmp_path / name)
    clear_run_folder(run)
    assert not run.exists() and disk.is_dir() and not any(disk.iterdir())
    link = tmp_path / "linked-run"
    link.symlink_to(tmp_path / "their-results")
    with pytest.raises(UserError, match="is a link"):
        clear_run_folder(link)
    assert (tmp_path / "their-results" / "f").is_file()


def test_force_replaces_the_files_it_writes_and_keeps_the_others(tmp_path):
    """--force on an output folder: "the files this command writes there (others are kept)",
    also inside subfolders; a link in the way is replaced as a link, its target untouched."""
    @staged
    def write(out: Path, force: bool = False):
        (out / "sources" / "a").mkdir(parents=True)
        (out / "sources" / "a" / "adapter.safetensors").write_text("new")
        (out / "fusion_config.json").write_text("new")

    out = tmp_path / "out"
    write(out)
    (out / "sources" / "mine").mkdir()
    (out / "sources" / "mine" / "keep.txt").write_text("mine")
    outside = tmp_path / "outside.json"
    outside.write_text("not yours")
    (out / "fusion_config.json").unlink()
    (out / "fusion_config.json").symlink_to(outside)
    with pytest.raises(UserError, match="not empty"):
        write(out)
    write(out, force=True)
    assert (out / "sources" / "mine" / "keep.txt").read_text() == "mine"
    assert (out / "sources" / "a" / "adapter.safetensors").read_text() == "new"
    assert not (out / "fusion_config.json").is_symlink() and (out / "fusion_config.json").read_text() == "new"
    assert outside.read_text() == "not yours"


# --- values of the wrong shape or range, anywhere on a command line: one line, exit 2 ----------

@pytest.fixture(scope="module")
def two_adapters(tiny_bert_dir, tmp_path_factory):
    """Two finished adapter runs of one configuration (seeds 0 and 1), their task and data."""
    from .conftest import write_data, write_task_yamls
    root = tmp_path_factory.mktemp("two")
    data, yamls = write_data(root / "data"), write_task_yamls(root)
    runs = []
    for seed in (0, 1):
        r = runner.invoke(app, ["extract", "--task", str(yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                                str(data), "--out", str(root / f"s{seed}"), "--seed", str(seed), "train.max_steps=1"])
        assert r.exit_code == 0, r.output
        runs.append(str(next((root / f"s{seed}").glob("extract/pfeiffer/toy/*"))))
    return runs, data, yamls


VALUE_CASES = {   # command line -> words of its one line
    "seed 2**32": (lambda e: ["extract", "--task", e.toy, "--seed", str(2**32)], "less than or equal to 4294967295"),
    "seed 2**64 as override": (lambda e: ["extract", "--task", e.toy, f"seed={2**64}"], "2**32 - 1"),
    "data seed 2**40": (lambda e: ["extract", "--task", e.toy, f"data.data_seed={2**40}"], "2**32 - 1"),
    "shuffle seed 2**33": (lambda e: ["finetune", "--task", e.toy, f"data.shuffle_seed={2**33}"], "2**32 - 1"),
    "epochs 2**63": (lambda e: ["extract", "--task", e.toy, f"train.epochs={2**63}"], "at most"),
    "label of 300 characters": (lambda e: ["extract", "--task", e.toy, "label=" + "x" * 300], "120 printable"),
    "method as a list": (lambda e: ["extract", "--task", e.toy, "method=[a,b]"], "not a method's name"),
    "method as a number": (lambda e: ["finetune", "--task", e.toy, "method.name=3"], "not a method's name"),
    "a task twice": (lambda e: ["multitask", "--tasks", f"{e.toy},{e.toy}", "--method", "mtl"], "given twice"),
    "a task twice by name and path": (lambda e: ["multitask", "--tasks", f"toy,{e.toy}", "--method", "mt-a",
                                                 "--tasks-dir-placeholder"], "given twice"),
    "a fusion source twice": (lambda e: ["fuse", "--target", e.toy, "--adapters", e.a, "--adapters", e.a], "given twice"),
    "a merge source twice": (lambda e: ["merge", "--adapters", e.a, "--adapters", e.a, "--out", e.out], "given twice"),
    "merge weight nan": (lambda e: ["merge", "--adapters", e.a, "--adapters", e.b, "--weights", "nan,1", "--out", e.out],
                         "finite"),
    "merge weight inf": (lambda e: ["merge", "--adapters", e.a, "--adapters", e.b, "--weights", "1,inf", "--out", e.out],
                         "finite"),
    "align examples 0": (lambda e: ["merge", "--adapters", e.a, "--adapters", e.b, "--strategy", "align", "--align-on",
                                    e.toy, "--align-examples", "0", "--out", e.out], "greater than or equal to 1"),
}


class Env:
    def __init__(self, runs, data, yamls, tmp):
        self.a, self.b, self.toy, self.out, self.data, self.tmp = runs[0], runs[1], str(yamls["toy"]), str(tmp / "m"), data, tmp


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_values_of_the_wrong_shape_or_range_are_one_line(case, two_adapters, tiny_bert_dir, tmp_path, monkeypatch):
    runs, data, yamls = two_adapters
    monkeypatch.setenv("ADAPTERBENCH_TASKS", "")        # --tasks-dir sets it for this process: restored after
    e = Env(runs, data, yamls, tmp_path)
    make, words = VALUE_CASES[case]
    args = make(e)
    if args[-1] == "--tasks-dir-placeholder":           # 'toy' by name: its folder on the task path
        args = ["--tasks-dir", str(yamls["toy"].parent), *args[:-1]]
    if "merge" not in args:
        args += ["--model", str(tiny_bert_dir), "--out", str(tmp_path / "runs"), "train.max_steps=2"]
    r = runner.invoke(app, [*args, "--data-dir", str(data)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not list(tmp_path.glob("**/metrics.json")) and not (tmp_path / "m").exists()


def test_fusion_with_temperature_trains(two_adapters, tiny_bert_dir, tmp_path):
    """method.temperature=true (T from 50 annealed to 1) used to crash at the first backward."""
    runs, data, yamls = two_adapters
    r = runner.invoke(app, ["fuse", "--target", str(yamls["toy"]), "--adapters", runs[0], "--adapters", runs[1],
                            "--model", str(tiny_bert_dir), "--data-dir", str(data), "--out", str(tmp_path / "f"),
                            "method.temperature=true", "train.max_steps=3"])
    assert r.exit_code == 0, r.output
    assert '"status": "ok"' in next(tmp_path.glob("f/fuse/**/metrics.json")).read_text()


def test_merge_writes_no_nan_adapter(two_adapters, tmp_path):
    """A merge of two finite adapters with finite weights is finite, and nothing is written for nan."""
    from adapterbench.fileio import load_tensors
    runs, data, _ = two_adapters
    r = runner.invoke(app, ["merge", "--adapters", runs[0], "--adapters", runs[1], "--weights", "2,1",
                            "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    weights = load_tensors(tmp_path / "ok" / "adapter.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INTS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**63, 10**9 + 1]))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["seed", "data.data_seed", "data.shuffle_seed", "train.epochs", "train.batch_size",
                            "train.limit", "train.max_steps", "train.patience", "train.shots", "train.log_every",
                            "train.eval_every", "train.checkpoint_every", "model.max_length", "train.heldout_min"]),
       value=INTS, command=st.sampled_from(["extract", "finetune", "multitask"]))
def test_every_integer_key_at_any_size_is_accepted_or_one_line(key, value, command, tmp_path_factory, task_yamls):
    """Hypothesis over the integer keys of every training command at sizes up to 2**70 (the
    family the seed crash belonged to), resolved by `validate` as the command would: accepted,
    or one line with exit 2."""
    tmp = tmp_path_factory.mktemp("ints")
    task = f"{task_yamls['toy']},{task_yamls['toyreg']}" if command == "multitask" else str(task_yamls["toy"])
    (tmp / "run.yaml").write_text(f"task: '{task}'\n")
    stage = {"extract": "extract", "finetune": "finetune", "multitask": "multitask"}[command]
    method = {"extract": "pfeiffer", "finetune": "full", "multitask": "mtl"}[command]
    r = runner.invoke(app, ["validate", str(tmp / "run.yaml"), "--stage", stage, f"method={method}", f"{key}={value}"])
    assert r.exit_code in (0, 2), (r.exit_code, r.output, repr(r.exception))
    if r.exit_code == 2:
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output


# --- archives, reports and launcher state ------------------------------------------------------

def archive_line(label: str, seed: int, value: float, **extra) -> str:
    import json
    return json.dumps({"run": f"m-s{seed}-abc", "label": label, "method": "pfeiffer", "task": "rte", "model": "m",
                       "seed": seed, "status": "ok", "main_metric": "accuracy", "main_value": value,
                       "tasks": {"rte": {"dev": {"accuracy": value}, "main_metric": "accuracy", "main_value": value}},
                       "config": {}, **extra}) + "\n"


HOSTILE_LABEL = "a|b <script>x</script> \\input{/etc/passwd} $y$ 50% my_row #1 & {z}"


def test_report_never_writes_over_what_it_reads(tmp_path):
    archive = tmp_path / "runs.jsonl"
    archive.write_text(archive_line("full", 1, 60.0) + archive_line("full", 2, 61.0))
    before = archive.read_text()
    for out, words in (("runs.jsonl", "would write over"), ("table.png", "the plot goes beside it")):
        r = runner.invoke(app, ["report", str(archive), "--out", str(tmp_path / out), "--no-majority"])
        assert r.exit_code == 2 and words in r.output, r.output
        assert not (tmp_path / "table.png").exists()
    assert archive.read_text() == before


def test_labels_are_text_in_markdown_latex_and_plots(tmp_path):
    archive = tmp_path / "a.jsonl"
    archive.write_text("".join(archive_line(lab, s, v) for lab, s, v in
                               [("full", 1, 60.0), ("full", 2, 61.0), (HOSTILE_LABEL, 1, 62.0), (HOSTILE_LABEL, 2, 63.0)]))
    r = runner.invoke(app, ["report", str(archive), "--out", str(tmp_path / "t.md"), "--no-majority"])
    assert r.exit_code == 0, r.output
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| a")]
    assert len(rows) == 1 and "<script>" not in rows[0] and "a\\|b" in rows[0]
    assert rows[0].count(" | ") == (tmp_path / "t.md").read_text().splitlines()[0].count(" | ")   # no extra cell
    assert (tmp_path / "t.png").stat().st_size > 0                     # "$y$" drawn as text
    r = runner.invoke(app, ["report", str(archive), "--format", "latex", "--out", str(tmp_path / "t.tex"),
                            "--no-majority", "--no-plot"])
    tex = (tmp_path / "t.tex").read_text()
    assert r.exit_code == 0 and "\\input{" not in tex and r"\textbackslash{}input\{/etc/passwd\}" in tex
    row = next(line for line in tex.splitlines() if line.startswith("a"))
    assert row.count(" & ") == next(line for line in tex.splitlines() if line.startswith("method")).count(" & ")


@pytest.mark.parametrize("field,value", [("seed", "abc"), ("seed", True), ("main_value", "4_5"), ("main_value", True),
                                         ("main_value", float("inf")), ("tasks", [1]), ("label", 3)])
def test_a_mistyped_archive_field_is_one_line_naming_it(field, value, tmp_path):
    import json
    lines = [json.loads(archive_line("full", s, 60.0 + s)) for s in (1, 2)]
    lines[1][field] = value
    archive = tmp_path / "a.jsonl"
    archive.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = runner.invoke(app, ["report", str(archive), "--no-majority", "--no-plot"])
    assert r.exit_code == 2 and f"'{field}'" in r.output and "a.jsonl:2" in r.output, r.output


def test_two_archive_commands_into_one_file_keep_both_studies(tmp_path):
    """archive updates a file under a lock: two studies archived at once into one file both land."""
    import threading

    from adapterbench.archive import write_archive
    for study in ("s1", "s2"):
        for i in range(6):
            run = tmp_path / study / "extract" / f"run{i}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(archive_line(f"{study}-row", i, 50.0 + i))
    out = tmp_path / "all.jsonl"
    threads = [threading.Thread(target=write_archive, args=(tmp_path / s, out)) for s in ("s1", "s2") for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out.read_text().splitlines()) == 12


def test_an_unfinished_snapshot_is_not_an_archived_run(tmp_path):
    from adapterbench.study.archived import archive_records
    archive = tmp_path / "a.jsonl"
    archive.write_text(archive_line("full", 1, 60.0) + archive_line("full", 2, 0.0, status="running").replace(
        '"main_value": 0.0', '"main_value": null'))
    assert [key[1] for key in archive_records(archive)] == ["m-s1-abc"]


def test_the_launcher_keeps_its_pickles_private_and_refuses_a_shared_folder(tmp_path):
    import stat

    from adapterbench.study.launch import private_folder
    fresh = private_folder(tmp_path / "study" / "submitit")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    shared = tmp_path / "shared" / "submitit"          # made under umask 002 by an earlier version
    shared.mkdir(parents=True)
    os.chmod(shared, 0o775)
    (shared / "job_result.pkl").write_bytes(b"x")
    os.chmod(shared / "job_result.pkl", 0o664)           # a colleague could have swapped it
    with pytest.raises(UserError, match="not yours alone"):
        private_folder(shared)
    os.chmod(shared / "job_result.pkl", 0o644)
    assert stat.S_IMODE(private_folder(shared).stat().st_mode) == 0o700


def test_slurm_time_limits_are_read_in_every_format():
    from adapterbench.study.launch import slurm_minutes, time_limit
    assert [slurm_minutes(x) for x in ("infinite", "UNLIMITED", "1-00:00:00", "2:00:00", "30:00", "45", "0:30")] == \
        [None, None, 1440, 120, 30, 45, 1]
    assert time_limit("submitit-local", None, None) == 24 * 60 and time_limit("submitit-local", None, 5) == 5


def test_status_refuses_to_guess_without_the_data(tmp_path, task_yamls, monkeypatch):
    """Without the tasks' data every finished run would look queued (a run's identity hashes its
    data): status says so in one line instead."""
    monkeypatch.delenv("ADAPTERBENCH_DATA_DIR", raising=False)
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nmodels: [m]\ntasks: ['{task_yamls['toy']}']\nseeds: [1]\nmethods: [{{name: full}}]\n"
                     f"out_dir: {tmp_path / 'runs'}\n")
    r = runner.invoke(app, ["status", str(study)])
    assert r.exit_code == 2 and "data of task toy is not found" in r.output and "--data-dir" in r.output, r.output


# --- names and links in received folders ------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "..", "", "a/b", "x" * 200, "tab\there", 3])
def test_names_from_files_never_become_paths(name):
    from adapterbench.fileio import plain_name
    with pytest.raises(UserError, match="not a plain name"):
        plain_name(name, "adapter_fusion_config.json")
    assert plain_name("rte_adapter-1.v2", "x") == "rte_adapter-1.v2"


def test_a_received_fusion_with_hostile_adapter_names_writes_nothing_outside(tmp_path):
    """An AdapterHub fusion whose adapter_names point outside (../.., absolute) is refused in one
    line before any folder is made."""
    import json
    src = tmp_path / "saved"
    (src / "fusion").mkdir(parents=True)
    (src / "fusion" / "adapter_fusion_config.json").write_text(json.dumps(
        {"adapter_names": ["../../../evil", "/tmp/abs"], "config": {}}))
    r = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "out" / "f"), "--model", "x"])
    assert r.exit_code == 2 and "not a plain name" in r.output, r.output
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "f").exists()


def test_evaluate_never_writes_through_a_link_in_a_received_run(two_adapters, tmp_path):
    import shutil
    runs, data, _ = two_adapters
    run = tmp_path / "received"
    shutil.copytree(runs[0], run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "predictions").symlink_to(elsewhere)
    r = runner.invoke(app, ["evaluate", str(run), "--split", "test", "--data-dir", str(data)])
    assert r.exit_code == 2 and "is a link" in r.output, r.output
    assert not any(elsewhere.iterdir())


@pytest.mark.parametrize("command", ["fuse", "merge", "export-adapterhub", "export-peft"])
def test_a_failed_run_is_never_built_on(command, two_adapters, tiny_bert_dir, tmp_path):
    """A failed (or unfinished) run's adapter is not a result: every command that takes a source
    or exports one refuses it in one line."""
    import json
    import shutil
    runs, data, yamls = two_adapters
    failed = tmp_path / "failed"
    shutil.copytree(runs[1], failed)
    (failed / "metrics.json").write_text(json.dumps({**json.loads((failed / "metrics.json").read_text()),
                                                     "status": "failed"}))
    args = {"fuse": ["fuse", "--target", str(yamls["toy"]), "--adapters", runs[0], "--adapters", str(failed),
                     "--model", str(tiny_bert_dir), "--data-dir", str(data), "--out", str(tmp_path / "o")],
            "merge": ["merge", "--adapters", runs[0], "--adapters", str(failed), "--out", str(tmp_path / "o")],
            "export-adapterhub": ["export", str(failed), "--out", str(tmp_path / "o")],
            "export-peft": ["export", str(failed), "--format", "peft", "--out", str(tmp_path / "o")]}[command]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "status is 'failed'" in r.output, r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))


def test_data_edited_with_its_size_and_mtime_kept_is_a_new_run(tmp_path):
    from adapterbench.data import file_fingerprint
    f = tmp_path / "train.tsv"
    f.write_text("sentence\tlabel\ngood\t1\n")
    first = file_fingerprint(f)
    st = f.stat()
    f.write_text("sentence\tlabel\nbad!\t0\n")                 # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))           # the old modification time back
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert file_fingerprint(f) != first


@pytest.mark.parametrize("row,words", [
    ('{"sentence": null, "score": 1.0}', "not text"),
    ('{"sentence": ["a"], "score": 1.0}', "not text"),
    ('{"sentence": "a", "score": true}', "not a number"),
    ('{"sentence": "a", "score": "4_5"}', "not a number"),
    ('{"sentence": "a", "score": "nan"}', "not finite"),
])
def test_received_rows_are_read_as_written(row, words, tmp_path):
    """A JSONL null is not the text 'None', JSON true not the score 1.0, '4_5' not 45."""
    folder = tmp_path / "D"
    folder.mkdir()
    good = '{"sentence": "fine", "score": 2.5}\n'
    (folder / "train.jsonl").write_text(good * 3 + row + "\n")
    (folder / "dev.jsonl").write_text(good)
    (tmp_path / "t.yaml").write_text("name: t\ntext_columns: [sentence]\nlabel_column: score\nregression: true\n"
                                     "metrics: [pearson]\nmain_metric: pearson\nsources:\n  local:\n    dir: D\n"
                                     "    format: jsonl\n    files: {train: train.jsonl, dev: dev.jsonl}\n")
    r = runner.invoke(app, ["validate", str(tmp_path / "t.yaml"), "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and words in r.output and "line 4" in r.output, r.output


def test_the_majority_row_of_a_user_task_is_its_own(tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A user's task named like a shipped one ('rte') gets the majority-class row of its own data,
    not the shipped RTE's."""
    from adapterbench.results.report import build_report, majority_baseline
    mine = tmp_path / "mine" / "rte.yaml"
    mine.parent.mkdir()
    mine.write_text(task_yamls["toy"].read_text().replace("name: toy", "name: rte"))
    r = runner.invoke(app, ["extract", "--task", str(mine), "--model", str(tiny_bert_dir), "--data-dir",
                            str(data_dir), "--out", str(tmp_path / "runs"), "train.max_steps=1"])
    assert r.exit_code == 0, r.output
    rep = build_report(tmp_path / "runs")
    own, _ = majority_baseline(str(mine), None, str(data_dir))
    assert own is not None and rep.majority["rte"] == own
    shipped, _ = majority_baseline("rte", None)
    if shipped is not None:                                     # the real RTE is at hand here
        assert shipped != own


def test_two_commands_on_one_run_folder_do_not_interleave(two_adapters, tiny_bert_dir, tmp_path):
    """While a command trains a run folder, another training of it, or an evaluate, stops in one
    line; evaluations share the folder with each other."""
    from adapterbench.recipe.runfolder import in_use
    runs, data, yamls = two_adapters
    run = Path(runs[0])
    with in_use(run):                                   # another command is training it
        r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data)])
        assert r.exit_code == 2 and "in use by another adapterbench command" in r.output, r.output
        r = runner.invoke(app, ["extract", "--task", str(yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
                                str(data), "--out", str(run.parents[3]), "--seed", "0", "train.max_steps=1", "--force"])
        assert r.exit_code == 2 and "in use by another adapterbench command" in r.output, r.output
    with in_use(run, shared=True):                      # another evaluate: both read
        r = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(data)])
        assert r.exit_code == 0, r.output


def test_checkpoints_carry_the_cuda_generators(monkeypatch):
    """On a GPU, dropout draws from CUDA's generators: a checkpoint saves each device's and a
    resume on the same devices puts them back (a CPU checkpoint has none and changes nothing).
    Checked here with the CUDA calls standing in; where a GPU is lent, resume tests run on it."""
    import torch

    from adapterbench.recipe.checkpoint import cuda_rng, restore_cuda_rng
    assert (cuda_rng() == {}) == (not torch.cuda.is_available())
    put = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1], dtype=torch.uint8)] * 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put.append)
    saved = cuda_rng()["cuda_rng"]
    restore_cuda_rng(saved)
    restore_cuda_rng(saved[:1])                     # another device count: left as seeded
    restore_cuda_rng(None)                          # a CPU checkpoint
    assert put == [saved]


def test_a_foreign_bin_is_mapped_checked_and_never_trusted(tmp_path):
    """A foreign .bin is read as tensors only, memory-mapped, and its declared sizes are checked
    against the file before anything is allocated; other shapes of file are one line."""
    import torch

    from adapterbench.interop.adapterhub import load_foreign_bin
    torch.save({"w": torch.arange(12.0).reshape(3, 4)}, tmp_path / "ok.bin")
    assert torch.equal(load_foreign_bin(tmp_path / "ok.bin", "a.safetensors")["w"], torch.arange(12.0).reshape(3, 4))
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save([torch.ones(3)], tmp_path / "list.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04junk")
    for name, words in (("legacy.bin", "cannot be read safely"), ("list.bin", "not a state dict"),
                        ("junk.bin", "cannot be read safely")):
        with pytest.raises(UserError, match=words):
            load_foreign_bin(tmp_path / name, "a.safetensors")


USER_FILES = ["adapter/notes.txt", "adapter/old/adapter.safetensors", "tracking/my_plot.png", "tracking/mine/x",
              "wandb/settings", "multitask/adapters/rte/readme.md", "predictions/rte.tsv.bak", "tasks/notes.yaml",
              ".my_notes", "fusion/sources.json.orig"]


@pytest.mark.parametrize("user_file", USER_FILES)
def test_a_users_file_at_any_depth_stops_the_clearing(tmp_path, user_file):
    """Not only at the top: a file a user put inside adapter/, tracking/, wandb/ ... of an
    unfinished run is named in one line, and nothing is deleted; what the tool and its trackers
    write at those depths goes."""
    run = tmp_path / "run"
    ours = ["metrics.json", "adapter/adapter.safetensors", "adapter/head_config.json", "tasks/0.yaml",
            "tracking/events.out.tfevents.17.vm.1.0", "tracking/1733.12/hparams.yml", "predictions/rte.tsv",
            "wandb/debug.log", "wandb/offline-run-2026_1-ab/files/output.log", "fusion/sources.json",
            "multitask/adapters/rte/adapter.safetensors", "multitask/base_model/vocab.txt", "attention.png"]
    for name in [*ours, user_file]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-2026_1-ab")
    with pytest.raises(UserError, match=user_file.split("/")[0]) as e:
        clear_run_folder(run)
    assert "\n" not in str(e.value) and user_file.rsplit("/", 1)[0] in str(e.value)
    assert all((run / name).is_file() for name in [*ours, user_file])      # nothing was deleted
    (run / user_file).unlink()
    for parent in Path(user_file).parents:                   # a folder the user made for it
        if str(parent) != "." and not written_by_us(parent.as_posix()):
            (run / parent).rmdir()
    clear_run_folder(run)
    assert not run.exists()


def test_rerunning_over_a_failed_run_keeps_a_users_file_inside_its_folders(tiny_bert_dir, task_yamls, data_dir,
                                                                          tmp_path, monkeypatch):
    """Through the CLI: a run that failed (no checkpoint) is trained again from scratch, which
    clears its folder; a user's file inside its tracking/ folder stops that in one line."""
    from adapterbench.recipe import train as T
    args = ["extract", "--task", str(task_yamls["toy"]), "--model", str(tiny_bert_dir), "--data-dir",
            str(data_dir), "--out", str(tmp_path / "runs"), "train.epochs=1", "train.log_with=[tensorboard]"]

    def broken(*a):
        raise RuntimeError("boom")
    monkeypatch.setattr(T, "train_step", broken)
    assert runner.invoke(app, args).exit_code != 0
    run = next((tmp_path / "runs").glob("extract/*/toy/*"))
    assert (run / "tracking").is_dir()
    (run / "tracking" / "my_analysis.ipynb").write_text("{}")
    monkeypatch.undo()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "tracking/my_analysis.ipynb" in r.output and "Traceback" not in r.output
    assert (run / "tracking" / "my_analysis.ipynb").read_text() == "{}" and (run / "metrics.json").is_file()
    (run / "tracking" / "my_analysis.ipynb").unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("edited", ["config.yaml", "task.yaml"])
def test_a_finished_runs_description_edited_afterwards_is_one_line_everywhere_it_is_read(
        edited, tiny_bert_dir, task_yamls, data_dir, tmp_path):
    """A finished run seals config.yaml and its task files (sha256 in metrics.json). Edited after
    it finished, the folder no longer says what trained its weights: every command that reads it
    (report, archive, evaluate, export, fuse, merge) stops in one line naming the file, and
    nothing is written; put back, it reads again."""
    def extract(task, out):
        r = runner.invoke(app, ["extract", "--task", str(task_yamls[task]), "--model", str(tiny_bert_dir),
                                "--data-dir", str(data_dir), "--out", str(out), "train.epochs=1"])
        assert r.exit_code == 0, r.output
        return next(out.glob(f"extract/*/{task}/*"))
    run, other = extract("toy", tmp_path / "runs"), extract("toyreg", tmp_path / "src")
    sealed = json.loads((run / "metrics.json").read_text())["sealed"]
    assert set(sealed) == {"config.yaml", "task.yaml"}
    original = (run / edited).read_text()
    (run / edited).write_text(original.replace("seed: 42", "seed: 7").replace("name: toy", "name: toy2"))
    assert (run / edited).read_text() != original
    reads = {"report": ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")],
             "archive": ["archive", str(tmp_path / "runs"), "--out", str(tmp_path / "a.jsonl")],
             "evaluate": ["evaluate", str(run), "--data-dir", str(data_dir)],
             "export": ["export", str(run), "--out", str(tmp_path / "exp")],
             "fuse": ["fuse", "--target", str(task_yamls["toy"]), "--adapters", str(run), "--adapters", str(other),
                      "--model", str(tiny_bert_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "f"),
                      "train.epochs=1"],
             "merge": ["merge", "--adapters", str(run), "--adapters", str(other), "--out", str(tmp_path / "m")]}
    for name, args in reads.items():
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (name, r.output)
        assert f"{edited} was changed after the run finished" in r.output, (name, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, (name, r.output)
    assert not any((tmp_path / n).exists() for n in ("r.md", "a.jsonl", "exp", "f", "m"))
    (run / edited).write_text(original)
    for name in ("report", "evaluate", "export"):
        r = runner.invoke(app, reads[name])
        assert r.exit_code == 0, (name, r.output)
