"""Commands that train or rebuild one run: extract, finetune, fuse, multitask, merge, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from adapterbench.cli.common import (
    MAX_STEPS,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    ForceOpt,
    MethodOpt,
    ModelOpt,
    OutOpt,
    Overrides,
    SeedOpt,
    TaskOpt,
    app,
    command,
    console,
    guarded,
    named_output,
)
from adapterbench.config import merge_layers
from adapterbench.errors import UserError
from adapterbench.fileio import is_main_process, read_json
from adapterbench.records import task_results


def options(task, model, method, seed, out, data_dir) -> dict:
    """The command-line options every training command shares, as config keys."""
    return {"task": task, "model.name": model, "method.name": method, "seed": seed,
            "out_dir": out, "data.data_dir": data_dir}


def command_line_plugins(method: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A user's method module named on the command line (--method ./x.py, method=... or
    method.name=... overrides) is loaded and replaced by its registered name."""
    from adapterbench.methods import register_plugin
    from adapterbench.methods.plugins import looks_like_plugin
    if method and looks_like_plugin(method):
        method = register_plugin(method)
    out = []
    for text in overrides or []:
        key, eq, value = text.partition("=")
        if eq and key in ("method", "method.name") and looks_like_plugin(value):
            text = f"{key}={register_plugin(value)}"
        out.append(text)
    return method, out


def train_and_show(stage: str, user: dict, force: bool, **stage_options) -> Path:
    """Resolve the user's config for `stage`, train it (or find it done) and print its metrics."""
    from adapterbench.recipe.runfolder import RunExists
    from adapterbench.recipe.stages import resolve, train_stage
    cfg = resolve(user, stage)
    try:
        folder = train_stage(stage, cfg, force=force, console=console, **stage_options)
    except RunExists as e:
        console.print(f"already done: {e.folder} (status ok; --force retrains)")
        folder = e.folder
    print_metrics(folder)
    return folder


def print_metrics(folder: Path) -> None:
    """A finished run's dev metrics per task, its budget and its folder (rank 0 only)."""
    if not is_main_process():   # the other ranks of a multi-process run stay quiet
        return
    m = read_json(Path(folder) / "metrics.json")
    table = Table("task", "main metric", "value", "all dev metrics",
                  title=f"{m['task']} / {m['method']} / {m['model']} (seed {m['seed']})")
    for name, r in task_results(m).items():
        table.add_row(name, r["main_metric"], f"{r['main_value']:.2f}",
                      ", ".join(f"{k} {v:.2f}" for k, v in r["dev"].items()))
    console.print(table)
    if len(task_results(m)) > 1:
        console.print(f"mean {m['main_value']:.2f}; examples used {100 * m['fraction_of_examples_used']:.1f}% "
                      f"(per task: {', '.join(f'{t} {100 * f:.1f}%' for t, f in m['fraction_used_per_task'].items())})")
    console.print(f"best epoch {m['best_epoch'] + 1}/{m['epochs_run']}  trainable {m['trainable_params']:,} "
                  f"({m['trainable_percent']:.2f}% of {m['total_params']:,})  train {m['train_seconds']:.1f}s  "
                  f"{m['samples_per_second']:.1f} samples/s")
    console.print(f"run folder: {folder}")


def _single_task(stage, config, task, model, method, seed, out, data_dir, overrides, force, init_from):
    method, overrides = command_line_plugins(method, overrides)
    opts = options(task, model, method, seed, out, data_dir)
    opts["init_from"] = str(Path(init_from).resolve()) if init_from else None
    train_and_show(stage, merge_layers(config, opts, overrides), force)


def _single_task_command(stage: str, help_text: str) -> None:
    """Register `extract` / `finetune`: the same options, another stage."""
    def run(config: Optional[Path] = ConfigOpt, task: Optional[str] = TaskOpt, model: Optional[str] = ModelOpt,
            method: Optional[str] = MethodOpt, seed: Optional[int] = SeedOpt, out: Optional[str] = OutOpt,
            data_dir: Optional[str] = DataOpt, overrides: Optional[list[str]] = Overrides,
            init_from: Optional[Path] = typer.Option(None, "--init-from",
                                                     help="Start the adapter from this adapter folder (e.g. merged)."),
            force: bool = ForceOpt, debug: bool = DebugOpt):
        guarded(debug, _single_task, stage, config, task, model, method, seed, out, data_dir, overrides, force,
                init_from)
    run.__doc__ = help_text
    app.command(stage)(run)


_single_task_command("extract", "Train one adapter on one task (AdapterFusion stage 1; default method pfeiffer).")
_single_task_command("finetune", "Fully fine-tune the encoder on one task (the \"Full\" baseline; default method full).")


