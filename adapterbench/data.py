"""Load a task's splits (local glue_data-style files, else the Hugging Face Hub), tokenize,
and batch with dynamic padding.

An example is a dict: `text` (tuple of one or two strings), `label` (int class index,
float score, or None on unlabeled test splits) and `id`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import torch

from adapterbench.errors import UserError
from adapterbench.tasks import FileSpec, TaskSpec

SPLITS = ("train", "dev", "test")
csv.field_size_limit(sys.maxsize)


def resolve_data_dir(configured: str | None) -> Path | None:
    value = configured or os.environ.get("ADAPTERBENCH_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_splits(task: TaskSpec, data_dir: str | None, splits=("train", "dev"),
                allow_hub: bool = True) -> dict[str, list[dict]]:
    """Examples per split, from the local copy if there is one, else (unless `allow_hub` is
    False) from the Hub."""
    root = resolve_data_dir(data_dir)
    local = task.sources.local
    folder = _local_folder(task, root) if local else None
    if folder is not None:
        return {s: read_local_split(task, folder, s) for s in splits}
    if task.sources.hub is not None and allow_hub:
        return {s: read_hub_split(task, s, root) for s in splits}
    hint = f"under {root}" if root else "(no data_dir is set)"
    raise UserError(f"task {task.name}: local files not found {hint}: set data.data_dir or "
                    f"ADAPTERBENCH_DATA_DIR to a folder holding {local.dir}/")


def _local_folder(task: TaskSpec, root: Path | None) -> Path | None:
    rel = Path(task.sources.local.dir)
    candidates = [rel] if rel.is_absolute() else []
    if not rel.is_absolute():
        if root is not None:
            candidates.append(root / rel)
        candidates.append(Path(task.path).parent / rel)
    return next((c for c in candidates if c.is_dir()), None)


# --- local files ---------------------------------------------------------------------------

def read_local_split(task: TaskSpec, folder: Path, split: str) -> list[dict]:
    src = task.sources.local
    if src.split_column:
        if split not in src.split_values:
            raise UserError(f"task {task.name}: sources.local.split_values has no '{split}' entry")
        spec = _file_spec(src.files.get("all") or next(iter(src.files.values())))
        rows = read_rows(folder / spec.path, src.format, spec.header)
        rows = [(n, r) for n, r in rows if r.get(src.split_column) == str(src.split_values[split])]
        path = folder / spec.path
    else:
        if split not in src.files:
            raise UserError(f"task {task.name}: sources.local.files has no '{split}' file")
        spec = _file_spec(src.files[split])
        path = folder / spec.path
        rows = read_rows(path, src.format, spec.header)
    if not rows:
        raise UserError(f"{path}: split '{split}' of task {task.name} is empty: check the file")
    return [to_example(task, path, n, row, split) for n, row in rows]


def data_files(task: TaskSpec, data_dir: str | None) -> list[Path]:
    """The local files a task reads (empty when it reads from the Hub)."""
    local = task.sources.local
    folder = _local_folder(task, resolve_data_dir(data_dir)) if local else None
    if folder is None:
        return hub_folder_files(task)
    # a split whose file is absent (a user's task without a test file) is not read: not hashed either
    return sorted({folder / _file_spec(v).path for v in local.files.values()} - missing_files(task, folder))


def missing_files(task: TaskSpec, folder: Path) -> set:
    return {folder / _file_spec(v).path for v in task.sources.local.files.values()
            if not (folder / _file_spec(v).path).is_file()}


def hub_folder_files(task: TaskSpec) -> list[Path]:
    """The files of a hub source that is a local `datasets` folder (its content is the data)."""
    hub = task.sources.hub
    if hub is None or not Path(hub.path).expanduser().is_dir():
        return []
    return sorted(p for p in Path(hub.path).expanduser().rglob("*") if p.is_file() and not p.name.startswith("."))


_FILE_HASHES: dict[tuple, str] = {}


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's content, cached (in memory and under the cache folder) by path, size,
    modification time, inode and change time, so a study plans hundreds of runs without rereading
    its data. The change time is the kernel's (no tool sets it back), so an edit that keeps the
    size and resets the modification time is still seen."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    store = cache_root() / "file-hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    label = "|".join(map(str, key))
    if label not in known:
        from adapterbench.fileio import file_sha256
        known[label] = file_sha256(path)
        try:
            from adapterbench.fileio import write_json
            write_json(store, known)
        except Exception:  # a read-only cache only costs time
            pass
    _FILE_HASHES[key] = known[label]
    return known[label]


def task_identity(spec: TaskSpec, data_dir: str | None) -> dict:
    """What of a task decides a run's result: its definition (every field but where the YAML
    lies and its description) and the content of the data files it reads (or the Hub dataset
    it names). The same YAML by any path has one identity; an edited YAML or data file another."""
    import hashlib
    import json
    from dataclasses import asdict
    definition = {k: v for k, v in asdict(spec).items() if k not in ("path", "include", "description")}
    hub = definition["sources"].get("hub")
    for key, neutral in (("label_map", {}), ("revision", None)):   # keys added later: at their defaults,
        if hub and hub.get(key) == neutral:                       # identities stay as they were
            del hub[key]
    found = data_files(spec, data_dir)
    base = Path(spec.sources.hub.path).expanduser() if spec.sources.hub and hub_folder_files(spec) == found else None
    files = {(p.relative_to(base).as_posix() if base else p.name): file_fingerprint(p) for p in found}
    if not files and spec.sources.hub is not None:
        hub = spec.sources.hub
        files = {"hub": f"{hub.path}/{hub.name or ''}" + (f"@{hub.revision}" if hub.revision else "")}
    blob = json.dumps({"definition": definition, "data": files}, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(blob.encode()).hexdigest()[:16], "data": files}


def _file_spec(value) -> FileSpec:
    return FileSpec(path=value) if isinstance(value, str) else FileSpec(**value)


def read_rows(path: Path, fmt: str, header: list[str] | None) -> list[tuple[int, dict]]:
    """(line number, row dict) pairs. TSV quoting is off (GLUE texts hold stray quotes)."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: check data.data_dir / ADAPTERBENCH_DATA_DIR")
    try:
        text = path.read_text(encoding="utf-8-sig")  # MRPC starts with a BOM
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}): re-save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    import io
    dialect = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else dict(delimiter=",")
    # the csv module splits rows (\n, \r\n, \r; newlines inside quoted CSV fields stay in the field);
    # str.splitlines would also split on U+2028, form feeds and other characters legal in a text
    reader = csv.reader(io.StringIO(text, newline=""), **dialect)
    names = header or next(reader, None)
    if not names:
        return []
    other = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "bar"}
    sep = "\t" if fmt == "tsv" else ","
    if len(names) == 1 and not header and any(d in names[0] for d in other if d != sep):
        found = next(other[d] for d in other if d != sep and d in names[0])
        raise UserError(f"{path}: the header '{names[0][:40]}' is one column; the file looks {found}-separated, "
                        f"not {other[sep]}-separated: set sources.local.format to match (tsv or csv)")
    rows = []
    for values in reader:
        lineno = reader.line_num
        if not values or values == [""]:
            continue
        if len(values) != len(names):
            raise UserError(f"{path} line {lineno}: {len(values)} fields where the header has "
                            f"{len(names)}: fix or remove the malformed row")
        rows.append((lineno, dict(zip(names, values))))
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):   # not splitlines: U+2028 is legal inside JSON
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg}): fix the row") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {lineno}: a JSONL row must be an object with named fields, "
                            f"got {type(row).__name__}: fix the row")
        rows.append((lineno, row))
    return rows


