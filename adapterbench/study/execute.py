"""Running a planned study: each run once, dependencies first, shared between workers
through lock files (study.locks); the runs an archive holds or --only leaves out are skipped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from adapterbench.errors import UserError
from adapterbench.fileio import write_json
from adapterbench.recipe.runfolder import RunExists
from adapterbench.records import status_of
from adapterbench.study.archived import archive_records, archived
from adapterbench.study.locks import Heartbeat, try_lock, unlock
from adapterbench.study.plan import Node, Study, load_study, plan, selected, state
from adapterbench.tasks import load_task


def run_merge(node: Node) -> None:
    """A study's merge node: the merged adapter folder, marked done by its metrics.json."""
    from adapterbench.recipe.merge import merge
    c = node.config
    merge(c["adapters"], c["strategy"], c["weights"], node.folder, target=c["target"],
          same_track_only=c["same_track"], include_target=True, align_on=c["align_on"], force=True)
    write_json(node.folder / "metrics.json", {"status": "ok", "stage": "merge", "label": node.label,
                                              "task": c["target"], "main_value": None, "sources": c["adapters"]})


# --- running -------------------------------------------------------------------------------

def execute(study: Study, nodes: list[Node], retry_failed: bool = False, shard: tuple[int, int] = (0, 1),
            poll: float = 10.0, on_event=lambda node, what: None, only: set[int] | None = None,
            wait_for_others: bool = True, replan=lambda: False) -> dict[str, list[int]]:
    """Run every runnable node this worker may take (in `only`, when given); returns indices by outcome.
    Runs that other workers hold, and runs that need them, are waited for (and a holder that died
    is taken over once its lock goes stale); with `wait_for_others=False` they are left to those
    workers ("left") as soon as nothing else can start, so a queue of phases moves on instead of
    idling through another worker's last run. `replan()` is asked after each run: true (a
    learning-rate sweep just decided a row) returns at once, for the caller to plan again."""
    i, n = shard
    mine = [nd for nd in nodes if nd.index % n == i and (only is None or nd.index in only)]
    outcome = {"done": [], "ran": [], "failed": [], "blocked": [], "left": []}
    retried: set[int] = set()
    while True:
        waiting = progressed = False
        for nd in mine:
            what = triage(nd, nodes, outcome, retry_failed and nd.index not in retried, on_event)
            if what == "wait" or (what == "go" and not try_lock(nd)):
                waiting = True
                continue
            if what == "go":
                retried.add(nd.index)
                run_locked(nd, outcome, on_event)
                progressed = True
                if replan():
                    return outcome
        if not waiting:
            return outcome
        if not progressed:
            if not wait_for_others:
                finished = {x for k in ("done", "ran", "failed", "blocked") for x in outcome[k]}
                outcome["left"] = [nd.index for nd in mine if nd.index not in finished]
                return outcome
            time.sleep(poll)


def triage(nd: Node, nodes: list[Node], outcome: dict, retry: bool, on_event) -> str:
    """What to do with a node now: "skip" (settled: recorded in `outcome`), "wait" (running
    elsewhere, or a run it needs is not done) or "go"."""
    if nd.index in outcome["ran"] or nd.index in outcome["failed"] or nd.index in outcome["blocked"]:
        return "skip"
    st = state(nd)
    if st == "done":
        if nd.index not in outcome["done"]:
            outcome["done"].append(nd.index)
        return "skip"
    if st == "failed" and not retry:
        outcome["failed"].append(nd.index)
        on_event(nd, "failed earlier (--retry-failed reruns it)")
        return "skip"
    dep_states = [state(nodes[d]) for d in nd.deps]
    if any(s == "failed" for s in dep_states):
        outcome["blocked"].append(nd.index)
        on_event(nd, "blocked: a run it depends on failed")
        return "skip"
    return "wait" if any(s != "done" for s in dep_states) or st == "running" else "go"


