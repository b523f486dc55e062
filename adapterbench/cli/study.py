"""Commands over a study: run (its whole grid), status, archive, and tune (a search)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from adapterbench.cli.common import (
    MAX_MINUTES,
    MAX_SEED,
    MAX_THREADS,
    MAX_TRIALS,
    MAX_WORKERS,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    MethodOpt,
    ModelOpt,
    OutOpt,
    Overrides,
    SeedOpt,
    TaskOpt,
    command,
    console,
    named_output,
)
from adapterbench.cli.train import command_line_plugins, options
from adapterbench.config import merge_layers, split_labels
from adapterbench.errors import UserError
from adapterbench.fileio import read_json
from adapterbench.tasks import shipped


CalibrateOpt = typer.Option(0, "--calibrate", min=0, max=1000,
                            help="Time this many training steps of every row on each of its tasks here, and "
                                 "estimate the run-hours of everything still to do from them (with --dry-run: "
                                 "before the first run).")


@command()
def run(study: Path = typer.Argument(..., help="A study YAML, or a shipped study's name (quickstart, reproduce_full, ...)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
        calibrate: int = CalibrateOpt,
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
        workers: int = typer.Option(1, "--workers", min=1, max=MAX_WORKERS, help="submitit/slurm: how many workers (array size)."),
        array_parallelism: int = typer.Option(0, "--array-parallelism", min=0, max=MAX_WORKERS, help="slurm: at most this many at once."),
        partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition."),
        time_min: Optional[int] = typer.Option(None, "--time", min=1, max=MAX_MINUTES, help="Minutes per worker (requeued when it runs out); "
                                                                    "default: the partition's time limit."),
        cpus: int = typer.Option(1, "--cpus-per-worker", min=1, max=MAX_THREADS, help="CPUs per worker."),
        gpus: int = typer.Option(0, "--gpus-per-worker", min=0, max=64, help="GPUs per worker."),
        mem_gb: float = typer.Option(0.0, "--mem", min=0.0, max=1e6, help="GB of memory per worker (0: the partition's default)."),
        slurm_param: Optional[list[str]] = typer.Option(None, "--slurm-param", help="Any other sbatch option as "
                                                                                     "key=value (repeatable)."),
        wait: bool = typer.Option(False, "--wait", help="submitit/slurm: wait for the workers and summarise."),
        debug: bool = DebugOpt):
    """Run a study: every run of its grid, each once, dependencies first; resumable.

    With --launcher slurm the same workers run as a SLURM job array (see `adapterbench status`)."""
    from adapterbench.study import launch as L
    from adapterbench.study.execute import choose, open_study, run_here
    from adapterbench.study.plan import plan
    study_path = shipped("studies", study)
    st = open_study(study_path, out, data_dir, skip_archived)
    rows = split_labels(only) if only else None
    i, n = parse_shard(shard)
    check_launch(launcher, skip_archived, partition, time_min)
    nodes = plan(st)
    choice = choose(nodes, rows, skip_archived)
    show_plan(st, nodes, choice, calibrate)
    if dry_run:
        return
    if launcher != "local":
        res = L.Resources(workers, array_parallelism, partition, time_min, cpus, gpus, mem_gb,
                          L.parse_params(slurm_param or []))
        worker = L.StudyWorker(str(study_path.resolve()), str(Path(st.out_dir).resolve()), data_dir, retry_failed, rows)
        submit_and_watch(launcher, worker, res, Path(st.out_dir), f"adapterbench status {study}"
                         + (f" --out {out}" if out else ""), wait, nodes)
        return
    res = run_here(st, nodes, choice, rows, retry_failed=retry_failed, shard=(i, n), wait_others=wait_others,
                   on_event=print_event, on_plan=lambda more, keep: print_plan(more, keep, st))
    print_outcome(st, res)


def show_plan(st, nodes, choice, calibrate: int) -> None:
    """What `run` prints before it starts: the plan, what the archive skips, the estimates."""
    print_plan(nodes, choice.keep, st)
    if choice.archive:
        print_skipped(choice, choice.archive)
    print_estimate(nodes, choice)
    if calibrate:
        print_calibrated(st, nodes, calibrate)


def print_event(node, what: str) -> None:
    console.print(f"[bold]#{node.index}[/bold] " + escape(f"{node.stage} {node.label} {node.task} s{node.seed}: "
                                                          f"{what}"), highlight=False, markup=True)


def print_outcome(st, res: dict) -> None:
    """The study's counts; exit 1 when a run failed or is blocked."""
    console.print(f"study {st.name}: {len(res['ran'])} ran, {len(res['done'])} already done, "
                  f"{len(res['failed'])} failed, {len(res['blocked'])} blocked"
                  + (f", {len(res['left'])} left to other workers" if res["left"] else "")
                  + f"; runs in {st.out_dir}")
    if res["failed"] or res["blocked"]:
        raise typer.Exit(1)


