"""The `adapterbench` command line: each command builds a config and calls one stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .errors import UserError

# markdown: help paragraphs are rewrapped to the terminal (rich mode keeps the docstrings' line breaks)
app = typer.Typer(add_completion=False, rich_markup_mode="markdown", no_args_is_help=True,
                  pretty_exceptions_enable=False,
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

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (see configs/).")
TaskOpt = typer.Option(None, "--task", "-t", help="Task name (adapterbench ls tasks) or task YAML.")
ModelOpt = typer.Option(None, "--model", "-m", help="Hub id, local folder, or alias (minilm-l6, mpnet-base).")
MethodOpt = typer.Option(None, "--method", help="Method name (adapterbench ls methods).")
SeedOpt = typer.Option(None, "--seed", help="Random seed.")
OutOpt = typer.Option(None, "--out", help="Root folder of run folders (default runs/).")
DataOpt = typer.Option(None, "--data-dir", help="glue_data-style folder (else $ADAPTERBENCH_DATA_DIR).")
ForceOpt = typer.Option(False, "--force", help="Retrain even if a finished run with this config exists.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
Overrides = typer.Argument(None, help="key=value overrides, e.g. train.lr=3e-4 train.epochs=3")


@app.callback()
def main_options(tasks_dir: Optional[list[Path]] = typer.Option(
        None, "--tasks-dir", help="A folder of your own task YAMLs, searched after the shipped tasks "
                                  "(repeatable; also $ADAPTERBENCH_TASKS, os.pathsep-separated)."),
        plugin: Optional[list[str]] = typer.Option(
            None, "--plugin", help="A method of your own: a .py file (named by its stem) or an importable module "
                                   "(repeatable; a study's workers load it too). See docs/methods.md.")):
    """Train, fuse and compare bottleneck adapters and their baselines."""
    if plugin:
        from .methods import register_plugin
        try:
            for spec in plugin:
                register_plugin(spec)
        except UserError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(2)
    if tasks_dir:
        old = os.environ.get("ADAPTERBENCH_TASKS", "")
        os.environ["ADAPTERBENCH_TASKS"] = os.pathsep.join([*(str(p.resolve()) for p in tasks_dir), *filter(None, [old])])


def guarded(debug: bool, fn, *args, **kwargs):
    """Run `fn`; bad input becomes one red line and exit code 2 (a traceback with --debug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(2)
    except KeyboardInterrupt as e:
        err.print(f"[yellow]interrupted[/yellow]{': ' + escape(str(e)) if str(e) else ''}", highlight=False,
                  markup=True)
        raise typer.Exit(130)


def _options(task, model, method, seed, out, data_dir) -> dict:
    return {"task": task, "model.name": model, "method.name": method, "seed": seed,
            "out_dir": out, "data.data_dir": data_dir}


def command_line_plugins(method: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A user's method module named on the command line (--method ./x.py, method=... or
    method.name=... overrides) is loaded and replaced by its registered name."""
    from .methods import register_plugin
    from .methods.plugins import looks_like_plugin
    if method and looks_like_plugin(method):
        method = register_plugin(method)
    out = []
    for text in overrides or []:
        key, eq, value = text.partition("=")
        if eq and key in ("method", "method.name") and looks_like_plugin(value):
            text = f"{key}={register_plugin(value)}"
        out.append(text)
    return method, out


def _train(stage, config, task, model, method, seed, out, data_dir, overrides, force, init_from=None):
    from .config import merge_layers
    from .runs import RunExists
    from .stages import resolve, train_stage
    method, overrides = command_line_plugins(method, overrides)
    opts = _options(task, model, method, seed, out, data_dir)
    opts["init_from"] = str(Path(init_from).resolve()) if init_from else None
    cfg = resolve(merge_layers(config, opts, overrides), stage)
    try:
        folder = train_stage(stage, cfg, force=force, console=console)
    except RunExists as e:
        console.print(f"already done: {e.folder} (status ok; --force retrains)")
        folder = e.folder
    print_metrics(folder)


def print_metrics(folder: Path) -> None:
    from .runs import is_main_process, read_json
    if not is_main_process():   # the other ranks of a multi-process run stay quiet
        return
    from .runs import task_results
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


def _train_command(stage: str, help_text: str) -> None:
    """Register `extract` / `finetune`: the same options, another stage."""
    def command(config: Optional[Path] = ConfigOpt, task: Optional[str] = TaskOpt, model: Optional[str] = ModelOpt,
                method: Optional[str] = MethodOpt, seed: Optional[int] = SeedOpt, out: Optional[str] = OutOpt,
                data_dir: Optional[str] = DataOpt, overrides: Optional[list[str]] = Overrides,
                init_from: Optional[Path] = typer.Option(None, "--init-from",
                                                         help="Start the adapter from this adapter folder (e.g. merged)."),
                force: bool = ForceOpt, debug: bool = DebugOpt):
        guarded(debug, _train, stage, config, task, model, method, seed, out, data_dir, overrides, force, init_from)
    command.__doc__ = help_text
    app.command(stage)(command)


_train_command("extract", "Train one adapter on one task (AdapterFusion stage 1; default method pfeiffer).")
_train_command("finetune", "Fully fine-tune the encoder on one task (the \"Full\" baseline; default method full).")


@app.command()
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
    def go():
        from .config import merge_layers
        from .runs import RunExists
        from .stages import resolve, train_stage
        rest_ = rest or []
        sources = [*(adapters or []), *(r for r in rest_ if "=" not in r)]
        overrides = [r for r in rest_ if "=" in r]
        opts = _options(target, model, "fusion", seed, out, data_dir)
        opts["method.variant"] = variant
        if sources:
            opts["method.adapters"] = [str(Path(s).resolve()) for s in sources]
        if model is None and sources:
            opts["model.name"] = _source_model(sources[0])
        cfg = resolve(merge_layers(config, opts, overrides), "fuse")
        try:
            folder = train_stage("fuse", cfg, force=force, console=console, save_attention=save_attention)
        except RunExists as e:
            console.print(f"already done: {e.folder} (status ok; --force retrains)")
            folder = e.folder
        print_metrics(folder)
        if (folder / "attention.csv").is_file():
            console.print(f"fusion attention: {folder / 'attention.csv'}, {folder / 'attention.png'}")
    guarded(debug, go)


@app.command()
def multitask(tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks, e.g. rte,mrpc,stsb."),
              method: Optional[str] = typer.Option(None, "--method", help="mtl, mt-a or camtl."),
              sampling: Optional[str] = typer.Option(None, "--sampling",
                                                     help="proportional, uniform, temperature, annealed, uncertainty."),
              config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt,
              out: Optional[str] = OutOpt, data_dir: Optional[str] = DataOpt,
              overrides: Optional[list[str]] = Overrides, force: bool = ForceOpt, debug: bool = DebugOpt):
    """One encoder trained on several tasks at once (mtl, mt-a, camtl), evaluated per task."""
    def go():
        from .config import merge_layers
        from .stages import resolve, train_stage
        opts = _options(tasks, model, method, seed, out, data_dir)
        opts["sampling.scheme"] = sampling
        cfg = resolve(merge_layers(config, opts, overrides), "multitask")
        try:
            folder = train_stage("multitask", cfg, force=force)
        except RunExists as e:
            console.print(f"already done: {e.folder} (status ok; --force retrains)")
            folder = e.folder
        print_metrics(folder)
    from .runs import RunExists
    guarded(debug, go)


@app.command()
def merge(adapters: Optional[list[str]] = typer.Option(None, "--adapters", "-a", help="Source adapter or run folders."),
          strategy: str = typer.Option("avg", "--strategy", help="avg, align, ties or task-arithmetic."),
          weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, one per source."),
          out: Optional[Path] = typer.Option(None, "--out", help="Folder for the merged adapter."),
          target: Optional[str] = typer.Option(None, "--target", help="Target task (for --same-track)."),
          same_track: bool = typer.Option(False, "--same-track", help="Only sources in the target's track."),
          include_target: bool = typer.Option(False, "--include-target", help="Keep the target's own adapter."),
          align_on: Optional[str] = typer.Option(None, "--align-on", help="align: cost from activations on this task."),
          align_examples: int = typer.Option(64, "--align-examples", help="Examples for --align-on."),
          density: float = typer.Option(0.2, "--density", help="ties: share of entries kept."),
          data_dir: Optional[str] = DataOpt, force: bool = ForceOpt,
          rest: Optional[list[str]] = typer.Argument(None, help="More source folders."),
          debug: bool = DebugOpt):
    """Merge adapters of one configuration into one adapter folder (MerA; our interpretation)."""
    def go():
        from .merge import merge as do_merge
        try:
            w = [float(x) for x in weights.split(",")] if weights else None
        except ValueError:
            raise UserError(f"--weights '{weights}' must be comma-separated numbers") from None
        folder = do_merge([*(adapters or []), *(rest or [])], strategy, w, out, target, same_track, include_target,
                          align_on, align_examples, density, data_dir, force)
        console.print(f"merged adapter: {folder}")
    guarded(debug, go)


@app.command()
def tune(config: Optional[Path] = ConfigOpt, task: Optional[str] = TaskOpt, model: Optional[str] = ModelOpt,
         method: Optional[str] = MethodOpt, seed: Optional[int] = SeedOpt, data_dir: Optional[str] = DataOpt,
         space: Optional[list[str]] = typer.Option(None, "--space", help="KEY=SPEC, SPEC loguniform(a,b), uniform(a,b), "
                                                   "int(a,b) or choice(a,b,...) (repeatable), e.g. "
                                                   "train.lr=loguniform(1e-5,1e-3)."),
         trials: int = typer.Option(20, "--trials", help="Trials to finish (complete or pruned), all workers together."),
         out: Path = typer.Option(Path("runs/tune"), "--out", help="The search's folder: optuna.journal, trials/, "
                                                                   "best.yaml, plots."),
         sampler_seed: int = typer.Option(0, "--sampler-seed", help="TPE's seed."),
         launcher: str = typer.Option("local", "--launcher", help="local, submitit-local or slurm."),
         workers: int = typer.Option(1, "--workers", help="submitit/slurm: workers sharing the journal."),
         partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition."),
         time_min: int = typer.Option(24 * 60, "--time", help="Minutes per worker."),
         wait: bool = typer.Option(False, "--wait", help="submitit/slurm: wait for the workers and summarise."),
         overrides: Optional[list[str]] = Overrides, debug: bool = DebugOpt):
    """Search hyperparameters with Optuna (TPE, median pruning) on the held-out slice; every trial is a run."""
    def go():
        from . import tune as T
        from .config import merge_layers
        from .methods import get_method
        if trials < 1 or workers < 1:
            raise UserError("--trials and --workers must be at least 1")
        dims = T.parse_space(space)
        name, extra = command_line_plugins(method, overrides)
        user = merge_layers(config, _options(task, model, name, seed, None, data_dir), extra)
        stage = get_method((user.get("method") or {}).get("name") or "pfeiffer").STAGE
        if launcher == "local":
            res = T.run_trials(user, stage, dims, trials, out, sampler_seed,
                               on_trial=lambda n, text: console.print(text, highlight=False))
            console.print(f"{res['done']} trials done ({res['complete']} complete, {res['pruned']} pruned); best "
                          f"held-out {res['value']:.2f} with {res['best']}", highlight=False)
            console.print(f"best config: {res['config']} (adapterbench {stage} --config {res['config']}); run: "
                          f"{res['run']}; plots: {', '.join(map(str, res['plots'])) or 'none'}", highlight=False)
            return
        from . import launch as L
        for d in dims:
            T.trial_config(user, stage, {d.key: d.values[0]}, out)
        T.open_study(out, sampler_seed, "maximize")                     # the journal exists before the workers
        res = L.Resources(workers, 0, partition, time_min, 1, 0, 0.0, {})
        worker = T.TuneWorker(user, stage, dims, trials, str(out.resolve()), sampler_seed)
        jobs, logs = L.submit(launcher, worker, res, out)
        console.print(f"submitted {len(jobs)} tune worker(s) via {launcher}: jobs {', '.join(j.job_id for j in jobs)}; "
                      f"logs in {logs}; the same command with --launcher local afterwards summarises")
        if wait:
            console.print(f"workers done: {L.wait(jobs)}")
    guarded(debug, go)


@app.command("check-method")
def check_method_cmd(method: str = typer.Argument(..., help="A method module: a .py file, an importable module, "
                                                             "or a registered method's name."),
                     debug: bool = DebugOpt):
    """Run the method contract's checks on a tiny model: one line per failed check (exit 2), or all passed."""
    def go():
        from .methods import METHODS, get_method, register_plugin
        from .methods.checks import CHECKS, run_checks
        from .methods.plugins import looks_like_plugin
        shipped = method in METHODS and not looks_like_plugin(method)
        name = method if shipped else register_plugin(method)
        failed = run_checks(get_method(name), name, shipped=shipped)
        for line in failed:
            err.print(f"{name}: {line}", highlight=False, soft_wrap=True)
        if failed:
            raise typer.Exit(2)
        console.print(f"{name}: all {len(CHECKS) + 1} checks passed (members, "
                      f"{', '.join(label for label, _ in CHECKS)})", highlight=False)
    guarded(debug, go)


@app.command("export")
def export_cmd(run_dir: Path = typer.Argument(..., help="An extract run folder or adapter folder."),
               fmt: str = typer.Option("adapterhub", "--format", help="adapterhub (pfeiffer, houlsby, fusion) or peft (lora)."),
               out: Path = typer.Option(..., "--out", help="Folder to write."),
               name: Optional[str] = typer.Option(None, "--name", help="Adapter name (default: the task)."),
               head: Optional[bool] = typer.Option(None, "--head/--no-head", help="Also write the head (adapterhub: "
                                                   "default; --no-head: the adapter alone, e.g. a fusion source. peft: "
                                                   "by default a sequence-classification export where the "
                                                   "architecture's head computes ours, else the encoder alone)."),
               force: bool = ForceOpt, debug: bool = DebugOpt):
    """Write an adapter (and its head) in AdapterHub's format (the `adapters` library) or peft's (LoRA)."""
    def go():
        from .adapterhub import export, export_fusion
        if fmt not in ("adapterhub", "peft"):
            raise UserError(f"--format '{fmt}' is not supported: use adapterhub or peft")
        if fmt == "peft":
            from .peftio import export as export_peft
            from .peftio import plan_export
            what = plan_export(run_dir, head)[-1]
            console.print(f"exported: {export_peft(run_dir, out, force, head)}: {what}")
        elif (run_dir / "fusion" / "fusion_config.json").is_file():
            console.print(f"exported fusion: {export_fusion(run_dir, out, force)}")
        else:
            console.print(f"exported: {export(run_dir, out, name, force, with_head=head is not False)}")
    guarded(debug, go)


@app.command("import")
def import_cmd(src: Path = typer.Argument(..., help="A folder saved by the `adapters` library (save_adapter; for a "
                                                   "fusion: its adapters, save_adapter_fusion and save_head in one "
                                                   "folder) or by peft (LoRA)."),
               out: Path = typer.Option(..., "--out", help="adapterbench adapter folder to write."),
               model: Optional[str] = typer.Option(None, "--model", help="Base model, if not the one it names."),
               force: bool = ForceOpt, debug: bool = DebugOpt):
    """Read an AdapterHub adapter (Pfeiffer/Houlsby) or a peft LoRA adapter into an adapterbench folder."""
    def go():
        from .adapterhub import import_adapter, import_fusion
        from .runs import read_json
        if list(src.glob("*/adapter_fusion_config.json")):
            console.print(f"imported fusion: {import_fusion(src, out, model, force)} (sources/ and fusion/)")
            return
        if not (src / "adapter_config.json").is_file():
            raise UserError(f"{src} holds no adapter_config.json: pass the folder save_adapter/save_pretrained wrote")
        if "peft_type" in read_json(src / "adapter_config.json"):
            from .peftio import import_lora
            console.print(f"imported: {import_lora(src, out, model, force)}")
        else:
            console.print(f"imported: {import_adapter(src, out, model, force)}")
    guarded(debug, go)


def _source_model(src: str) -> str | None:
    """The base model a source adapter was trained on (so --model can be left out)."""
    from .artifacts import adapter_folder
    from .runs import read_json
    return read_json(adapter_folder(src) / "adapter_config.json").get("base_model")


@app.command()
def evaluate(run_dir: Path = typer.Argument(..., help="A run folder."),
             split: str = typer.Option("dev", "--split", help="dev (metrics) or test (prediction file)."),
             save_attention: bool = typer.Option(False, "--save-attention", help="Fusion runs: attention.csv/.png."),
             data_dir: Optional[str] = DataOpt,
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                    help="Run the model's own code (never taken from the run folder)."),
             debug: bool = DebugOpt):
    """Rebuild a model from its run folder and recompute its metrics."""
    def go():
        from .stages import evaluate_stage
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
    guarded(debug, go)


