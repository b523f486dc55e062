"""`report`: tables, plots, claims documents and comparisons against an archive."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adapterbench.cli.common import DebugOpt, command, console, named_output
from adapterbench.config import split_labels
from adapterbench.errors import UserError
from adapterbench.fileio import atomic_write
from adapterbench.results.plots import metric_bars
from adapterbench.results.render import (
    SETTINGS_LEGEND,
    markdown_table,
    render,
    settings_rows,
)
from adapterbench.results.report import build_report


@command()
def report(runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding run folders (searched recursively)."),
           fmt: str = typer.Option("md", "--format", help="md, csv or latex."),
           out_file: Optional[Path] = typer.Option(None, "--out", callback=named_output, help="Write the table here (and the plot beside it)."),
           reference: Optional[str] = typer.Option(None, "--reference",
                                                   help="Paper numbers beside ours: adapterfusion-bert-base, houlsby-glue."),
           plot: bool = typer.Option(True, "--plot/--no-plot", help="Bar plot PNG with error bars."),
           majority: bool = typer.Option(True, "--majority/--no-majority",
                                         help="A majority-class baseline row (needs the tasks' data)."),
           versus: str = typer.Option("full", "--versus",
                                      help="Row label the † paired t-test and a Δ column compare against."),
           rows: Optional[str] = typer.Option(None, "--rows", help="Only these rows: labels or patterns, "
                                                                    "comma-separated ('full,pfeiffer,merge-*')."),
           metric: Optional[str] = typer.Option(None, "--metric", help="Score tasks by this metric where they report "
                                                                       "it (e.g. accuracy, as AdapterFusion does); "
                                                                       "default: each task's main metric."),
           seeds: Optional[str] = typer.Option(None, "--seeds", help="Only runs of these seeds, comma-separated "
                                                                      "(e.g. a study's reported seeds: 2,3,4)."),
           settings: bool = typer.Option(False, "--settings", help="Also a table of each row's budget and "
                                                                    "settings (lr, epochs, warm-up, batch, data, "
                                                                    "precision, pooling); Markdown only."),
           claims: Optional[Path] = typer.Option(None, "--claims", help="A claims file (configs/claims/): write one "
                                                                        "document with its tables, plots and a "
                                                                        "verdict per paper claim to --out."),
           against: Optional[Path] = typer.Option(None, "--against", help="A results archive (.jsonl, e.g. "
                                                  "docs/results/fair.jsonl): your runs beside its rows of the same "
                                                  "model, tasks, seeds and protocol, compared with paired statistics."),
           debug: bool = DebugOpt):
    """Tables (md/csv/latex) and plots over finished runs: mean ± std over seeds, deltas, significance."""
    never_over_an_input(out_file, [runs_dir, against, claims])
    if against:
        from adapterbench.results.against import compare, comparison_table
        rep, results = compare(runs_dir, against, metric)
        show_or_write(render(rep, "md") + "\n" + comparison_table(results), out_file, "table")
    elif claims:
        from adapterbench.results.document import write_claims_report
        if out_file is None or out_file.suffix != ".md":
            raise UserError("--claims writes a Markdown document: give --out FILE.md (e.g. docs/results.md)")
        for cid, word in write_claims_report(runs_dir, claims, out_file, plot):
            console.print(f"{cid}: {word}")
        console.print(f"report: {out_file}")
    else:
        only = split_labels(rows) if rows else None
        only_seeds = seed_list(seeds) if seeds else None
        rep = build_report(runs_dir, reference, versus, only, metric, majority=majority, seeds=only_seeds)
        text = render(rep, fmt)
        if settings:
            text += "\n" + settings_table(runs_dir, only, only_seeds, fmt)
        show_or_write(text, out_file, "table")
        if plot:
            png = (out_file.with_suffix(".png") if out_file else
                   runs_dir.with_suffix(".png") if runs_dir.is_file() else runs_dir / "report.png")
            metric_bars(rep, png)
            console.print(f"plot: {png}")
        if runs_dir.is_dir():
            console.print(f"run folders: {runs_dir} (one per run: config.yaml, metrics.json, log.jsonl, weights)")


def never_over_an_input(out_file: Path | None, inputs: list[Path | None]) -> None:
    """--out (or the plot beside it) must not be a file the command reads: `report runs.jsonl
    --out runs.jsonl` would replace the archive with its table."""
    if out_file is None:
        return
    if out_file.suffix.lower() == ".png":
        raise UserError(f"--out {out_file} names the table, and the plot goes beside it as .png: give the "
                        f"table's name, e.g. {out_file.with_suffix('.md').name}")
    for path in filter(None, inputs):
        for written in (out_file, out_file.with_suffix(".png")):
            if written.resolve() == Path(path).resolve():
                raise UserError(f"--out {out_file} would write over {path}, which this command reads: "
                                f"choose another --out, e.g. {Path(path).with_suffix('.md').name}")


def show_or_write(text: str, out_file: Path | None, what: str) -> None:
    """`text` to --out (atomically) or to stdout."""
    if out_file:
        atomic_write(out_file, text)
        console.print(f"{what}: {out_file}")
    else:
        print(text)


def settings_table(runs_dir: Path, only, only_seeds, fmt: str) -> str:
    """--settings: each row's budget and settings as a Markdown table and its legend."""
    if fmt != "md":
        raise UserError(f"--settings adds a Markdown table: use it with --format md, not {fmt}")
    return markdown_table(*settings_rows(runs_dir, only, only_seeds)) + "\n" + SETTINGS_LEGEND + "\n"


def seed_list(value: str) -> list[int]:
    """'2,3,4' -> [2, 3, 4]; anything else is one line naming the value."""
    try:
        return [int(x) for x in split_labels(value) if x]
    except ValueError:
        raise UserError(f"--seeds '{value}' must be seeds separated by commas, e.g. --seeds 2,3,4") from None