def to_example(task: TaskSpec, path, lineno: int, row: dict, split: str) -> dict:
    cols = task.sources.local.columns if task.sources.local else {}
    where = f"{path} line {lineno}"
    text = []
    for name in task.text_columns:
        col = cols.get(name, name)
        if col not in row:
            raise UserError(f"{where}: column '{col}' (text '{name}') is missing; columns are "
                            f"{', '.join(map(str, row))}: fix sources.local.columns")
        if not isinstance(row[col], (str, int, float)) or isinstance(row[col], bool):   # JSONL null, true, lists
            raise UserError(f"{where}: text column '{col}' holds {row[col]!r}, not text: fix or drop the row")
        text.append(str(row[col]))
    label_col = cols.get(task.label_column, task.label_column)
    raw = row.get(label_col)
    if raw is None or raw == "":
        if split != "test":
            raise UserError(f"{where}: no label in column '{label_col}' of the {split} split")
        label = None
    else:
        label = parse_label(task, raw, where)
    ident = row.get(cols.get(task.id_column, task.id_column)) if task.id_column else None
    return {"text": tuple(text), "label": label, "id": ident if ident is not None else lineno}


def parse_label(task: TaskSpec, raw, where: str):
    if task.regression:
        # a number as a file writes it: not JSON true (1.0) nor Python's '4_5' (45.0)
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)) or (isinstance(raw, str) and (
                "_" in raw or not raw.strip())):
            raise UserError(f"{where}: score {raw!r} is not a number") from None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: score {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: score {raw!r} is not finite: fix or drop the row")
        return value
    if isinstance(raw, (bool, list, dict)):       # JSON true would read as "True", a list as its text
        raise UserError(f"{where}: label {raw!r} is not one of the task's labels {task.labels}: fix the row")
    mapping = task.sources.local.label_map if task.sources.local else {}
    name = str(mapping.get(str(raw), raw))
    if name not in task.labels:
        raise UserError(f"{where}: label {raw!r} is not one of the task's labels {task.labels}: "
                        f"fix the row or the task's labels/label_map")
    return task.labels.index(name)


# --- Hugging Face Hub ----------------------------------------------------------------------

def open_hub_split(task: TaskSpec, split: str, root: Path | None):
    """The `datasets` split a hub source names: a Hub id (at `revision`), or a local folder
    (`save_to_disk`'s, or parquet/csv/json files `load_dataset` reads)."""
    hub = task.sources.hub
    name = hub.splits.get(split, {"dev": "validation"}.get(split, split))
    import datasets
    local = Path(hub.path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            data = datasets.load_from_disk(str(local))
            return data[name] if isinstance(data, datasets.DatasetDict) else data
        return datasets.load_dataset(hub.path, hub.name, split=name, revision=None if local.is_dir() else hub.revision)
    except Exception as e:  # offline, unknown dataset or split, ...
        src = task.sources.local
        hint = f"no local copy ({src.dir}/ under {root or 'no data_dir'}) and " if src else ""
        raise UserError(f"task {task.name}: {hint}the Hub source {hub.path}/{hub.name or ''} split '{name}' "
                        f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}): set "
                        f"data.data_dir or ADAPTERBENCH_DATA_DIR, or fix sources.hub") from None