@app.command()
def run(study: Path = typer.Argument(..., help="A study YAML, or a shipped study's name (quickstart, reproduce_full, ...)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Rerun runs that failed."),
        shard: str = typer.Option("0/1", "--shard", help="i/n: this worker takes every n-th run."),
        only: Optional[str] = typer.Option(None, "--only", help="Only these rows (labels or patterns, comma-"
                                                                "separated, e.g. 'full,fusion,adapter k=*') and "
                                                                "the runs they need."),
        skip_archived: Optional[Path] = typer.Option(None, "--skip-archived", help="A results archive (.jsonl): "
                                                     "skip the runs it holds, unless a run still to do needs "
                                                     "their weights (a lost study folder resumes from its archive)."),
        wait_others: bool = typer.Option(True, "--wait-others/--no-wait-others",
                                         help="Wait for runs other workers hold (taking over any whose worker "
                                              "died), or leave them to those workers and return once nothing "
                                              "else can start (a queue of --only phases then moves on)."),
        out: Optional[str] = OutOpt, data_dir: Optional[str] = DataOpt,
        launcher: str = typer.Option("local", "--launcher", help="local (this process), submitit-local, or "
                                                                 "slurm (a job array of workers through submitit)."),
        workers: int = typer.Option(1, "--workers", help="submitit/slurm: how many workers (array size)."),
        array_parallelism: int = typer.Option(0, "--array-parallelism", help="slurm: at most this many at once."),
        partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition."),
        time_min: int = typer.Option(24 * 60, "--time", help="Minutes per worker (requeued when it runs out)."),
        cpus: int = typer.Option(1, "--cpus-per-worker", help="CPUs per worker."),
        gpus: int = typer.Option(0, "--gpus-per-worker", help="GPUs per worker."),
        mem_gb: float = typer.Option(0.0, "--mem", help="GB of memory per worker (0: the partition's default)."),
        slurm_param: Optional[list[str]] = typer.Option(None, "--slurm-param", help="Any other sbatch option as "
                                                                                     "key=value (repeatable)."),
        wait: bool = typer.Option(False, "--wait", help="submitit/slurm: wait for the workers and summarise."),
        debug: bool = DebugOpt):
    """Run a study: every run of its grid, each once, dependencies first; resumable.

    With --launcher slurm the same workers run as a SLURM job array (see `adapterbench status`)."""
    def go():
        from . import progress as P
        from . import resume as R
        from . import study as S
        from .tasks import shipped
        study_path = shipped("studies", study)
        st = S.load_study(study_path)
        if out:
            st.out_dir = out
        if data_dir:
            st.defaults = {**st.defaults, "data": {**st.defaults.get("data", {}), "data_dir": data_dir}}
        i, n = _shard(shard)
        nodes = S.plan(st)
        if skip_archived and launcher != "local":
            raise UserError("--skip-archived works with --launcher local only: run the workers locally, or "
                            "drop the archived seeds from the study's seeds")
        from .report import split_labels
        keep = S.selected(nodes, split_labels(only)) if only else None
        if skip_archived:
            skip, stale = R.archived(nodes, R.archive_records(skip_archived), keep)
            keep = (set(range(len(nodes))) if keep is None else keep) - skip
        print_plan(nodes, S, keep, st)
        if skip_archived:
            console.print(f"{len(skip)} runs skipped: {skip_archived} holds them and no run still to do needs them")
            if stale:
                console.print(f"{stale} runs to do have a cell the archive holds under another folder name "
                              f"({R.STALE_WHY}): they run again")
        left = P.remaining(P.status_table(nodes))
        console.print(f"estimated: ≈ {left['seconds'] / 3600:.1f} run-hours for {left['estimated']} runs to do"
                      + (f"; {left['unknown']} more have no finished run of their row and task to go by yet"
                         if left["unknown"] else "") + " (adapterbench status --by-row: per row)", highlight=False)
        if dry_run:
            return
        if launcher != "local":
            from . import launch as L
            res = L.Resources(workers, array_parallelism, partition, time_min, cpus, gpus, mem_gb,
                              L.parse_params(slurm_param or []))
            worker = L.StudyWorker(str(study_path.resolve()), str(Path(st.out_dir).resolve()), data_dir, retry_failed,
                                   split_labels(only) if only else None)
            jobs, logs = L.submit(launcher, worker, res, Path(st.out_dir))
            console.print(f"submitted {len(jobs)} worker(s) via {launcher}: jobs {', '.join(j.job_id for j in jobs)}; "
                          f"logs in {logs}; recorded in {Path(st.out_dir) / 'launch.json'}")
            console.print(f"watch: adapterbench status {study}" + (f" --out {out}" if out else ""))
            if wait:
                results = L.wait(jobs)
                console.print(f"workers done: {results}")
                left = [r for r in P.status_table(nodes) if r["state"] != "done"]
                if left:
                    console.print(f"{len(left)} runs not done (see adapterbench status)")
                    raise typer.Exit(1)
            return
        events = lambda node, what: console.print(f"[bold]#{node.index}[/bold] " + escape(
            f"{node.stage} {node.label} {node.task} s{node.seed}: {what}"), highlight=False, markup=True)
        # a row whose learning rate a sweep chooses is planned once its sweep has finished: after
        # each run, plan again if a sweep just decided, and go on with the rows it adds
        sweeping = bool(st.waiting)
        replan = lambda: sweeping and len(S.plan(st)) > len(nodes)   # noqa: E731
        res = S.execute(st, nodes, retry_failed=retry_failed, shard=(i, n), on_event=events, only=keep,
                        wait_for_others=wait_others, replan=replan)
        while not (res["failed"] or res["blocked"] or res["left"]):
            more = S.plan(st)
            if not sweeping or len(more) == len(nodes):
                break
            nodes = more
            keep = S.selected(nodes, split_labels(only)) if only else None
            print_plan(nodes, S, keep, st)
            again = S.execute(st, nodes, retry_failed=retry_failed, shard=(i, n), on_event=events, only=keep,
                              wait_for_others=wait_others, replan=replan)
            res = {k: sorted(set(res[k]) | set(again[k])) for k in again}
        console.print(f"study {st.name}: {len(res['ran'])} ran, {len(res['done'])} already done, "
                      f"{len(res['failed'])} failed, {len(res['blocked'])} blocked"
                      + (f", {len(res['left'])} left to other workers" if res["left"] else "")
                      + f"; runs in {st.out_dir}")
        if res["failed"] or res["blocked"]:
            raise typer.Exit(1)
    guarded(debug, go)


