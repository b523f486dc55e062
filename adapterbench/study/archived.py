"""Resuming a study from a results archive (`run --skip-archived`, `status --archive`): which
planned runs an archive already holds, which it holds under another config (stale), and the
times it recorded, for the estimate of what is left."""

from __future__ import annotations

import json
from pathlib import Path

from adapterbench.archive import read_archive_lines
from adapterbench.config import portable
from adapterbench.errors import UserError
from adapterbench.records import RunRecord, parse_record, recorded_seconds
from adapterbench.study.plan import Node, with_deps


def archived(nodes: list[Node], records: dict[tuple, RunRecord], among: set[int] | None = None,
             matches: dict[int, tuple] | None = None) -> tuple[set[int], int]:
    """(runs to skip, stale count) for a study resuming from a results archive (its `archive_records`).
    Skipped: the runs (of `among`, default all) the archive holds (`archive_matches`) that no run
    still to do needs as a dependency, so a study whose folder was lost retrains only what the
    archive lacks and the weights those runs need (Fusion w/ MT-A needs its MT-A run). Stale: runs
    still to do whose cell (row, tasks, seed, model) the archive holds under another config; they
    run again. `matches`: `archive_matches` already computed for these runs (or more)."""
    pool = set(range(len(nodes))) if among is None else set(among)
    runs = {i for i in pool if nodes[i].stage != "merge"}         # merges: only when a run needs one
    have = runs & set(archive_matches(nodes, records, runs) if matches is None else matches)
    skip = pool - with_deps(nodes, runs - have)
    cells = {record_cell(r) for r in records.values()}
    stale = sum(1 for i in runs - have if node_cell(nodes[i]) in cells)
    return skip, stale


def archive_matches(nodes: list[Node], records: dict[tuple, RunRecord], among) -> dict[int, tuple]:
    """The archive key of each run of `among` the archive holds: the record with its row label and
    folder name, else, for a run that names other runs' folders (a fusion's sources, a merged
    start), a record of its cell that an earlier version named by those folders' full paths
    (before identities were portable) with the same config once they are compared inside the
    output root (`inside_root`). As with other runs archived before tasks had an identity, such a
    match is by config alone: the archive records no data content."""
    out, by_cell = {}, {}
    for key, record in records.items():
        by_cell.setdefault(record_cell(record), []).append(key)
    for i in among:
        nd = nodes[i]
        if (nd.label, nd.folder.name) in records:
            out[i] = (nd.label, nd.folder.name)
        elif names_other_runs(nd) and (mine := inside_root(nd, nodes)) is not None:
            out.update({i: key for key in by_cell.get(node_cell(nd), ()) if archived_inside_root(records[key]) == mine})
    return out


def names_other_runs(node: Node) -> bool:
    """A run whose config names other runs' folders: a fusion's sources, a merged start."""
    return bool(node.config.get("init_from") or (node.config.get("method") or {}).get("adapters"))


def inside_root(node: Node, nodes: list[Node]) -> str | None:
    """A planned run's config hash with the folders it names written inside the output root
    (`_hash_inside`), to compare with `archived_inside_root`."""
    from adapterbench.config import to_dict
    from adapterbench.recipe.stages import resolve
    cfg = to_dict(resolve(node.config, node.stage))
    inside = lambda p: q if (q := portable(p, cfg["out_dir"])).startswith("<out_dir>/") else None  # noqa: E731
    spec = next((nodes[d].config for d in node.deps if nodes[d].stage == "merge"), None)
    return _hash_inside(cfg, inside, spec and (spec["adapters"], spec))


def archived_inside_root(record: RunRecord) -> str | None:
    """An archived run's config hash as `inside_root` makes it. `adapterbench archive` writes the
    folders a config names relative to the folder above the study's ('<study>/extract/...'); a
    merged start is read from the merge's record, whose sources are adapter folders ('.../adapter')."""
    inside = lambda p: "<out_dir>/" + p.split("/", 1)[1] if "/" in p and not p.startswith("/") else None  # noqa: E731
    merge = record.extras.get("merge")
    sources = merge and [s["path"].removesuffix("/adapter") for s in merge.get("sources") or []]
    return _hash_inside(json.loads(json.dumps(record.config)), inside, merge and (sources, merge))


