"""Results archives: every finished run of a folder as one JSON line (`write_archive`), updated
in place without losing the lines of runs the folder no longer holds, and the progress of
unfinished runs (`write_unfinished`). Each run's per-epoch, per-example predictions are kept
beside the archive, gzipped, one file per row (`docs/results/fair.jsonl` ->
`docs/results/fair.predictions/<row>.jsonl.gz`): an archive line names its file
(`predictions_file`), so the archive stays small and readable and `read_predictions` gives them
back."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from adapterbench.errors import UserError
from adapterbench.fileio import atomic_write
from adapterbench.records import (
    _attempt,
    _config,
    _label,
    archive_record,
    iter_runs,
    status_of,
    unfinished_record,
)


def relative_to(value, bases: tuple[Path, ...]):
    """`value` (a record: dicts, lists, strings) with every absolute path inside one of `bases`
    written relative to it, so that an archive names no machine's folders; `find_from` still
    finds them from any run folder below the base."""
    if isinstance(value, dict):
        return {k: relative_to(v, bases) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to(v, bases) for v in value]
    if isinstance(value, str):
        base = next((str(b) for b in bases if value.startswith(f"{b}{os.sep}")), None)
        return value[len(base) + 1:] if base else value
    return value


def write_archive(root: Path, out: Path, replace: bool = False) -> tuple[int, int]:
    """Every finished run under `root` as one JSON line each, in a stable order. An existing
    archive at `out` is updated, not overwritten: its lines for runs `root` does not hold (a
    study folder that was lost or moved, runs archived from another machine) are kept, and a run
    in both is written from `root`. `replace` writes `root`'s runs alone. Returns (runs from
    `root`, lines kept). Paths inside the study are written relative to the folder above `root`
    ('reproduce_full/...')."""
    bases = (Path(root).absolute().parent, Path(root).resolve().parent)   # as configs wrote it, or resolved
    folders = list(iter_runs(root))
    if not folders:
        raise UserError(f"no run folder under {root} (none holds a metrics.json): pass the folder a study "
                        f"or stage wrote, e.g. runs/<study>")
    fresh = {archive_key(r): relative_to(r, bases) for r in map(archive_record, folders) if r}
    if replace and not fresh and Path(out).is_file() and Path(out).read_text().strip():
        raise UserError(f"--replace would empty {out}: {root} has no finished run yet; leave out --replace, "
                        f"or pass the folder whose runs should replace the archive's")
    with folder_lock(Path(out).parent):     # two `archive` commands into one file: one after the other
        old = read_archive_lines(out, fix="name another --out (--replace replaces a results archive, no other file)"
                                 if replace else "pass --replace to write only this folder's runs")
        kept = {} if replace else {k: json.loads(line) for k, line in old.items() if k not in fresh}
        lines = store_predictions(Path(out), {**kept, **fresh})
        atomic_write(out, "".join(line + "\n" for line in lines))
    return len(fresh), len(kept)


PREDICTIONS = ".predictions"


def predictions_folder(archive: Path) -> Path:
    """Where an archive's predictions live: fair.jsonl -> fair.predictions/ beside it."""
    return Path(archive).with_name(Path(archive).stem + PREDICTIONS)


def shard_name(record: dict) -> str:
    """A record's predictions file: one per row, its sweep runs with it ('full lr=2e-05' -> full.jsonl.gz)."""
    row = str(record.get("label") or record.get("method") or "runs").split()[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", row) + ".jsonl.gz"


def store_predictions(archive: Path, records: dict[tuple, dict]) -> list[str]:
    """The archive's lines for `records`, each record's predictions moved to its row's gzipped
    file (written here, byte-identical for the same content) and named by `predictions_file`. A
    record that already points at a file keeps the predictions that file holds; a file no
    record names any more is removed."""
    old = read_shards(archive, {Path(r["predictions_file"]).name for r in records.values()
                                if isinstance(r.get("predictions_file"), str)})
    folder, shards = predictions_folder(archive), defaultdict(list)
    for key, record in records.items():
        predictions = record.pop("predictions", None)
        if record.pop("predictions_file", None) is not None and predictions is None:
            predictions = old.get(key)
        if predictions is not None:
            name = shard_name(record)
            record["predictions_file"] = f"{folder.name}/{name}"
            shards[name].append(json.dumps({"label": key[0], "run": key[1], "predictions": predictions},
                                           sort_keys=True))
    for name, lines in shards.items():
        atomic_write(folder / name, gzip.compress("".join(f"{line}\n" for line in sorted(lines)).encode(), mtime=0))
    for stale in folder.glob("*.jsonl.gz") if folder.is_dir() else ():
        if stale.name not in shards:
            stale.unlink()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in records.values())