@app.command()
def status(study: Path = typer.Argument(..., help="A study YAML or a shipped study's name."),
           out: Optional[str] = OutOpt,
           by_row: bool = typer.Option(False, "--by-row", help="One line per row (label): runs in each state "
                                                                 "and the run-hours left, instead of every run."),
           archive: Optional[Path] = typer.Option(None, "--archive", help="A results archive (.jsonl): the runs "
                                                  "`run --skip-archived` would skip show as archived, and their "
                                                  "recorded times estimate what is left."),
           todo: bool = typer.Option(False, "--todo", help="List only the runs still to do (running, queued, "
                                                           "failed, blocked); the counts and hours stay the study's."),
           debug: bool = DebugOpt):
    """Every run of a study: done, running, queued, failed, blocked (or archived).

    Running runs show their host, job, heartbeat age and progress; --archive counts the runs an
    archive holds as archived."""
    def go():
        from collections import Counter

        from . import progress as P
        from . import resume as R
        from . import study as S
        from .tasks import shipped
        st = S.load_study(shipped("studies", study))
        if out:
            st.out_dir = out
        nodes = S.plan(st)
        rows = P.status_table(nodes)
        states = ("done", "running", "queued", "failed", "blocked")
        if archive:
            stale = R.mark_archived(rows, nodes, archive)
            states = ("done", "archived", *states[1:])
        title = f"study {st.name} ({st.out_dir})"
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["label"], []).append(r)
        # remaining() groups by row, so the study's total is the sum over its rows (each run read once)
        by_label = {label: P.remaining(mine) for label, mine in groups.items()}
        shown = [r for r in rows if r["state"] not in ("done", "archived")] if todo else rows
        open_rows = {label: by_label[label] for label in dict.fromkeys(r["label"] for r in shown)}
        console.print(_status_by_row(groups, states, title, open_rows) if by_row else _status_by_run(shown, title))
        counts = Counter(r["state"] for r in rows)
        console.print(", ".join(f"{k} {counts[k]}" for k in states))
        left = {k: sum(x[k] for x in by_label.values()) for k in ("seconds", "estimated", "unknown")}
        if left["estimated"] or left["unknown"]:
            console.print(f"still to run: ≈ {left['seconds'] / 3600:.1f} run-hours for {left['estimated']} runs "
                          f"(a running run: its steps left at its own pace over its last logged steps; else "
                          f"{'the time the archive recorded for its cell, else ' if archive else ''}the median "
                          f"time of the same row and task's finished runs, else a running run's whole time at "
                          f"its pace; divide by the workers)"
                          + (f"; {left['unknown']} runs have no finished or running run to go by" if left["unknown"] else ""))
        if archive and stale:
            console.print(f"{stale} runs to do have a cell (row, tasks, seed, model) that {archive} holds under "
                          f"another folder name ({R.STALE_WHY}): they are counted as queued")
        launch = Path(st.out_dir) / "launch.json"
        if launch.is_file():
            from .runs import read_json
            rec = read_json(launch)
            console.print(f"last launch: {rec['launcher']} jobs {', '.join(rec['jobs'])} ({rec['submitted']}); "
                          f"logs {rec['log_folder']}")
    guarded(debug, go)