@command()
def fuse(target: Optional[str] = typer.Option(None, "--target", help="Target task (trains the fusion)."),
         adapters: Optional[list[str]] = typer.Option(None, "--adapters", "-a",
                                                       help="Source adapters: extract run folders or adapter folders."),
         variant: Optional[str] = typer.Option(None, "--variant", help="dynamic (Q, K, V) or static (no V)."),
         save_attention: bool = typer.Option(False, "--save-attention", help="Write attention.csv/.png."),
         config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt,
         out: Optional[str] = OutOpt, data_dir: Optional[str] = DataOpt,
         rest: Optional[list[str]] = typer.Argument(None, help="More source folders, then key=value overrides."),
         force: bool = ForceOpt, debug: bool = DebugOpt):
    """AdapterFusion stage 2: learn per-layer attention over frozen adapters on a target task."""
    sources = [*(adapters or []), *(r for r in rest or [] if "=" not in r)]
    opts = options(target, model, "fusion", seed, out, data_dir)
    opts["method.variant"] = variant
    if sources:
        opts["method.adapters"] = [str(Path(s).resolve()) for s in sources]
    if model is None and sources:
        opts["model.name"] = _source_model(sources[0])
    user = merge_layers(config, opts, [r for r in rest or [] if "=" in r])
    folder = train_and_show("fuse", user, force, save_attention=save_attention)
    if (folder / "attention.csv").is_file():
        console.print(f"fusion attention: {folder / 'attention.csv'}, {folder / 'attention.png'}")


def _source_model(src: str) -> str | None:
    """The base model a source adapter was trained on (so --model can be left out)."""
    from adapterbench.recipe.artifacts import adapter_folder
    return read_json(adapter_folder(src) / "adapter_config.json").get("base_model")


@command()
def multitask(tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks, e.g. rte,mrpc,stsb."),
              method: Optional[str] = typer.Option(None, "--method", help="mtl, mt-a or camtl."),
              sampling: Optional[str] = typer.Option(None, "--sampling",
                                                     help="proportional, uniform, temperature, annealed, uncertainty."),
              config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt,
              out: Optional[str] = OutOpt, data_dir: Optional[str] = DataOpt,
              overrides: Optional[list[str]] = Overrides, force: bool = ForceOpt, debug: bool = DebugOpt):
    """One encoder trained on several tasks at once (mtl, mt-a, camtl), evaluated per task."""
    opts = options(tasks, model, method, seed, out, data_dir)
    opts["sampling.scheme"] = sampling
    train_and_show("multitask", merge_layers(config, opts, overrides), force)


@command()
def merge(adapters: Optional[list[str]] = typer.Option(None, "--adapters", "-a", help="Source adapter or run folders."),
          strategy: str = typer.Option("avg", "--strategy", help="avg, align, ties or task-arithmetic."),
          weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, one per source."),
          out: Optional[Path] = typer.Option(None, "--out", callback=named_output, help="Folder for the merged adapter."),
          target: Optional[str] = typer.Option(None, "--target", help="Target task (for --same-track)."),
          same_track: bool = typer.Option(False, "--same-track", help="Only sources in the target's track."),
          include_target: bool = typer.Option(False, "--include-target", help="Keep the target's own adapter."),
          align_on: Optional[str] = typer.Option(None, "--align-on", help="align: cost from activations on this task."),
          align_examples: int = typer.Option(64, "--align-examples", min=1, max=MAX_STEPS, help="Examples for --align-on."),
          density: float = typer.Option(0.2, "--density", min=1e-6, max=1.0, help="ties: share of entries kept."),
          data_dir: Optional[str] = DataOpt, force: bool = ForceOpt,
          rest: Optional[list[str]] = typer.Argument(None, help="More source folders."),
          debug: bool = DebugOpt):
    """Merge adapters of one configuration into one adapter folder (MerA; our interpretation)."""
    from adapterbench.recipe.merge import merge as merge_adapters
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise UserError(f"--weights '{weights}' must be comma-separated numbers") from None
    folder = merge_adapters([*(adapters or []), *(rest or [])], strategy, w, out, target, same_track, include_target,
                            align_on, align_examples, density, data_dir, force)
    console.print(f"merged adapter: {folder}")


@command()
def evaluate(run_dir: Path = typer.Argument(..., help="A run folder."),
             split: str = typer.Option("dev", "--split", help="dev (metrics) or test (prediction file)."),
             save_attention: bool = typer.Option(False, "--save-attention", help="Fusion runs: attention.csv/.png."),
             data_dir: Optional[str] = DataOpt,
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                    help="Run the model's own code (never taken from the run folder)."),
             debug: bool = DebugOpt):
    """Rebuild a model from its run folder and recompute its metrics."""
    from adapterbench.recipe.runmodel import evaluate_stage
    res = evaluate_stage(run_dir, split, data_dir, save_attention, trust_remote_code)
    if split == "dev":
        for name, mets in res["tasks"].items():
            console.print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in mets.items()))
        console.print(f"reproduced the stored dev metrics: "
                      f"{'[green]yes[/green]' if res['reproduced'] else '[red]NO[/red]'}", markup=True)
    else:
        console.print(f"test predictions: {', '.join(res['predictions'])}")
    if "attention" in res:
        console.print(f"fusion attention: {res['attention']}")