def read_hub_split(task: TaskSpec, split: str, root: Path | None) -> list[dict]:
    """A hub source's split as examples: its columns through `sources.hub.columns`, its labels
    by name (ClassLabel names or string labels, through `label_map`) or, for class indices
    without names, as the task's label positions; a column or label that is not there is one
    line naming it and what the dataset has."""
    ds = open_hub_split(task, split, root)
    hub = task.sources.hub
    features = getattr(ds, "features", None) or {}
    columns = list(getattr(ds, "column_names", None) or features)
    col = lambda c: hub.columns.get(c, c)   # noqa: E731
    missing = [col(c) for c in (*task.text_columns, task.label_column) if col(c) not in columns]
    if missing:
        raise UserError(f"task {task.name}: the Hub dataset {hub.path}/{hub.name or ''} has no column "
                        f"'{missing[0]}' (it has {', '.join(columns)}): map it in sources.hub.columns, "
                        f"e.g. {{{task.text_columns[0]}: {columns[0]}}}")
    names = getattr(features.get(col(task.label_column)), "names", None)
    out = []
    for i, row in enumerate(ds):
        text = tuple(str(row[col(c)]) for c in task.text_columns)
        label = hub_label(task, row[col(task.label_column)], names)
        out.append({"text": text, "label": label, "id": row.get(col("id"), row.get("idx", i))})
    return out