def check_launch(launcher: str, skip_archived: Path | None, partition: str | None, time_min: int | None) -> None:
    """What would fail only after the plan is printed: one line before it."""
    from adapterbench.study import launch as L
    if skip_archived and launcher != "local":
        raise UserError("--skip-archived works with --launcher local only: run the workers locally, or "
                        "drop the archived seeds from the study's seeds")
    if launcher == "slurm":      # a partition or a time SLURM would refuse
        L.time_limit(launcher, partition, time_min)


def submit_and_watch(launcher, worker, res, out_dir: Path, watch: str, wait: bool, nodes) -> None:
    """Submit a study's workers through submitit; with `wait`, wait and exit 1 if runs are left."""
    from adapterbench.study import launch as L
    from adapterbench.study.status import status_table
    jobs, logs = L.submit(launcher, worker, res, out_dir)
    console.print(f"submitted {len(jobs)} worker(s) via {launcher}: jobs {', '.join(j.job_id for j in jobs)}; "
                  f"logs in {logs}; recorded in {out_dir / 'launch.json'}")
    console.print(f"watch: {watch}")
    if wait:
        console.print(f"workers done: {L.wait(jobs)}")
        left = [r for r in status_table(nodes) if r.state != "done"]
        if left:
            console.print(f"{len(left)} runs not done (see adapterbench status)")
            raise typer.Exit(1)


def print_skipped(choice, archive: Path) -> None:
    from adapterbench.study.archived import STALE_WHY
    console.print(f"{len(choice.skipped)} runs skipped: {archive} holds them and no run still to do needs them")
    if choice.stale:
        console.print(f"{choice.stale} runs to do have a cell the archive holds under another folder name "
                      f"({STALE_WHY}): they run again")


def print_estimate(nodes, choice) -> None:
    """Run-hours for the runs this command takes (`choice.keep`; all when None), estimated as
    `status` does: with --skip-archived, from the times its archive recorded too."""
    from adapterbench.study.archived import mark_archived
    from adapterbench.study.status import peers_of, remaining, status_table
    rows = status_table(nodes)
    if choice.archive:
        mark_archived(rows, nodes, choice.archive)
    mine = rows if choice.keep is None else [r for r in rows if r.index in choice.keep]
    left = remaining(mine, peers=peers_of(rows))
    console.print(f"estimated: ≈ {left['seconds'] / 3600:.1f} run-hours for {left['estimated']} runs to do"
                  + (f"; {left['unknown']} more have no finished run of their row (or of their task) to go by yet"
                     if left["unknown"] else "") + " (adapterbench status --by-row: per row)", highlight=False)