def read_predictions(archive: Path) -> dict[tuple, dict]:
    """Every archived run's per-epoch predictions (`epoch_predictions.json` as the run wrote it)
    by `archive_key`: from the files the archive's lines name, or inline in an older archive."""
    archive, out, files = Path(archive), {}, set()
    for key, line in read_archive_lines(archive).items():
        record = json.loads(line)
        if isinstance(record.get("predictions"), dict):
            out[key] = record["predictions"]
        elif isinstance(record.get("predictions_file"), str):
            files.add(Path(record["predictions_file"]).name)   # always inside the archive's own folder
    return {**out, **read_shards(archive, files)}


def read_shards(archive: Path, names: set[str]) -> dict[tuple, dict]:
    """The predictions in the archive's files `names` (inside its predictions folder), by
    `archive_key`; a missing or damaged file is one line naming it and the way out."""
    out = {}
    for name in sorted(names):
        path = predictions_folder(archive) / name
        try:
            lines = gzip.decompress(path.read_bytes()).decode().splitlines()
            out.update({(r["label"], r["run"]): r["predictions"] for r in map(json.loads, lines)})
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} (the predictions {archive} names) is missing or damaged ({e}): restore it "
                            f"(git checkout {path}), or archive the study folder again with --replace") from None
    return out


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on a folder (flock on the folder itself: no lock file left behind), so a
    read-modify-write of a file in it never interleaves with another process's."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def archive_key(record: dict) -> tuple:
    """What makes two archive lines the same run: its row label and its folder name (model,
    seed and config hash)."""
    return record.get("label") or record.get("method"), record.get("run")


def read_archive_lines(path: Path, key=archive_key, fix: str = "pass --replace to write only this folder's runs"
                       ) -> dict[tuple, str]:
    """An archive's lines by `key` (`archive_key`; none when the file does not exist yet); a bad
    line is named, with `fix` as the way out."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i}: not valid JSON ({e.msg}): mend or delete that line, or "
                            f"{fix}") from None
        if not isinstance(record, dict) or "run" not in record:
            raise UserError(f"{path} line {i}: not an archive record (no 'run'): is {path} an archive? "
                            f"Name another file, or {fix}")
        out[key(record)] = line
    return out



def unfinished_key(record: dict) -> tuple:
    """What makes two lines of an unfinished-runs file the same attempt of a run: its row label,
    folder name and when its folder was created."""
    return record.get("label"), record.get("run"), record.get("attempt")


def write_unfinished(root: Path, out: Path) -> tuple[int, int, int]:
    """`archive --unfinished`: every unfinished run under `root` (`unfinished_record`) as one JSON
    line of `out`, updated as the archive is: lines for attempts `root` does not hold (a study
    folder that was lost) are kept, an attempt in both is written from `root` (its newer
    snapshot), and the line of an attempt that has since finished is dropped (its result is in
    the archive). Paths inside the study are written relative to the folder above `root`.
    Returns (attempts from `root`, lines kept, lines dropped)."""
    bases = (Path(root).absolute().parent, Path(root).resolve().parent)
    fresh, done = {}, set()
    for folder in iter_runs(root):
        record = unfinished_record(folder)
        if record is not None:
            fresh[unfinished_key(record)] = json.dumps(relative_to(record, bases), sort_keys=True, default=str)
        elif status_of(folder) == "ok":
            done.add((_label(_config(folder)), folder.name, _attempt(folder)))
    with folder_lock(Path(out).parent):
        old = read_archive_lines(out, key=unfinished_key, fix=f"delete {out} to start it anew")
        kept = {k: line for k, line in old.items() if k not in fresh and k not in done}
        atomic_write(out, "".join(line + "\n" for line in sorted([*fresh.values(), *kept.values()])))
    return len(fresh), len(kept), sum(1 for k in old if k in done)

