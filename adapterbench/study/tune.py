"""`adapterbench tune`: hyperparameter search with Optuna, decided on the held-out slice only.

Each trial is an ordinary run (its own run folder under `<out>/trials`, so it resumes, archives
and reports like any run) whose config is the user's with the trial's values set. The search is
TPE with a fixed seed; a trial is pruned (median pruner) on its per-epoch held-out score, never
on dev. The search lives in `<out>/optuna.journal` (Optuna's journal file storage, safe on a
shared filesystem), so several workers (`--launcher slurm --workers N`) share it and a rerun
goes on where it stopped: finished and pruned trials count, a trial whose process died is tried
again with the same values (its run folder resumes from its checkpoint). At the end: the best
trial's values and held-out score, the best config as a run config file (`best.yaml`, for
`extract --config`) and the optimization history and parameter importances as PNG.

A space is `KEY=SPEC`, KEY a config key (train.lr, method.reduction_factor, ...) and SPEC one of
`loguniform(a,b)`, `uniform(a,b)`, `int(a,b)` or `choice(a,b,...)`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from adapterbench.errors import UserError

SPEC = re.compile(r"^(loguniform|uniform|int|choice)\((.*)\)$")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    values: tuple

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")


def parse_space(texts: list[str]) -> list[Dimension]:
    """`--space` values as dimensions; a bad one is one line naming it and the forms allowed."""
    import yaml
    forms = "loguniform(a,b), uniform(a,b), int(a,b) or choice(a,b,...)"
    out, seen = [], set()
    for text in texts or []:
        key, eq, spec = text.partition("=")
        key, spec = key.strip(), spec.strip().replace(" ", "")
        m = SPEC.match(spec)
        if not eq or not key or any(not p for p in key.split(".")) or not m:
            raise UserError(f"--space '{text}' must be KEY=SPEC with SPEC one of {forms}, e.g. train.lr=loguniform(1e-5,1e-3)")
        if key in seen:
            raise UserError(f"--space names '{key}' twice: give each key once")
        seen.add(key)
        kind, args = m.group(1), [a for a in m.group(2).split(",") if a != ""]
        try:
            values = tuple(_value(a) for a in args)
        except yaml.YAMLError:
            raise UserError(f"--space '{text}': cannot read its values") from None
        if kind == "choice":
            if not values or len(set(map(str, values))) != len(values):
                raise UserError(f"--space '{text}': choice needs distinct values, e.g. choice(16,64)")
        else:
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise UserError(f"--space '{text}': {kind} takes two numbers (low, high)")
            lo, hi = values
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise UserError(f"--space '{text}': the range is empty: give low < high")
            if kind == "loguniform" and lo <= 0:
                raise UserError(f"--space '{text}': loguniform needs low > 0")
            if kind == "int":
                if not all(float(v).is_integer() for v in values):
                    raise UserError(f"--space '{text}': int takes two integers")
                values = (int(lo), int(hi))
            else:
                values = (float(lo), float(hi))
        out.append(Dimension(key, kind, values))
    if not out:
        raise UserError(f"give at least one --space KEY=SPEC ({forms})")
    return out


def _value(text: str):
    """A space value: an int, a float (1e-4 included, which YAML reads as text), else YAML's reading."""
    import yaml
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def storage(out: Path):
    try:
        from optuna.storages import JournalStorage
    except ImportError:
        raise UserError("adapterbench tune needs optuna: pip install 'optuna>=4'") from None
    from optuna.storages.journal import JournalFileBackend
    out.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(out / "optuna.journal")))


def open_study(out: Path, seed: int, direction: str):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # a failed trial: our own line (give_up)
    return optuna.create_study(study_name="tune", storage=storage(out), load_if_exists=True, direction=direction,
                               sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))


def trial_config(user: dict, stage: str, values: dict, out: Path):
    """The trial's RunConfig: the user's layers with the trial's values; unknown keys are one line."""
    import copy

    from adapterbench.config import parse_override, set_path
    from adapterbench.recipe.stages import resolve
    tree = copy.deepcopy(user)
    for key, value in values.items():
        keys, _ = parse_override(f"{key}=0")
        set_path(tree, keys, value)
    tree["out_dir"] = str(out / "trials")
    tree.setdefault("label", f"{(tree.get('method') or {}).get('name', '')} (tune)")
    cfg = resolve(tree, stage)
    if cfg.train.selection != "heldout":
        raise UserError("tune chooses on the held-out slice: drop train.selection (or set it to heldout)")
    return cfg


def objective_value(folder: Path) -> float:
    import json
    m = json.loads((folder / "metrics.json").read_text())
    held = [t["heldout"][t["main_metric"]] for t in m["tasks"].values()]
    return sum(held) / len(held)


def run_trials(user: dict, stage: str, space: list[Dimension], trials: int, out: Path, seed: int = 0,
               on_trial=lambda number, text: None) -> dict:
    """Run trials until `trials` have finished (complete or pruned) in the journal; returns the
    summary. A disk that refuses optuna's journal (it names no file) is named by its path."""
    from adapterbench.fileio import naming
    with naming(Path(out) / "optuna.journal"):
        return _run_trials(user, stage, space, trials, out, seed, on_trial)