def _status_by_run(rows: list[dict], title: str) -> Table:
    t = Table("#", "stage", "row", "task", "seed", "state", "detail", title=title)
    colour = {"done": "green", "archived": "green", "running": "cyan", "failed": "red", "blocked": "red",
              "queued": "white"}
    for r in rows:
        t.add_row(str(r["index"]), r["stage"], r["label"], Path(r["task"]).stem if "/" in r["task"] else r["task"],
                  str(r["seed"]), Text(r["state"], style=colour[r["state"]]), r["detail"])
    return t


def _status_by_row(groups: dict[str, list[dict]], states: tuple, title: str, left_by_label: dict[str, dict]) -> Table:
    """One line per row label: its runs in each state and the run-hours left (study.remaining)."""
    from collections import Counter
    t = Table("row", "runs", *states, "run-hours left", title=title)
    for label, left in left_by_label.items():
        mine = groups[label]
        n = Counter(r["state"] for r in mine)
        hours = f"{left['seconds'] / 3600:.1f}" + (f" (+{left['unknown']} runs ?)" if left["unknown"] else "")
        t.add_row(label, str(len(mine)), *(str(n[k]) for k in states), hours)
    return t


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard '{text}' must be i/n with 0 <= i < n, e.g. 0/2") from None
    return i, n


