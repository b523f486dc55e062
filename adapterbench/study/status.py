"""Where a study stands: each run's state and progress (`adapterbench status`) and the
run-hours left."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from adapterbench.errors import UserError
from adapterbench.fileio import read_json
from adapterbench.records import (
    _config,
    checkpoint_step,
    dev_by_epoch,
    recorded_seconds,
)
from adapterbench.study.archived import mark_archived
from adapterbench.study.locks import lock_path, read_lock
from adapterbench.study.plan import Node, state


@dataclass
class StatusRow:
    """One run of a plan as `status` shows it, and what `remaining` estimates its time from."""
    index: int = 0
    stage: str = ""
    label: str = ""
    task: str = ""
    seed: int = 0
    state: str = "queued"               # done | archived | running | queued | failed | blocked
    detail: str = ""                    # host, job, heartbeat, progress, checkpoint; a failure's error
    folder: str = ""
    pace_seconds: float | None = None   # a running or checkpointed run: its steps left at its own pace
    whole_seconds: float | None = None  # a running or checkpointed run: its whole time at its pace
    seconds: float | None = None        # an archived run: the time the archive recorded
    expect: float | None = None         # a run to do again: what it (or its cell) took before
    examples: dict | None = None        # an archived run: its training examples per task


def status_table(nodes: list[Node]) -> list[StatusRow]:
    """Every run of a plan: done / running (host, job, heartbeat age, progress) / queued / failed /
    blocked (a run it needs failed)."""
    states = {nd.index: state(nd) for nd in nodes}
    out = []
    for nd in nodes:
        st, detail, pace, whole = states[nd.index], "", None, None
        if st == "running":
            info = read_lock(lock_path(nd)) or {}
            age = time.time() - float(info.get("heartbeat", time.time()))
            detail = f"{info.get('host')} pid {info.get('pid')} job {info.get('job') or '-'}, heartbeat {age:.0f}s ago"
            rec, train = last_step(nd.folder), _resolved_train(nd.folder)    # its log and config, read once
            detail += progress(rec, train) + dev_by_epoch(nd.folder) + checkpointed(nd.folder)
            pace, whole = _pace(rec, train), _pace(rec, train, whole=True)
        elif st == "pending":
            st = "blocked" if any(states[d] in ("failed", "blocked") for d in nd.deps) else "queued"
            step = checkpoint_step(nd.folder)
            if step is not None:
                detail = f"has a checkpoint at step {step}: resumes" + dev_by_epoch(nd.folder)
                rec, train = last_step(nd.folder), _resolved_train(nd.folder)
                if rec is not None:           # what is left after the checkpoint, at the pace its log shows
                    pace, whole = _pace({**rec, "step": step}, train), _pace(rec, train, whole=True)
        elif st == "failed":
            try:
                detail = str(read_json(nd.folder / "metrics.json").get("error", ""))[:100]
            except Exception:
                detail = ""
        states[nd.index] = st if st != "pending" else states[nd.index]
        out.append(StatusRow(nd.index, nd.stage, nd.label, nd.task, nd.seed, st, detail, str(nd.folder), pace, whole))
    return out


def progress(rec: dict | None, train: dict | None) -> str:
    """Where a running run is, from the last step its log.jsonl recorded (`last_step`) and its
    resolved `train` config: '; epoch 2/3, step 1800/3792, 9.3 samples/s' ('' before its first
    logged step); the pace is the recent one where the log shows it (`recent_pace`); a
    multi-task run adds each task's share of the epoch's examples so far."""
    if rec is None:
        return ""
    epochs = (train or {}).get("epochs")
    of = f"/{rec['steps_total']}" if rec.get("steps_total") else ""
    share = rec.get("sampling_share")            # a multi-task run: who fed the epoch so far
    fed = ("; epoch so far: " + ", ".join(f"{t} {100 * v:.0f}%" for t, v in share.items())
           if isinstance(share, dict) else "")
    return (f"; epoch {int(rec.get('epoch', 0)) + 1}/{epochs or '?'}, step {rec['step']}{of}, "
            f"{_rate(rec):.1f} samples/s{fed}")


RECENT = 20          # step records that make a running run's recent pace


def last_step(folder) -> dict | None:
    """The last training-step record of a run's log.jsonl (step, epoch, samples_per_s and, since
    they are logged, steps_total), or None before the first; with `recent_samples_per_s` added
    where the log shows the pace of this leg's last steps (`recent_pace`)."""
    try:
        with open(Path(folder) / "log.jsonl", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 16384))               # the last records are enough
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    leg = []
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue                      # a line cut by the seek, or one being written
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "samples_per_s" not in rec:
            if rec.get("resumed") and leg:
                break                     # the records before it are an earlier leg's
            continue
        leg.append(rec)
        if len(leg) == RECENT:
            break
    if not leg:
        return None
    recent = recent_pace(leg[::-1])
    return {**leg[0], "recent_samples_per_s": recent} if recent else leg[0]