def run_locked(nd: Node, outcome: dict, on_event) -> None:
    """Run a node whose lock this worker holds (heartbeat while it runs), record the outcome and
    unlock; a failure is written into its run folder and never stops the study."""
    from adapterbench.recipe.stages import resolve, train_stage
    try:
        if status_of(nd.folder) == "ok":   # finished by another worker meanwhile
            return
        on_event(nd, "start")
        with Heartbeat(nd):
            if nd.stage == "merge":
                run_merge(nd)
            else:
                train_stage(nd.stage, resolve(nd.config, nd.stage), force=False, show_progress=True,
                            save_attention=nd.stage == "fuse")   # the paper's attention figure
        outcome["ran"].append(nd.index)
        on_event(nd, "ok")
    except RunExists:
        outcome["done"].append(nd.index)
    except UserError as e:
        mark_failed(nd, e)
        outcome["failed"].append(nd.index)
        on_event(nd, f"failed: {e}")
    except Exception as e:  # a bug or a crash in one run must not stop the study
        mark_failed(nd, e)
        outcome["failed"].append(nd.index)
        on_event(nd, f"failed: {type(e).__name__}: {e}")
    finally:
        unlock(nd)


def mark_failed(node: Node, error: BaseException) -> None:
    """A run that failed before its folder existed still gets a `failed` status."""
    if status_of(node.folder) != "failed":
        node.folder.mkdir(parents=True, exist_ok=True)
        write_json(node.folder / "metrics.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def open_study(path: Path, out: str | None = None, data_dir: str | None = None, archive: Path | None = None) -> Study:
    """A study file with the command line's --out and --data-dir laid over it; with `archive`
    (--skip-archived, --archive) the planner also reads finished sweeps from it, so a study whose
    folder was lost still knows the rates its sweeps chose."""
    from adapterbench.study.archived import archive_records
    st = load_study(path)
    if archive:
        st.archived = archive_records(archive)
    if out:
        st.out_dir = out
    if data_dir:
        st.defaults = {**st.defaults, "data": {**st.defaults.get("data", {}), "data_dir": data_dir}}
    return st


def require_data(st: Study) -> None:
    """A study's runs are found by their identity, which hashes each task's data: without the data
    every finished run would look queued. One line instead of a wrong picture."""
    from adapterbench.data import data_files
    data_dir = (st.defaults.get("data") or {}).get("data_dir")
    for name in st.tasks:
        task = load_task(name)
        if task.sources.local is not None and not data_files(task, data_dir):
            raise UserError(f"the data of task {task.name} is not found, and a run's identity hashes its data, so "
                            f"its runs cannot be told apart from runs still to do: pass --data-dir DIR or set "
                            f"ADAPTERBENCH_DATA_DIR (a glue_data-style folder)")


@dataclass
class Choice:
    """Which runs of a plan this command takes: `keep` (None: all), and what --skip-archived
    left out (`skipped` runs the archive holds, `stale` runs it holds under an old folder name)."""
    keep: set[int] | None
    skipped: set[int] = field(default_factory=set)
    stale: int = 0
    archive: Path | None = None      # --skip-archived's archive, to choose again in a grown plan


def choose(nodes: list[Node], only: list[str] | None, skip_archived: Path | None) -> Choice:
    """--only's rows (and the runs they need), less the runs an archive already holds."""
    keep = selected(nodes, only) if only else None
    if not skip_archived:
        return Choice(keep)
    skip, stale = archived(nodes, archive_records(skip_archived), keep)
    return Choice((set(range(len(nodes))) if keep is None else keep) - skip, skip, stale, skip_archived)


def run_here(st: Study, nodes: list[Node], choice: Choice, only: list[str] | None, *, retry_failed: bool,
             shard: tuple[int, int], wait_others: bool, on_event, on_plan) -> dict[str, list[int]]:
    """Execute the plan in this process. A row whose learning rate a sweep chooses is planned once
    its sweep has finished: after each run, plan again if a sweep just decided, and go on with
    the rows it adds (`on_plan(nodes, keep)` shows each new plan)."""
    sweeping = bool(st.waiting)
    replan = lambda: sweeping and len(plan(st)) > len(nodes)   # noqa: E731
    keep = choice.keep
    res = execute(st, nodes, retry_failed=retry_failed, shard=shard, on_event=on_event, only=keep,
                  wait_for_others=wait_others, replan=replan)
    while sweeping and not (res["failed"] or res["blocked"] or res["left"]):
        more = plan(st)
        if len(more) == len(nodes):
            break
        nodes = more
        keep = choose(nodes, only, choice.archive).keep      # the grown plan less what the archive holds
        on_plan(nodes, keep)
        again = execute(st, nodes, retry_failed=retry_failed, shard=shard, on_event=on_event, only=keep,
                        wait_for_others=wait_others, replan=replan)
        res = {k: sorted(set(res[k]) | set(again[k])) for k in again}
    return res