def hub_label(task: TaskSpec, raw, names: list[str] | None):
    """One hub label as the task's: None for an unlabeled row (GLUE test: -1), a float for
    regression, else the index of the task label it names."""
    if raw is None or (not task.regression and isinstance(raw, int) and raw < 0):
        return None
    if task.regression:
        return float(raw)
    hub = task.sources.hub
    name = names[raw] if isinstance(raw, int) and names and hub.label_map else raw
    if isinstance(name, str):
        mapped = str(hub.label_map.get(name, name))
        labels = [str(x) for x in task.labels]
        if mapped not in labels:
            raise UserError(f"task {task.name}: the Hub label '{name}' is none of the task's labels "
                            f"({', '.join(labels)}): add it to sources.hub.label_map")
        return labels.index(mapped)
    if not 0 <= int(raw) < len(task.labels):
        raise UserError(f"task {task.name}: the Hub label {raw} is out of range for {len(task.labels)} labels")
    return int(raw)


# --- tokenization and batching -------------------------------------------------------------

def tokenize(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids per example (no padding; batches are padded to their longest member).
    The ids come from the token cache when these texts met this tokenizer before."""
    enc = encode_cached([e["text"] for e in examples], tokenizer, max_length)
    for item, e in zip(enc, examples):
        item["labels"] = e["label"]
    return enc


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERBENCH_CACHE", Path.home() / ".cache" / "adapterbench"))


def tokenizer_key(tokenizer) -> str:
    """What makes two tokenizers give the same ids: class, vocabulary, special tokens, casing."""
    import hashlib
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens,
                       tokenizer.init_kwargs.get("do_lower_case"), getattr(tokenizer, "padding_side", None),
                       getattr(tokenizer, "truncation_side", None)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_cached(texts: list[tuple], tokenizer, max_length: int) -> list[dict]:
    """Tokenise once per (tokenizer, max_length, texts); later calls read
    $ADAPTERBENCH_CACHE/tokens/<hash>.safetensors (flat int32 ids + offsets per field).
    ADAPTERBENCH_TOKEN_CACHE=0 turns the cache off."""
    import hashlib
    if not texts:
        return []
    use_cache = os.environ.get("ADAPTERBENCH_TOKEN_CACHE", "1") != "0"
    key = hashlib.sha256(json.dumps([tokenizer_key(tokenizer), max_length, texts]).encode()).hexdigest()[:32]
    path = cache_root() / "tokens" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            return _unflatten(path)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    firsts = [t[0] for t in texts]
    seconds = [t[1] for t in texts] if len(texts[0]) > 1 else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    out = [{k: list(enc[k][i]) for k in enc.keys()} for i in range(len(texts))]
    if use_cache:
        try:
            _flatten(out, path)
        except OSError:
            pass  # a read-only or full cache folder only costs speed
    return out


def _flatten(items: list[dict], path: Path) -> None:
    from safetensors.torch import save_file
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int64)
    tensors = {"offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}
    for key in items[0]:
        tensors[key] = torch.tensor([x for it in items for x in it[key]], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _unflatten(path: Path) -> list[dict]:
    from safetensors.torch import load_file
    t = load_file(str(path))
    offsets = t.pop("offsets").tolist()
    fields = {k: v.tolist() for k, v in t.items()}
    return [{k: v[offsets[i]:offsets[i + 1]] for k, v in fields.items()} for i in range(len(offsets) - 1)]


class Collator:
    """Pads tokenized examples to the longest one in the batch. Every batch carries `task_ids`
    (an item's `task_id`, else `task_id` given here; single-task runs: 0) and, when every item
    is labelled, float `labels` (class ids are cast back in the loss), so one collator serves
    single-task and mixed multi-task batches."""

    SKIP = ("labels", "task_id", "uid")

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict], task_id: int = 0) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key in items[0]:
            if key in self.SKIP:
                continue
            fill = self.pad if key == "input_ids" else 0
            batch[key] = torch.tensor([it[key] + [fill] * (width - len(it[key])) for it in items])
        batch["task_ids"] = torch.tensor([it.get("task_id", task_id) for it in items])
        labels = [it.get("labels") for it in items]
        if all(x is not None for x in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        return batch


