"""Safe by design (issue 42): every YAML a command reads goes through one strict reader
(duplicate keys, alias bombs, deep nesting, non-UTF-8: one line, exit 2), and deletes and
overwrites touch only what adapterbench wrote, never through a link."""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.errors import UserError
from adapterbench.fileio import remove_checkpoints, staged
from adapterbench.recipe.runfolder import clear_run_folder

runner = CliRunner()

BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, a in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))
HOSTILE = {   # what a received or hand-edited YAML can hold, and the words its one line must say
    "duplicate key": (b"name: s\ntasks: [rte]\nmethods: [{name: full}]\nmethods: []\n", "given twice"),
    "alias bomb": (BOMB.encode(), "aliases expand"),
    "deep nesting": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
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