def recent_pace(records: list[dict]) -> float | None:
    """Samples per second between the first and the last of one leg's step records. Each
    record's samples_per_s is the run's average since step 0 (resumed legs included), so its
    training time so far is step x batch / samples_per_s; the difference of two such times is
    the time the steps between them took, and the batch size cancels out. A run that got faster
    (or slower) mid-way is paced by what it does now, not by its average. None with fewer than
    two records or a zero pace."""
    try:
        a, b = records[0], records[-1]
        steps = int(b["step"]) - int(a["step"])
        span = int(b["step"]) / float(b["samples_per_s"]) - int(a["step"]) / float(a["samples_per_s"])
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return steps / span if steps > 0 and span > 0 else None


def _rate(rec: dict) -> float:
    return float(rec.get("recent_samples_per_s") or rec["samples_per_s"])


def checkpointed(folder) -> str:
    """'; checkpoint at step 400' for a run folder with a complete checkpoint (what a restart
    keeps), else ''."""
    step = checkpoint_step(folder)
    return "" if step is None else f"; checkpoint at step {step}"


def _pace(rec: dict | None, train: dict | None, whole: bool = False) -> float | None:
    """A run's training time still to go at its own measured (recent) pace: the steps its log
    says are left times its batch over its samples/s (`whole`: all its steps). At most: early
    stopping may end it sooner; dev scoring comes on top. None when its log does not say (an
    older run, or no step yet)."""
    train = train or {}
    try:
        left, pace = int(rec["steps_total"]) - (0 if whole else int(rec["step"])), _rate(rec)
        return max(left, 0) * int(train["batch_size"]) / pace if pace > 0 else None
    except (TypeError, KeyError, ValueError):
        return None


def _resolved_train(folder):
    """The `train` section of a run folder's resolved config.yaml (method defaults included)."""
    train = _config(folder).get("train")
    return train if isinstance(train, dict) else None


@dataclass
class Peers:
    """What a plan's finished (or archived) and running runs say about the time of the rest."""
    taken: dict        # (row, stage, task) -> [seconds] of finished runs
    family: dict       # (row less ' lr=V', stage, task) -> [seconds]: a row with its lr-sweep rows
    paced: dict        # (row, stage, task) -> [whole seconds] of running runs at their own pace
    per_example: dict  # (row less ' lr=V', stage) -> [seconds per training example], any task
    examples: dict     # task -> [training examples] of its finished runs, any row
    stage: dict        # (stage, task) -> [seconds, or unfinished runs' whole seconds], any row


def family_of(label: str) -> str:
    return label.split(" lr=")[0]


def peers_of(rows: list[StatusRow]) -> Peers:
    """The finished and running runs of `rows` (a whole plan's), each read once."""
    p = Peers({}, {}, {}, {}, {}, {})
    for r in rows:
        s, examples = finished_cost(r)
        if s is not None:
            p.taken.setdefault((r.label, r.stage, r.task), []).append(s)
            p.family.setdefault((family_of(r.label), r.stage, r.task), []).append(s)
            if examples and all(examples.values()):
                for t, n in examples.items():
                    p.examples.setdefault(t, []).append(n)
                p.per_example.setdefault((family_of(r.label), r.stage), []).append(s / sum(examples.values()))
        if r.state == "running" and r.whole_seconds:
            p.paced.setdefault((r.label, r.stage, r.task), []).append(r.whole_seconds)
        if (took := s if s is not None else r.whole_seconds) is not None:
            p.stage.setdefault((r.stage, r.task), []).append(took)
    return p


def finished_cost(r: StatusRow) -> tuple[float | None, dict | None]:
    """(seconds, training examples per task) of a done or archived run; (None, None) otherwise."""
    if r.state == "archived":
        return r.seconds, r.examples
    if r.state != "done":
        return None, None
    try:
        m = read_json(Path(r.folder) / "metrics.json")
        examples = {t: v.get("train_examples") for t, v in (m.get("tasks") or {}).items()}
        return recorded_seconds(m), examples
    except (UserError, OSError, TypeError, ValueError, AttributeError):
        return None, None