def _hash_inside(cfg: dict, inside, merged: tuple | None) -> str | None:
    """config_hash of `cfg` with a fusion's sources written by `inside` (None: outside the root)
    and a merged start (`init_from`) replaced by what decides it, `merged` = (source folders,
    merge settings): sources, target, strategy, same_track, align_on and weights (None meaning
    equal weights, as `merge` records them). None where a folder lies outside the root or a start
    has no merge to describe it."""
    from adapterbench.config import config_hash
    method = cfg.get("method") or {}
    if method.get("adapters"):
        method["adapters"] = [inside(p) for p in method["adapters"]]
    if cfg.get("init_from"):
        if not merged:
            return None
        paths, how = merged
        cfg["init_from"] = {"sources": [inside(p) for p in paths], "target": how.get("target"),
                            "strategy": how.get("strategy"), "same_track": how.get("same_track"),
                            "align_on": how.get("align_on"),
                            "weights": [float(w) for w in how.get("weights") or [1.0] * len(paths)]}
    named = [*(method.get("adapters") or []), *((cfg.get("init_from") or {}).get("sources") or [])]
    return None if not cfg or None in named else config_hash(cfg, portable_paths=False)


def node_cell(node: Node) -> tuple:
    """A planned run's cell of a results table: (row label, task names, seed, model)."""
    from adapterbench.tasks import load_task
    return node.label, tuple(sorted(load_task(t).name for t in node.task.split(","))), node.seed, node.model


def record_cell(record: RunRecord) -> tuple:
    """An archived run's cell, as `node_cell`."""
    return record.label, tuple(sorted(record.tasks)), record.seed, record.model


# Why a run still to do can have a cell the archive holds under another folder name.
STALE_WHY = "a setting, a default, or a source run it uses has changed since"


def archive_records(archive: Path) -> dict[tuple, RunRecord]:
    """A results archive's records by (row label, run folder name); one clear line when it is missing."""
    if not Path(archive).is_file():
        raise UserError(f"archive {archive} does not exist: pass the .jsonl `adapterbench archive` wrote")
    records = {key: parse_record(json.loads(line), f"{archive} ({key[0]}, {key[1]})")
               for key, line in read_archive_lines(archive).items()}
    return {key: r for key, r in records.items() if r.finished}    # an unfinished run's snapshot is not a result


def mark_archived(rows: list, nodes: list[Node], archive: Path) -> int:
    """Status rows (status_table) of a study resuming from a results archive: the queued runs that
    `run --skip-archived` would skip become 'archived', with the time the archive recorded for
    them (so `remaining` estimates from them). Returns the stale count (see `archived`)."""
    records = archive_records(archive)
    matches = archive_matches(nodes, records, [nd.index for nd in nodes if nd.stage != "merge"])
    skip, stale = archived(nodes, records, matches=matches)          # matched once, used twice
    took = {key: recorded_seconds(record) for key, record in records.items()}
    took_in_cell = {record_cell(record): took[key] for key, record in records.items()}
    for r in rows:
        nd = nodes[r.index]
        if r.state != "queued":
            continue
        own = took.get(matches.get(r.index))
        if r.index in skip:       # (a merge no run to do needs is skipped too; merges are not archived)
            r.state, r.detail, r.seconds = "archived", "", own or 0.0
            if (record := records.get(matches.get(r.index))) is not None:
                r.examples = {t: v.get("train_examples") for t, v in record.tasks.items() if isinstance(v, dict)}
        elif nd.stage != "merge":    # to be rerun: expect what this run, or its cell, took before
            r.expect = own if own is not None else took_in_cell.get(node_cell(nd))
    return stale