def _run_trials(user: dict, stage: str, space: list[Dimension], trials: int, out: Path, seed: int,
                on_trial) -> dict:
    import optuna
    from optuna.trial import TrialState

    from adapterbench.recipe.runfolder import RunExists
    from adapterbench.recipe.stages import train_stage
    from adapterbench.recipe.stages import tasks_of
    for d in space:                                   # every key checked before the first trial
        trial_config(user, stage, {d.key: d.values[0]}, out)
    tasks_of(trial_config(user, stage, {}, out))      # and the tasks: named, found, each once
    study = open_study(out, seed, "maximize")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING and not locked_elsewhere(t):   # its process died: again, same values
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)

    def objective(trial):
        values = {d.key: d.suggest(trial) for d in space}
        cfg = trial_config(user, stage, values, out)
        trial.set_user_attr("pid", __import__("os").getpid())
        trial.set_user_attr("host", __import__("socket").gethostname())

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if epoch + 1 < cfg.train.epochs and trial.should_prune():   # a finished run is never pruned
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (held-out {value:.2f})")
        try:
            folder = train_stage(stage, cfg, show_progress=False, epoch_hook=report)
        except RunExists as e:
            folder = e.folder
        except UserError as e:
            failures.append(str(e))
            raise
        failures.clear()
        trial.set_user_attr("run", str(folder))
        value = objective_value(folder)
        on_trial(trial.number, f"trial {trial.number}: held-out {value:.2f} with {values} ({folder})")
        return value

    failures: list[str] = []           # this process's trials that failed in a row

    def give_up(study, trial) -> None:
        if len(failures) >= FAILURES_IN_A_ROW:
            study.stop()

    done = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))  # noqa: E731
    if done() < trials:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
            trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), give_up], catch=(UserError,))
    if len(failures) >= FAILURES_IN_A_ROW:    # every value fails alike: the input, not the search
        raise UserError(f"{len(failures)} trials in a row failed, the last with: {failures[-1]}")
    return summarize(study, user, stage, out)


FAILURES_IN_A_ROW = 3   # a trial may fail on its values (a learning rate that diverges); three in a row stop the search


def locked_elsewhere(trial) -> bool:
    """A RUNNING trial of another live process on this host, or of another host (left alone)."""
    import os
    import socket
    attrs = trial.user_attrs
    if attrs.get("host") != socket.gethostname():
        return bool(attrs.get("host"))
    pid = attrs.get("pid")
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


def summarize(study, user: dict, stage: str, out: Path) -> dict:
    """The best trial, best.yaml and the plots."""
    import yaml
    from optuna.trial import TrialState

    from adapterbench.fileio import atomic_write
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if not finished:
        raise UserError(f"no trial of {out / 'optuna.journal'} finished ({len(pruned)} pruned): run more --trials")
    best = study.best_trial
    config = dict(user)
    for key, value in best.params.items():
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    config.pop("out_dir", None)
    from adapterbench.recipe.stages import STAGE_DEFAULT_METHOD
    config["method"] = {**(config.get("method") or {})}
    config["method"].setdefault("name", STAGE_DEFAULT_METHOD[stage])   # the file names its method
    atomic_write(out / "best.yaml", f"# the best of {len(finished)} trials (held-out {best.value:.4f}): "
                                    f"adapterbench {stage} --config {out / 'best.yaml'}\n"
                 + yaml.safe_dump(config, sort_keys=False))
    plots = write_plots(study, out)
    return {"done": len(finished) + len(pruned), "complete": len(finished), "pruned": len(pruned),
            "best": best.params, "value": best.value, "run": best.user_attrs.get("run"), "config": out / "best.yaml",
            "plots": plots}


def write_plots(study, out: Path) -> list[Path]:
    import io
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    from adapterbench.fileio import atomic_write
    made = []
    for name, draw in (("optimization_history.png", ov.plot_optimization_history),
                       ("param_importances.png", ov.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
        except (ValueError, RuntimeError):   # importances need two finished trials that differ
            continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write(out / name, buf.getvalue())
        made.append(out / name)
    return made


class TuneWorker:
    """One tune worker (a submitit job): trials from the shared journal until enough have finished."""

    def __init__(self, user: dict, stage: str, space: list[Dimension], trials: int, out: str, seed: int):
        self.user, self.stage, self.space, self.trials, self.out, self.seed = user, stage, space, trials, out, seed

    def __call__(self, worker: int = 0) -> dict:
        from adapterbench.methods import METHODS
        from adapterbench.methods.plugins import register_from_env
        register_from_env(METHODS)
        res = run_trials(self.user, self.stage, self.space, self.trials, Path(self.out), self.seed + worker,
                         on_trial=lambda n, text: print(text, flush=True))
        return {"done": res["done"]}