def scaled(r: StatusRow, p: Peers) -> float | None:
    """A run no run of its row has done on its task yet: its row's median time per training
    example (its other tasks' runs) times the examples its task's finished runs trained on."""
    import statistics
    rates = p.per_example.get((family_of(r.label), r.stage))
    counts = [p.examples.get(t) for t in r.task.split(",")]
    if not rates or not all(counts):
        return None
    return statistics.median(rates) * sum(statistics.median(c) for c in counts)


def projected(r: StatusRow, p: Peers) -> float | None:
    """A queued run that no finished run of its row and task times: the whole time of a running
    run of its row and task at that run's pace, else its row's time per training example on
    other tasks (`scaled`), else, for a multi-task row with no run yet, the other multi-task
    rows' runs of its tasks (their steps cost alike, docs/performance.md; single-task methods
    differ too much, a head from full fine-tuning, to stand in for each other)."""
    import statistics
    if paced := p.paced.get((r.label, r.stage, r.task)):
        return statistics.median(paced)
    if (guess := scaled(r, p)) is not None:
        return guess
    if r.stage == "multitask" and (alike := p.stage.get((r.stage, r.task))):
        return statistics.median(alike)
    return None


def remaining(rows: list[StatusRow], now: float | None = None, peers: Peers | None = None) -> dict:
    """What the unfinished runs of a plan (status_table rows) still need, in run-seconds: a
    running run whose log says how many steps it has left, at its own pace (`pace_seconds`, as
    `status_table` read it), and a queued one with a checkpoint, its steps
    after the checkpoint at the pace its log shows;
    any other queued or running run by what the archive recorded for its cell (`mark_archived`)
    or else by the median time of the finished (or archived) runs of the same row (or its
    lr-sweep rows), stage and task (other seeds), less what a running run has spent in its
    current leg; a queued run with neither, as `projected`. `peers`: what the whole plan's runs
    say (`peers_of`), when `rows` is part of it. Returns
    {"seconds", "estimated": runs estimated, "unknown": runs with no finished or running run to go by}."""
    import statistics
    now = time.time() if now is None else now
    p = peers or peers_of(rows)
    seconds, estimated, unknown = 0.0, 0, 0
    for r in rows:
        if r.state not in ("queued", "running"):
            continue
        if r.stage == "merge":        # a merge takes seconds
            estimated += 1
            continue
        pace = r.pace_seconds
        if pace is not None:      # a running (or checkpointed) run's own pace: this machine's, not the peers'
            seconds += pace
            estimated += 1
            continue
        same = p.taken.get((r.label, r.stage, r.task)) or p.family.get((family_of(r.label), r.stage, r.task))
        if r.expect is None and not same:
            guess = projected(r, p) if r.state == "queued" else None
            if guess is not None:
                seconds += guess
                estimated += 1
            else:
                unknown += 1
            continue
        need = r.expect if r.expect is not None else statistics.median(same)
        if r.state == "running":
            try:
                need -= now - float(read_json(Path(r.folder) / "metrics.json").get("started", now))
            except (UserError, OSError, TypeError, ValueError):
                pass                                   # no start time yet: count the whole run
        seconds += max(need, 0.0)
        estimated += 1
    return {"seconds": seconds, "estimated": estimated, "unknown": unknown}


@dataclass
class Overview:
    """A study's runs for `status`: one row per run (state, detail), the states shown, the rows
    grouped by label with each label's time left, and the study's total left."""
    rows: list[StatusRow]
    states: tuple[str, ...]
    groups: dict[str, list[StatusRow]]
    left_by_label: dict[str, dict]
    left: dict
    stale: int = 0        # with an archive: runs to do whose cell it holds under an old folder name


def overview(nodes: list[Node], archive: Path | None = None) -> Overview:
    """Every run's state (with `archive`: the runs it holds count as archived) and the run-hours
    left, summed over rows (`remaining` groups by row, so each run is read once)."""

    rows = status_table(nodes)
    states = ("done", "running", "queued", "failed", "blocked")
    stale = 0
    if archive:
        stale = mark_archived(rows, nodes, archive)
        states = ("done", "archived", *states[1:])
    groups: dict[str, list[StatusRow]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    peers = peers_of(rows)
    by_label = {label: remaining(mine, peers=peers) for label, mine in groups.items()}
    left = {k: sum(x[k] for x in by_label.values()) for k in ("seconds", "estimated", "unknown")}
    return Overview(rows, states, groups, by_label, left, stale)
