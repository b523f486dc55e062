"""A full disk and a read-only disk, for real (issue 42): a small tmpfs mounted for the test,
filled up or remounted read-only. Every command that writes stops with one `error:` line and exit
code 2 naming the path, and leaves nothing that looks finished: no run with status ok, no output
folder moved into place. Needs root (mount); CI sets ADAPTERBENCH_REQUIRE_MOUNT=1 so these run
there instead of skipping."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app

from .test_cli_fuzz import CAPS, run_of, workspace  # noqa: F401  (the shared workspace fixture)

runner = CliRunner()
pytestmark = pytest.mark.slow     # 24 commands that load a model (about 35 s)


def mount(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        if os.environ.get("ADAPTERBENCH_REQUIRE_MOUNT") == "1":
            pytest.fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@pytest.fixture(params=["full", "read-only"])
def disk(request, tmp_path, workspace):   # noqa: F811
    """A tmpfs holding a copy of one finished run (for the commands that write into a run
    folder), then filled to the last byte or remounted read-only."""
    point = tmp_path / "disk"
    mount(point, "2m")
    try:
        shutil.copytree(workspace / run_of(workspace, "toy"), point / "run")
        if request.param == "full":
            try:
                with open(point / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:
                pass
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def commands(ws: Path, d: Path) -> dict[str, list[str]]:
    toy, toyreg = str(ws / run_of(ws, "toy")), str(ws / run_of(ws, "toyreg"))
    train = ["--model", str(ws / "tiny"), "--data-dir", str(ws / "data")]
    return {
        "extract": ["extract", "--task", str(ws / "toy.yaml"), *train, "--out", str(d / "runs"), *CAPS],
        "multitask": ["multitask", "--tasks", f"{ws / 'toy.yaml'},{ws / 'toyreg.yaml'}", *train,
                      "--out", str(d / "runs"), *CAPS],
        "fuse": ["fuse", "--target", str(ws / "toy.yaml"), "--adapters", toy, "--adapters", toyreg, *train,
                 "--out", str(d / "runs"), *CAPS],
        "evaluate": ["evaluate", str(d / "run"), "--data-dir", str(ws / "data")],
        "evaluate --split test": ["evaluate", str(d / "run"), "--split", "test", "--data-dir", str(ws / "data")],
        "export": ["export", toy, "--out", str(d / "exported")],
        "import": ["import", str(ws / "hub"), "--out", str(d / "imported"), "--model", str(ws / "tiny")],
        "merge": ["merge", "--adapters", toy, "--adapters", toyreg, "--out", str(d / "merged")],
        "report": ["report", str(ws / "runs"), "--out", str(d / "report.md")],
        "archive": ["archive", str(ws / "runs"), "--out", str(d / "runs.jsonl")],
        "tune": ["tune", "--task", str(ws / "toy.yaml"), *train, "--trials", "1", "--out", str(d / "tune"),
                 "--space", "train.lr=loguniform(1e-4,1e-2)", *CAPS],
        "bench": ["bench", "--model", str(ws / "tiny"), "--configs", "pfeiffer", "--steps", "1", "--warmup", "0",
                  "--batch-size", "4", "--seq-len", "16", "--modes", "train", "--out", str(d / "bench")],
    }


NAMES = ["archive", "bench", "evaluate", "evaluate --split test", "export", "extract", "fuse", "import", "merge",
         "multitask", "report", "tune"]


def finished(folder: Path) -> list[str]:
    return [str(m) for m in folder.rglob("metrics.json") if '"status": "ok"' in m.read_text()]


@pytest.mark.parametrize("name", NAMES)
def test_a_command_on_a_full_or_read_only_disk_is_one_line(name, disk, workspace, monkeypatch):   # noqa: F811
    monkeypatch.chdir(workspace)                 # its runs name their model as they were given it: tiny
    assert sorted(commands(workspace, disk)) == NAMES
    before = sorted(p.name for p in disk.iterdir())
    r = runner.invoke(app, commands(workspace, disk)[name])
    import traceback
    assert r.exit_code == 2, (name, r.output[-2000:], "".join(traceback.format_exception(r.exception))[-3000:])
    errors = [s for s in r.output.splitlines() if s.startswith("error:")]
    assert len(errors) == 1 and r.output.rstrip().splitlines()[-1] == errors[0].rstrip(), r.output[-2000:]
    assert str(disk) in errors[0] or "disk" in errors[0], errors[0]             # it names where
    assert "Traceback" not in r.output
    assert finished(disk) == [str(disk / "run" / "metrics.json")]               # only the run copied in
    new = sorted(set(p.name for p in disk.iterdir()) - set(before))
    moved = [n for n in new if n not in ("runs", "tune") and any(p.is_file() for p in (disk / n).rglob("*"))]
    assert moved == [], moved                                                 # no output moved into place
