"""Commands that look without training: ls, validate, check-method."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from adapterbench.cli.common import DataOpt, DebugOpt, Overrides, command, console, err
from adapterbench.errors import UserError
from adapterbench.fileio import read_json


@command("check-method")
def check_method_cmd(method: str = typer.Argument(..., help="A method module: a .py file, an importable module, "
                                                             "or a registered method's name."),
                     debug: bool = DebugOpt):
    """Run the method contract's checks on a tiny model: one line per failed check (exit 2), or all passed."""
    from adapterbench.methods import METHODS, get_method, register_plugin
    from adapterbench.methods.checks import CHECKS, run_checks
    from adapterbench.methods.plugins import looks_like_plugin
    shipped = method in METHODS and not looks_like_plugin(method)
    name = method if shipped else register_plugin(method)
    failed = run_checks(get_method(name), name, shipped=shipped)
    for line in failed:
        err.print(f"{name}: {line}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)
    console.print(f"{name}: all {len(CHECKS) + 1} checks passed (members, "
                  f"{', '.join(label for label, _ in CHECKS)})", highlight=False)


@command("ls")
def ls(what: str = typer.Argument(..., help="tasks | methods | runs"),
       out: str = typer.Option("runs", "--out", help="Root of run folders (for `ls runs`)."),
       debug: bool = DebugOpt):
    """List tasks, methods or runs."""
    if what == "tasks":
        from adapterbench.tasks import parse_task, task_files
        t = Table("task", "track", "labels", "metrics", "main", "sources")
        for name, path in task_files().items():
            s = parse_task(path)
            src = "+".join(k for k in ("local", "hub") if getattr(s.sources, k) is not None)
            t.add_row(name, s.track, "regression" if s.regression else str(len(s.labels)),
                      ",".join(s.metrics), s.main_metric, src)
        console.print(t)
    elif what == "methods":
        from adapterbench.methods import METHODS
        t = Table("method", "kind", "command", "default lr", "supports", "what it is")
        for name, mod in METHODS.items():
            doc = " ".join((mod.__doc__ or "").split()).split(": ")[0]
            t.add_row(name, mod.KIND, mod.STAGE, str(mod.TRAIN_DEFAULTS.get("lr")), ", ".join(sorted(mod.SUPPORTS)), doc)
        console.print(t)
    elif what == "runs":
        from adapterbench.records import iter_runs
        t = Table("run", "status", "main metric", "value")
        for folder in iter_runs(Path(out)):
            m = read_json(folder / "metrics.json")
            t.add_row(str(folder), m.get("status", "?"), m.get("main_metric", ""),
                      "" if m.get("main_value") is None else f"{m['main_value']:.2f}")
        console.print(t)
    else:
        raise UserError(f"cannot list '{what}': use tasks, methods or runs")


@command()
def validate(config: Path = typer.Argument(..., help="A run config, task YAML, study or claims file."),
             stage: Optional[str] = typer.Option(None, "--stage",
                                                 help="Run configs: extract, finetune, fuse or multitask "
                                                      "(default: the method's own)."),
             data_dir: Optional[str] = DataOpt,
             overrides: Optional[list[str]] = Overrides, debug: bool = DebugOpt):
    """Check any file adapterbench reads, without training: a task (and the data it points at),
    a run config (fully resolved), a study (its whole plan) or a claims file."""
    from adapterbench.cli.validation import validate_file
    for line in validate_file(config, stage, data_dir, overrides or []):
        console.print(line, highlight=False, soft_wrap=True)