def print_calibrated(st, nodes, steps: int) -> None:
    """Run-hours per row from training speeds measured here (study/calibrate.py)."""
    from adapterbench.interop.bench import tokens_per_second
    from adapterbench.study.calibrate import estimate
    console.print(f"calibrating: {steps} timed training step(s) per row and task, this process's threads ...")
    rows = estimate(st, nodes, steps, tokens_per_second)
    t = Table("row", "runs to do", "tokens (M)", "tokens/s here", "run-hours at most")
    for r in rows:
        t.add_row(escape(r.row), str(r.runs), f"{r.tokens / 1e6:.1f}",
                  "–" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                  "– (no bench configuration)" if r.seconds is None else f"{r.seconds / 3600:.1f}")
    console.print(t)
    known = [r.seconds for r in rows if r.seconds is not None]
    console.print(f"calibrated: ≈ {sum(known) / 3600:.1f} run-hours at most for {sum(r.runs for r in rows if r.seconds is not None)} "
                  f"runs (every epoch of each budget; early stopping ends runs sooner, scoring comes on top; "
                  f"divide by the workers)", highlight=False)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; anything else is one line naming the value."""
    try:
        i, n = (int(x) for x in text.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard '{text}' must be i/n with 0 <= i < n, e.g. 0/2") from None
    return i, n


def print_plan(nodes, shown=None, study=None) -> None:
    """The plan as a table: every run, or only `shown` (what --only and --skip-archived leave), each
    numbered as in the whole study so that `needs` names the same runs either way."""
    from adapterbench.study.plan import state
    t = Table("#", "stage", "method", "task", "seed", "model", "status", "needs")
    for nd in nodes:
        if shown is not None and nd.index not in shown:
            continue
        t.add_row(str(nd.index), nd.stage, nd.label, nd.task, str(nd.seed), nd.model, state(nd),
                  ",".join(f"#{d}" for d in nd.deps))
    console.print(t)
    for label, chosen in (getattr(study, "chosen", None) or {}).items():
        console.print(f"{label}: lr {chosen['lr']:g} chosen by its sweep ({chosen['by']})", highlight=False)
    for label, why in (getattr(study, "waiting", None) or {}).items():
        console.print(f"{label}: not planned yet, {why}", highlight=False)
    if shown is not None and len(shown) < len(nodes):
        console.print(f"{len(shown)} of the study's {len(nodes)} runs: the others are not in --only's rows "
                      f"(nor needed by them) or are skipped as archived")


@command()
def status(study: Path = typer.Argument(..., help="A study YAML or a shipped study's name."),
           out: Optional[str] = OutOpt,
           by_row: bool = typer.Option(False, "--by-row", help="One line per row (label): runs in each state "
                                                                 "and the run-hours left, instead of every run."),
           archive: Optional[Path] = typer.Option(None, "--archive", help="A results archive (.jsonl): the runs "
                                                  "`run --skip-archived` would skip show as archived, and their "
                                                  "recorded times estimate what is left."),
           todo: bool = typer.Option(False, "--todo", help="List only the runs still to do (running, queued, "
                                                           "failed, blocked); the counts and hours stay the study's."),
           data_dir: Optional[str] = DataOpt, debug: bool = DebugOpt):
    """Every run of a study: done, running, queued, failed, blocked (or archived).

    Running runs show their host, job, heartbeat age and progress; --archive counts the runs an
    archive holds as archived."""
    from adapterbench.study.archived import STALE_WHY
    from adapterbench.study.execute import open_study, require_data
    from adapterbench.study.plan import plan
    from adapterbench.study.status import overview
    st = open_study(shipped("studies", study), out, data_dir, archive)
    require_data(st)
    ov = overview(plan(st), archive)
    title = f"study {st.name} ({st.out_dir})"
    shown = [r for r in ov.rows if r.state not in ("done", "archived")] if todo else ov.rows
    open_rows = {label: ov.left_by_label[label] for label in dict.fromkeys(r.label for r in shown)}
    console.print(_status_by_row(ov.groups, ov.states, title, open_rows) if by_row else _status_by_run(shown, title))
    counts = Counter(r.state for r in ov.rows)
    console.print(", ".join(f"{k} {counts[k]}" for k in ov.states))
    left = ov.left
    if left["estimated"] or left["unknown"]:
        console.print(f"still to run: ≈ {left['seconds'] / 3600:.1f} run-hours for {left['estimated']} runs "
                      f"(a running run: its steps left at its own pace over its last logged steps; else "
                      f"{'the time the archive recorded for its cell, else ' if archive else ''}the median "
                      f"time of the same row and task's finished runs, else a running run's whole time at "
                      f"its pace, else the row's time per training example on its other tasks, else (a "
                      f"multi-task row) the other multi-task rows' runs; divide by the workers)"
                      + (f"; {left['unknown']} runs have no finished or running run to go by" if left["unknown"] else ""))
    for label, why in st.waiting.items():   # rows a sweep still holds back: neither counted nor estimated above
        console.print(f"{label}: not planned yet, {why} (its runs are not counted above)", highlight=False)
    if archive and ov.stale:
        console.print(f"{ov.stale} runs to do have a cell (row, tasks, seed, model) that {archive} holds under "
                      f"another folder name ({STALE_WHY}): they are counted as queued")
    launch = Path(st.out_dir) / "launch.json"
    if launch.is_file():
        rec = read_json(launch)
        console.print(f"last launch: {rec['launcher']} jobs {', '.join(rec['jobs'])} ({rec['submitted']}); "
                      f"logs {rec['log_folder']}")
        if rec["launcher"] == "slurm":
            from adapterbench.study.launch import job_states
            said = job_states(rec["jobs"])
            console.print("SLURM: " + (", ".join(f"{j} {s}" for j, s in sorted(said.items())) or
                                       "no job of that launch in squeue (finished, cancelled or purged)"))


def _status_by_run(rows: list, title: str) -> Table:
    t = Table("#", "stage", "row", "task", "seed", "state", "detail", title=title)
    colour = {"done": "green", "archived": "green", "running": "cyan", "failed": "red", "blocked": "red",
              "queued": "white"}
    for r in rows:
        t.add_row(str(r.index), r.stage, r.label, Path(r.task).stem if "/" in r.task else r.task,
                  str(r.seed), Text(r.state, style=colour[r.state]), r.detail)
    return t


def _status_by_row(groups: dict[str, list], states: tuple, title: str, left_by_label: dict[str, dict]) -> Table:
    """One line per row label: its runs in each state and the run-hours left (study.status.remaining)."""
    t = Table("row", "runs", *states, "run-hours left", title=title)
    for label, left in left_by_label.items():
        mine = groups[label]
        n = Counter(r.state for r in mine)
        hours = f"{left['seconds'] / 3600:.1f}" + (f" (+{left['unknown']} runs ?)" if left["unknown"] else "")
        t.add_row(label, str(len(mine)), *(str(n[k]) for k in states), hours)
    return t


@command()
def archive(runs_dir: Path = typer.Argument(..., help="Folder holding run folders (a study's)."),
            out: Path = typer.Option(..., "--out", callback=named_output, help="The archive to write or update, e.g. docs/results/runs.jsonl."),
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
    from adapterbench.archive import write_archive, write_unfinished
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


@command()
def tune(config: Optional[Path] = ConfigOpt, task: Optional[str] = TaskOpt, model: Optional[str] = ModelOpt,
         method: Optional[str] = MethodOpt, seed: Optional[int] = SeedOpt, data_dir: Optional[str] = DataOpt,
         space: Optional[list[str]] = typer.Option(None, "--space", help="KEY=SPEC, SPEC loguniform(a,b), uniform(a,b), "
                                                   "int(a,b) or choice(a,b,...) (repeatable), e.g. "
                                                   "train.lr=loguniform(1e-5,1e-3)."),
         trials: int = typer.Option(20, "--trials", min=1, max=MAX_TRIALS, help="Trials to finish (complete or pruned), all workers together."),
         out: Path = typer.Option(Path("runs/tune"), "--out", callback=named_output, help="The search's folder: optuna.journal, trials/, "
                                                                   "best.yaml, plots."),
         sampler_seed: int = typer.Option(0, "--sampler-seed", min=0, max=MAX_SEED, help="TPE's seed."),
         launcher: str = typer.Option("local", "--launcher", help="local, submitit-local or slurm."),
         workers: int = typer.Option(1, "--workers", min=1, max=MAX_WORKERS, help="submitit/slurm: workers sharing the journal."),
         partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition."),
         time_min: Optional[int] = typer.Option(None, "--time", min=1, max=MAX_MINUTES, help="Minutes per worker; default: the "
                                                                     "partition's time limit."),
         wait: bool = typer.Option(False, "--wait", help="submitit/slurm: wait for the workers and summarise."),
         overrides: Optional[list[str]] = Overrides, debug: bool = DebugOpt):
    """Search hyperparameters with Optuna (TPE, median pruning) on the held-out slice; every trial is a run."""
    from adapterbench.methods import get_method
    from adapterbench.study import launch as L
    from adapterbench.study import tune as T
    if trials < 1 or workers < 1:
        raise UserError("--trials and --workers must be at least 1")
    dims = T.parse_space(space)
    name, extra = command_line_plugins(method, overrides)
    user = merge_layers(config, options(task, model, name, seed, None, data_dir), extra)
    stage = get_method((user.get("method") or {}).get("name") or "pfeiffer").STAGE
    if launcher == "local":
        res = T.run_trials(user, stage, dims, trials, out, sampler_seed,
                           on_trial=lambda n, text: console.print(text, highlight=False))
        console.print(f"{res['done']} trials done ({res['complete']} complete, {res['pruned']} pruned); best "
                      f"held-out {res['value']:.2f} with {res['best']}", highlight=False)
        console.print(f"best config: {res['config']} (adapterbench {stage} --config {res['config']}); run: "
                      f"{res['run']}; plots: {', '.join(map(str, res['plots'])) or 'none'}", highlight=False)
        return
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