def print_plan(nodes, S, shown=None, study=None) -> None:
    """The plan as a table: every run, or only `shown` (what --only and --skip-archived leave), each
    numbered as in the whole study so that `needs` names the same runs either way."""
    t = Table("#", "stage", "method", "task", "seed", "model", "status", "needs")
    for nd in nodes:
        if shown is not None and nd.index not in shown:
            continue
        t.add_row(str(nd.index), nd.stage, nd.label, nd.task, str(nd.seed), nd.model, S.state(nd),
                  ",".join(f"#{d}" for d in nd.deps))
    console.print(t)
    for label, chosen in (getattr(study, "chosen", None) or {}).items():
        console.print(f"{label}: lr {chosen['lr']:g} chosen by its sweep ({chosen['by']})", highlight=False, markup=False)
    for label, why in (getattr(study, "waiting", None) or {}).items():
        console.print(f"{label}: not planned yet, {why}", highlight=False, markup=False)
    if shown is not None and len(shown) < len(nodes):
        console.print(f"{len(shown)} of the study's {len(nodes)} runs: the others are not in --only's rows "
                      f"(nor needed by them) or are skipped as archived")


@app.command()
def report(runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding run folders (searched recursively)."),
           fmt: str = typer.Option("md", "--format", help="md, csv or latex."),
           out_file: Optional[Path] = typer.Option(None, "--out", help="Write the table here (and the plot beside it)."),
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
    def go():
        from .plots import metric_bars
        from .report import build_report, render, split_labels
        from .runs import atomic_write
        if against:
            from .against import compare, comparison_table
            rep, results = compare(runs_dir, against, metric)
            text = render(rep, "md") + "\n" + comparison_table(results)
            if out_file:
                atomic_write(out_file, text)
                console.print(f"table: {out_file}")
            else:
                print(text)
            return
        if claims:
            from .claims import write_claims_report
            if out_file is None or out_file.suffix != ".md":
                raise UserError("--claims writes a Markdown document: give --out FILE.md (e.g. docs/results.md)")
            for cid, word in write_claims_report(runs_dir, claims, out_file, plot):
                console.print(f"{cid}: {word}")
            console.print(f"report: {out_file}")
            return
        only = split_labels(rows) if rows else None
        only_seeds = _seed_list(seeds) if seeds else None
        rep = build_report(runs_dir, reference, versus, only, metric, majority=majority, seeds=only_seeds)
        text = render(rep, fmt)
        if settings:
            from .report import SETTINGS_LEGEND, markdown_table, settings_rows
            if fmt != "md":
                raise UserError(f"--settings adds a Markdown table: use it with --format md, not {fmt}")
            text += "\n" + markdown_table(*settings_rows(runs_dir, only, only_seeds)) + "\n" + SETTINGS_LEGEND + "\n"
        if out_file:
            atomic_write(out_file, text)
            console.print(f"table: {out_file}")
        else:
            print(text)
        if plot:
            png = (out_file.with_suffix(".png") if out_file else
                   runs_dir.with_suffix(".png") if runs_dir.is_file() else runs_dir / "report.png")
            metric_bars(rep, png)
            console.print(f"plot: {png}")
        if runs_dir.is_dir():
            console.print(f"run folders: {runs_dir} (one per run: config.yaml, metrics.json, log.jsonl, weights)")
    guarded(debug, go)


def _seed_list(value: str) -> list[int]:
    """'2,3,4' -> [2, 3, 4]; anything else is one line naming the value."""
    from .report import split_labels
    try:
        return [int(x) for x in split_labels(value) if x]
    except ValueError:
        raise UserError(f"--seeds '{value}' must be seeds separated by commas, e.g. --seeds 2,3,4") from None


@app.command()
def archive(runs_dir: Path = typer.Argument(..., help="Folder holding run folders (a study's)."),
            out: Path = typer.Option(..., "--out", help="The archive to write or update, e.g. docs/results/runs.jsonl."),
            replace: bool = typer.Option(False, "--replace", help="Write only RUNS_DIR's runs, dropping the "
                                                                   "archive's lines for runs it does not hold."),
            unfinished: Optional[Path] = typer.Option(None, "--unfinished", help="Also write each unfinished run's "
                                                      "progress (dev by epoch, steps, shares) to this file, e.g. "
                                                      "docs/results/unfinished.jsonl."),
            debug: bool = DebugOpt):
    """Write every finished run as one JSON line (metrics, config, extras): results as data.

    `report` and `report --claims` read an archive like run folders. An existing archive is updated:
    runs it holds that RUNS_DIR does not are kept (a lost study folder loses no results).
    `--unfinished`: the learning curves of runs still going, kept the same way, so a long run's
    progress outlives a lost folder (no result: `report` reads finished runs only)."""
    def go():
        from .progress import write_unfinished
        from .runs import write_archive
        if not runs_dir.is_dir():
            raise UserError(f"runs folder {runs_dir} does not exist: pass the folder a study wrote")
        if unfinished is not None and unfinished.resolve() == out.resolve():
            raise UserError(f"--unfinished {unfinished} is the archive itself: name another file, "
                            f"e.g. docs/results/unfinished.jsonl")
        fresh, kept = write_archive(runs_dir, out, replace)
        console.print(f"{fresh + kept} finished runs written to {out}: {fresh} from {runs_dir}"
                      + (f", {kept} kept from the archive" if kept else ""))
        if unfinished is not None:
            now, old, dropped = write_unfinished(runs_dir, unfinished)
            console.print(f"{now + old} unfinished runs' progress written to {unfinished}: {now} from {runs_dir}"
                          + (f", {old} kept (folders no longer there)" if old else "")
                          + (f"; {dropped} dropped (finished since)" if dropped else ""))
    guarded(debug, go)


@app.command()
def bench(model: str = typer.Option("minilm-l6", "--model", help="Model alias, folder or hub id."),
          configs: str = typer.Option("all", "--configs", help="all, or comma-separated: bare, merged, fusion2, "
                                                               "fusion4, fusion8, fusion16 and every method that "
                                                               "supports bench (adapterbench ls methods)."),
          modes: str = typer.Option("train,infer", "--modes", help="train, infer, train-split (each real "
                                                               "batch cut as runs cut it on this device), or several."),
          batch_size: int = typer.Option(32, "--batch-size"), seq_len: int = typer.Option(128, "--seq-len"),
          steps: int = typer.Option(5, "--steps", help="Timed steps (0 with --task: one whole epoch)."),
          warmup: int = typer.Option(2, "--warmup", help="Untimed steps first."),
          task: Optional[str] = typer.Option(None, "--task", help="Real training batches of this task."),
          pad_to_max: bool = typer.Option(False, "--pad-to-max", help="Real batches padded to --seq-len."),
          peer: bool = typer.Option(False, "--peer", help="Also run the `adapters` library (.peer-venv)."),
          peer_pad_to_max: bool = typer.Option(False, "--peer-pad-to-max",
                                               help="Peer pads to --seq-len (its GLUE script's default)."),
          compile_model: bool = typer.Option(False, "--compile", help="torch.compile our model first."),
          precision: str = typer.Option("auto", "--precision", help="Ours: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, "
                                                                   "or several side by side: fp32,bf16."),
          group_by_length: bool = typer.Option(False, "--group-by-length", help="Real batches in length-grouped order."),
          repeat: int = typer.Option(1, "--repeat", help="Measure everything N times, interleaved; keep the median."),
          threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads per measurement."),
          out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for bench.json and bench.md."),
          data_dir: Optional[str] = DataOpt, debug: bool = DebugOpt):
    """Throughput (samples/s, tokens/s) and peak memory per method; the peer library side by side."""
    def go():
        import json as _json
        from .bench import Spec, markdown, run_bench
        from .runs import atomic_write
        for name, value, low in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 8), ("--steps", steps, 0),
                                 ("--warmup", warmup, 0), ("--repeat", repeat, 1), ("--threads", threads or 1, 1)):
            if value < low:
                raise UserError(f"{name} {value} is out of range: use {low} or more")
        if steps == 0 and not task:
            raise UserError("--steps 0 (one whole epoch) needs --task")
        precisions = list(dict.fromkeys(p.strip() for p in precision.split(",") if p.strip()))
        from .precision import PRECISIONS
        for p in precisions or [""]:
            if p not in PRECISIONS:
                raise UserError(f"--precision '{p}' must be auto, fp32 or bf16 (several: fp32,bf16)")
        if threads:
            os.environ["ADAPTERBENCH_BENCH_THREADS"] = str(threads)
        spec = Spec(model, batch_size, seq_len, steps, warmup, task, pad_to_max, peer_pad_to_max,
                    precision=precisions[0], group_by_length=group_by_length, compile=compile_model, data_dir=data_dir)
        show = lambda r: console.print(f"{r['side']:4s} {r['config']:9s} {r['mode']:5s} {r['precision']:4s} "
                                       f"{r['samples_per_s']:8.2f} samples/s  peak {r['peak_mib']:7.0f} MiB")
        rows = run_bench(spec, [c.strip() for c in configs.split(",") if c.strip()],
                         [m.strip() for m in modes.split(",") if m.strip()], peer, show, repeat, precisions)
        text = markdown(rows, spec)
        from dataclasses import asdict
        atomic_write(out / "bench.json", _json.dumps({"spec": asdict(spec), "rows": rows}, indent=2))
        atomic_write(out / "bench.md", text)
        print(text)
        console.print(f"written: {out / 'bench.md'}, {out / 'bench.json'}")
    guarded(debug, go)


