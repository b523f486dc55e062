"""The Typer app every command registers on, its consoles, shared options and the one way a
command fails: `command` turns bad input (UserError) into one red line and exit code 2."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from adapterbench.errors import UserError


class OneLineUsageErrors(TyperGroup):
    """The command group: a command line click refuses (an unknown option, a value of the wrong
    type or outside its declared range, a missing argument) is one line and exit code 2, like
    every other bad input, instead of click's usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:   # typer's own click: UsageError, BadParameter, NoSuchOption ...
            where = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            fail(e.format_message() + where)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# markdown: help paragraphs are rewrapped to the terminal (rich mode keeps the docstrings' line breaks)
app = typer.Typer(add_completion=False, rich_markup_mode="markdown", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=OneLineUsageErrors,
                  help="Train, fuse and compare bottleneck adapters and their baselines.")
PIPE_WIDTH = 200      # columns for output that goes to no terminal


def _width() -> int | None:
    """The console's width: None (rich measures the terminal, or reads $COLUMNS) where there is
    one; else PIPE_WIDTH. Rich's fallback of 80 columns cut row names short ('houls…') in the
    tables that users send to a file, a pipe or a job's log."""
    if "COLUMNS" in os.environ:
        return None
    for fd in (0, 1, 2):
        try:
            os.get_terminal_size(fd)
            return None
        except (OSError, ValueError):
            continue
    return PIPE_WIDTH


WIDTH = _width()
# markup off: paths, labels, task names and error texts print as they are ("[none]" stays); the
# few styled words pass markup=True with every value in them escaped
console = Console(width=WIDTH, markup=False)
err = Console(stderr=True, width=WIDTH, markup=False)

# Every number a command line takes declares its range (click refuses anything outside it in one
# line): large enough for any real use, small enough that a typo never runs for days or allocates
# terabytes. Config keys have theirs in config.check_ranges.
MAX_SEED = 2**32 - 1          # what numpy and torch seed with
MAX_BATCH = 65_536
MAX_SEQ_LEN = 65_536
MAX_STEPS = 1_000_000
MAX_THREADS = 4_096
MAX_WORKERS = 100_000         # a SLURM array's size
MAX_MINUTES = 525_600         # a year
MAX_TRIALS = 100_000


def named_output(value: Path | None) -> Path | None:
    """Callback of the options that name a file or folder to write: it needs a name of its own
    ('', '.' and '..' name the current folder or its parent, never something to create)."""
    if value is not None and Path(value).name in ("", ".", ".."):
        raise typer.BadParameter(f"{str(value)!r} names no file or folder to write: give a path with a name, "
                                 f"e.g. results/table.md or exports/rte")
    return value


def existing_folder(value: str | None) -> str | None:
    """Callback of --data-dir: a folder that exists, checked before anything starts."""
    try:
        missing = value is not None and (not value.strip() or not Path(value).expanduser().is_dir())
    except OSError:       # a name too long for the file system
        missing = True
    if missing:
        raise typer.BadParameter(f"{value!r} is not a folder: give the glue_data-style folder that holds the "
                                 f"tasks' data (e.g. ../shared/data/glue)")
    return value


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (see configs/).")
TaskOpt = typer.Option(None, "--task", "-t", help="Task name (adapterbench ls tasks) or task YAML.")
ModelOpt = typer.Option(None, "--model", "-m", help="Hub id, local folder, or alias (minilm-l6, mpnet-base).")
MethodOpt = typer.Option(None, "--method", help="Method name (adapterbench ls methods).")
SeedOpt = typer.Option(None, "--seed", min=0, max=MAX_SEED, help="Random seed.")
OutOpt = typer.Option(None, "--out", help="Root folder of run folders (default runs/).")
DataOpt = typer.Option(None, "--data-dir", callback=existing_folder, help="glue_data-style folder (else $ADAPTERBENCH_DATA_DIR).")
ForceOpt = typer.Option(False, "--force", help="Retrain even if a finished run with this config exists.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
Overrides = typer.Argument(None, help="key=value overrides, e.g. train.lr=3e-4 train.epochs=3")


def one_line(text: str) -> str:
    """`text` as one printable line: a newline or other control character a user's value brought
    into a message shows as its escape (\\n), so an error is always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str) -> typer.Exit:
    """Print one red error line; the exit (code 2) to raise."""
    err.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(2)


@app.callback()
def main_options(tasks_dir: Optional[list[Path]] = typer.Option(
        None, "--tasks-dir", help="A folder of your own task YAMLs, searched after the shipped tasks "
                                  "(repeatable; also $ADAPTERBENCH_TASKS, os.pathsep-separated)."),
        plugin: Optional[list[str]] = typer.Option(
            None, "--plugin", help="A method of your own: a .py file (named by its stem) or an importable module "
                                   "(repeatable; a study's workers load it too). See docs/methods.md.")):
    """Train, fuse and compare bottleneck adapters and their baselines."""
    if plugin:   # methods import torch: only when a plug-in is named (--help stays quick)
        from adapterbench.methods import register_plugin
    try:
        for spec in plugin or []:
            register_plugin(spec)
    except UserError as e:
        raise fail(str(e)) from None
    if tasks_dir:
        old = os.environ.get("ADAPTERBENCH_TASKS", "")
        os.environ["ADAPTERBENCH_TASKS"] = os.pathsep.join([*(str(p.resolve()) for p in tasks_dir), *filter(None, [old])])


def guarded(debug: bool, fn, /, *args, **kwargs):
    """Run `fn`; bad input, and a path the file system refuses, become one red line and exit
    code 2 (a traceback with --debug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if debug:
            raise
        raise fail(str(e)) from None
    except OSError as e:   # a path the file system refuses (a folder where a file belongs, a full or read-only disk)
        from adapterbench.fileio import refusal
        if debug or (line := refusal(e)) is None:
            raise
        raise fail(line) from None
    except KeyboardInterrupt as e:
        err.print(f"[yellow]interrupted[/yellow]{': ' + escape(str(e)) if str(e) else ''}", highlight=False,
                  markup=True)
        raise typer.Exit(130) from None


def command(name: str | None = None):
    """Register a function as a command, run through `guarded` (its `debug` option decides
    whether bad input is one line or a traceback). Typer reads the function's own signature."""
    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            return guarded(kwargs.get("debug", False), fn, *args, **kwargs)
        app.command(name)(run)
        return fn
    return register


def main():  # pragma: no cover
    """The console script's and `python -m adapterbench`'s entry point."""
    ok = False
    keep_alive_on_checkpoint_signal()
    try:
        app()
        ok = True
    except SystemExit as e:
        ok = e.code in (0, None)
        raise
    finally:
        close_process_group(wait=ok)


def keep_alive_on_checkpoint_signal() -> None:
    """SIGUSR1 asks a training loop for a checkpoint (recipe.checkpoint.CheckpointRequests);
    outside training (loading data, between a study's runs) it does nothing instead of ending
    the process, as it would by default."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _no_checkpoint_to_write)


def _no_checkpoint_to_write(signum, frame) -> None:
    pass


def close_process_group(wait: bool) -> None:
    """End a multi-process run cleanly: ranks leave together (a barrier, only after success,
    so a failed rank cannot hang the others) and the process group is destroyed before the
    interpreter exits; gloo otherwise may abort a rank at exit."""
    if "torch.distributed" not in sys.modules:   # nothing distributed was started (e.g. --help)
        return
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
