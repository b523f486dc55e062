"""The `adapterbench` command line: one file per command group, each command "options → one
call into its wing → one printer". `common` holds the app, the consoles and the shared options."""

from adapterbench.cli import train, study, results, interop, tools  # noqa: F401,I001  (registers the commands, in help order)
from adapterbench.cli.common import app, keep_alive_on_checkpoint_signal, main

__all__ = ["app", "main", "keep_alive_on_checkpoint_signal"]