@app.command("ls")
def ls(what: str = typer.Argument(..., help="tasks | methods | runs"),
       out: str = typer.Option("runs", "--out", help="Root of run folders (for `ls runs`)."),
       debug: bool = DebugOpt):
    """List tasks, methods or runs."""
    guarded(debug, _ls, what, out)


def _ls(what: str, out: str) -> None:
    if what == "tasks":
        from .tasks import parse_task, task_files
        t = Table("task", "track", "labels", "metrics", "main", "sources")
        for name, path in task_files().items():
            s = parse_task(path)
            src = "+".join(k for k in ("local", "hub") if getattr(s.sources, k) is not None)
            t.add_row(name, s.track, "regression" if s.regression else str(len(s.labels)),
                      ",".join(s.metrics), s.main_metric, src)
        console.print(t)
    elif what == "methods":
        from .methods import METHODS
        t = Table("method", "kind", "command", "default lr", "supports", "what it is")
        for name, mod in METHODS.items():
            doc = " ".join((mod.__doc__ or "").split()).split(": ")[0]
            t.add_row(name, mod.KIND, mod.STAGE, str(mod.TRAIN_DEFAULTS.get("lr")), ", ".join(sorted(mod.SUPPORTS)), doc)
        console.print(t)
    elif what == "runs":
        from .runs import iter_runs, read_json
        t = Table("run", "status", "main metric", "value")
        for folder in iter_runs(Path(out)):
            m = read_json(folder / "metrics.json")
            t.add_row(str(folder), m.get("status", "?"), m.get("main_metric", ""),
                      "" if m.get("main_value") is None else f"{m['main_value']:.2f}")
        console.print(t)
    else:
        raise UserError(f"cannot list '{what}': use tasks, methods or runs")


@app.command()
def validate(config: Path = typer.Argument(..., help="A run config, task YAML, study or claims file."),
             stage: Optional[str] = typer.Option(None, "--stage",
                                                 help="Run configs: extract, finetune, fuse or multitask "
                                                      "(default: the method's own)."),
             data_dir: Optional[str] = DataOpt,
             overrides: Optional[list[str]] = Overrides, debug: bool = DebugOpt):
    """Check any file adapterbench reads, without training: a task (and the data it points at),
    a run config (fully resolved), a study (its whole plan) or a claims file."""
    def go():
        from .validate import validate_file
        for line in validate_file(config, stage, data_dir, overrides or []):
            console.print(line, highlight=False, soft_wrap=True)
    guarded(debug, go)


def main():  # pragma: no cover
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
    """SIGUSR1 asks a training loop for a checkpoint (train.CheckpointRequests); outside
    training (loading data, between a study's runs) it does nothing instead of ending the
    process, as it would by default."""
    import signal
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
