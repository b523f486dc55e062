"""Run configuration: dataclasses, YAML loading, `key=value` overrides, strict keys.

Precedence, lowest first: dataclass defaults < method defaults < YAML file < CLI options
< `key=value` overrides. Unknown keys are errors that name the valid ones (nanoGPT's
configurator, torchtune's `validate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterbench.errors import UserError


@dataclass
class ModelConfig:
    name: str = "minilm-l6"          # hub id, local folder, or an alias (minilm-l6, mpnet-base)
    max_length: int = 128            # tokens per example after truncation (paper setting)
    trust_remote_code: bool = False  # only when the user asks for it
    dropout: float | None = None     # the encoder's and heads' dropout (not a method's own); None = the model's
    pooling: str = "auto"            # head input: cls | mean | pooler (the checkpoint's pretrained pooler);
                                     # auto = what the checkpoint was trained with (minilm-l6: mean, others: cls)


@dataclass
class TrainConfig:
    lr: float = 1e-4                 # AdapterFusion ST-A setting; `full` lowers it to 2e-5
    epochs: int = 30                 # AdapterFusion ST-A: up to 30 epochs, best on dev
    batch_size: int = 32
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1        # share of steps with a linear warm-up (10% for every method, as
                                     # Houlsby's and CA-MTL's reference code and BERT's recipe)
    weight_decay: float = 0.01       # not applied to biases and LayerNorm weights
    max_grad_norm: float = 1.0
    patience: int = 0                # stop after this many scorings without a better selection value; 0 = off
    selection: str = "heldout"       # what picks the best epoch and stops early: heldout (a seeded, stratified
                                     # slice of train, never trained on) | dev (the papers' protocol: the
                                     # reported dev set decides) | last (the last epoch, nothing decides)
    heldout_fraction: float = 0.1    # `heldout`: share of the training examples a run would use ...
    heldout_min: int = 100           # ... and at least this many (at most half the training split)
    limit: int = 0                   # use only the first N training examples (0 = all)
    eval_limit: int = 0              # use only the first N dev examples (0 = all)
    max_steps: int = 0               # stop after N optimizer steps (0 = no cap)
    log_every: int = 10              # steps between log.jsonl lines
    save_model: bool = False         # `full`: also write the whole model's weights
    shots: int = 0                   # few-shot: k training examples per class (k in all for regression); 0 = all
    checkpoint_every: int = 0        # also checkpoint every N steps (one is always written after each epoch)
    checkpoint_minutes: float = 0.0  # also checkpoint M minutes after the last one (and after SIGUSR1, always)
    group_by_length: bool = False    # batches of similar length: less padding, a different batch order (single-task
                                     # runs; multi-task runs: sampling.group_by_length)
    eval_every: int = 1              # score dev after every N-th epoch and the last (best epoch among those)
    precision: str = "auto"          # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16 (also on CPU)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # live tracking (accelerate's
                                     # trackers): tensorboard | wandb | mlflow | trackio | none; never in the hash
    tracker_project: str = ""        # the trackers' project / experiment; "": the study's name (adapterbench
                                     # outside a study); never in the hash


@dataclass
class DataConfig:
    data_dir: str | None = None      # glue_data-style folder; else $ADAPTERBENCH_DATA_DIR, else the Hub
    shuffle_seed: int | None = None  # order of training batches; defaults to the run seed
    data_seed: int | None = None     # which examples train.shots / train.limit draw; defaults to the run seed


@dataclass
class SamplingConfig:
    scheme: str = "proportional"     # proportional | uniform | temperature | annealed | uncertainty
    temperature: float = 2.0         # `temperature`: p_t proportional to n_t^(1/T)
    uncertainty_proxy: dict = field(default_factory=dict)  # `uncertainty`: regression task -> the
                                     # classification task whose scores it borrows (default stsb: mrpc)
    epoch: str = "examples"          # what one multi-task epoch is: examples (steps = all tasks' examples /
                                     # batch) | reference (CA-MTL's code: the longest task's batches x tasks)
    group_by_length: bool = False    # each task's batches of similar length (less padding; the multi-task
                                     # counterpart of train.group_by_length, which orders single-task batches)


@dataclass
class RunConfig:
    task: str = ""                   # task name (configs/tasks) or a task YAML path
    method: Any = field(default_factory=lambda: {"name": "pfeiffer"})  # a mapping; stages.resolve makes it
                                     # the method's Config dataclass (checked by the method)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 42
    out_dir: str = "runs"            # root of all run folders
    label: str = ""                  # row name in reports (a study's method entry); default: method name
    init_from: str | None = None     # adapter folder to start from (e.g. a merged adapter); new head
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # multi-task batches: which task when


# --- loading -------------------------------------------------------------------------------

MAX_YAML_NODES = 100_000     # what a file's aliases may expand to (a real config has a few hundred)


class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses what silently changes or blows up a config: a key given twice in
    one mapping (the last would win, e.g. dropping a study's `methods:`), and aliases that
    expand beyond MAX_YAML_NODES nodes (nested anchors: a few hundred bytes that hang a reader)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded, self._sizes = 0, {}

    def _size(self, node) -> int:
        if id(node) not in self._sizes:
            self._sizes[id(node)] = 1            # (a recursive alias counts once while it is measured)
            kids = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            self._sizes[id(node)] = 1 + sum(self._size(k) for k in kids)
        return self._sizes[id(node)]

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark if alias else None
        node = super().compose_node(parent, index)
        if alias:
            self._expanded += self._size(node)
            if self._expanded > MAX_YAML_NODES:
                raise yaml.constructor.ConstructorError(None, None, f"its aliases expand to more than "
                                                        f"{MAX_YAML_NODES:,} values", mark)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice in one mapping "
                                                        f"(remove one)", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_text(text: str, where: str):
    """Parse YAML text with StrictLoader; any problem is one line naming `where` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)    # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if isinstance(e, yaml.constructor.ConstructorError) and getattr(e, "context", None) is None:
            raise UserError(f"{where}{line}: {problem}") from None        # StrictLoader's own refusals
        raise UserError(f"{where}{line}: malformed YAML ({problem}): fix the syntax") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a config: fix the file") from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with StrictLoader (safe_load, no duplicate keys, bounded aliases);
    errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    data = read_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4); values are read as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. train.lr=3e-4)")
    key, _, raw = text.partition("=")
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    """Merge `top` into a copy of `base`; nested mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def merge_layers(yaml_path: str | Path | None, options: dict, overrides: list[str]) -> dict:
    """User layers merged in precedence order: YAML < CLI options < key=value overrides."""
    tree = load_yaml(yaml_path) if yaml_path else {}
    if isinstance(tree.get("method"), str):
        tree["method"] = {"name": tree["method"]}
    opts: dict = {}
    for dotted, value in options.items():
        if value is not None:
            set_path(opts, dotted.split("."), value)
    tree = deep_merge(tree, opts)
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys == ["method"]:
            keys = ["method", "name"]
        set_path(tree, keys, value)
    return tree


# --- strict construction -------------------------------------------------------------------

def build(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    check_keys(data, fields, where, prefix=f"{where}." if where else "", kind="config ")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def coerce(hint, value, key: str):
    """Check/convert one value against its type hint; a mismatch names the key."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        hint_ = " (YAML reads yes/no/true/false as booleans: quote it)" if isinstance(value, bool) else ""
        raise UserError(f"config key '{key}' must be a string, got {value!r}{hint_}")
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    return value


SELECTIONS = ("heldout", "dev", "last")
MAX_COUNT = 10**9     # epochs, steps, limits, batch sizes: beyond it a typo, never a budget


def check_ranges(cfg: RunConfig) -> None:
    """Out-of-range values are errors before anything runs."""
    t = cfg.train
    checks = [
        (t.lr > 0, "train.lr", t.lr, "a positive learning rate"),
        (t.epochs >= 1, "train.epochs", t.epochs, "at least 1"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, "at least 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "at least 1"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "0 or more"),
        (t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "0 (off) or more"),
        (min(t.patience, t.limit, t.eval_limit, t.max_steps, t.shots, t.checkpoint_every) >= 0,
         "train.patience/limit/eval_limit/max_steps/shots/checkpoint_every",
         "negative", "0 or more"),
        (t.checkpoint_minutes >= 0, "train.checkpoint_minutes", t.checkpoint_minutes, "0 (off) or more"),
        (t.log_every >= 1, "train.log_every", t.log_every, "at least 1"),
        (t.eval_every >= 1, "train.eval_every", t.eval_every, "at least 1"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision", t.precision, "auto, fp32 or bf16"),
        (t.selection in SELECTIONS, "train.selection", t.selection, ", ".join(SELECTIONS)),
        (0 < t.heldout_fraction < 1, "train.heldout_fraction", t.heldout_fraction, "in (0, 1)"),
        (t.heldout_min >= 1, "train.heldout_min", t.heldout_min, "at least 1"),
        (cfg.model.max_length >= 8, "model.max_length", cfg.model.max_length, "at least 8"),
        (0 <= cfg.seed < 2**32, "seed", cfg.seed, "0 to 2**32 - 1 (what numpy and torch seed with)"),
        (cfg.sampling.temperature > 0, "sampling.temperature", cfg.sampling.temperature, "a positive number"),
        (all(x is None or 0 <= x < 2**32 for x in (cfg.data.shuffle_seed, cfg.data.data_seed)),
         "data.shuffle_seed/data_seed", [cfg.data.shuffle_seed, cfg.data.data_seed], "0 to 2**32 - 1"),
        (all(v <= MAX_COUNT for v in dataclasses.asdict(t).values() if isinstance(v, int) and not isinstance(v, bool)),
         "train.*", "a count beyond 10**9", f"at most {MAX_COUNT:,}"),
        (len(cfg.label) <= 120 and cfg.label.isprintable(), "label", repr(cfg.label[:40]),
         "one line of at most 120 printable characters (it names a row in every table)"),
        (cfg.sampling.epoch in ("examples", "reference"), "sampling.epoch", cfg.sampling.epoch, "examples or reference"),
        (cfg.model.pooling in ("auto", "cls", "mean", "pooler"), "model.pooling", cfg.model.pooling,
         "auto, cls, mean or pooler"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout", cfg.model.dropout, "in [0, 1)"),
    ]
    for ok, key, value, want in checks:
        if not ok:
            raise UserError(f"config key '{key}' = {value} is out of range: use {want}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Keys added after run folders existed: at these values they leave a config's hash as it
# was, so finished runs stay recognised when new options appear.
# `ANY`: the key never changes what a run computes, so it never enters the hash.
ANY = object()
# Order matters: a nested key is dropped before its parent is compared.
HASH_NEUTRAL = {("sampling", "uncertainty_proxy"): {}, ("init_from",): None, ("train", "shots"): 0, ("data", "data_seed"): None,
                ("train", "checkpoint_every"): ANY, ("train", "checkpoint_minutes"): ANY, ("train", "log_with"): ANY, ("train", "tracker_project"): ANY,
                ("train", "group_by_length"): False, ("train", "eval_every"): 1,
                ("model", "dropout"): None, ("train", "precision"): "auto",
                ("model", "pooling"): "cls", ("method", "freeze_layers"): None, ("method", "encoder"): None,
                # runs from before the held-out protocol selected on dev
                ("train", "selection"): "dev", ("train", "heldout_fraction"): 0.1, ("train", "heldout_min"): 100,
                ("sampling", "epoch"): "examples", ("method", "frozen_conditional_trains"): False,
                ("sampling", "group_by_length"): False,
                ("sampling",): {"scheme": "proportional", "temperature": 2.0}}


# Keys that name other runs' folders: a fusion's adapters and encoder, the adapter a run starts from.
RUN_PATHS = (("init_from",), ("method", "adapters"), ("method", "encoder"))


def portable(path: str, out_dir: str | Path) -> str:
    """`path` as a run's identity names it: relative to the output root when it lies inside
    (so a study folder keeps its runs' identities when it moves, or is planned from another
    working directory); a folder elsewhere (the user's own adapters) keeps its full path."""
    try:
        return "<out_dir>/" + Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def _holder(tree: dict, path: tuple) -> dict | None:
    """The dict inside `tree` that holds the key path[-1] (None where the path leaves the dicts)."""
    node = tree
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def config_hash(resolved: dict, portable_paths: bool = True) -> str:
    """Short hash of what determines a run's result (output root and report label left out).
    Other runs' folders enter it relative to the output root (`portable`); with
    `portable_paths=False`, as full paths, the way earlier versions named run folders."""
    keep = {k: v for k, v in resolved.items() if k not in ("out_dir", "label")}
    keep = json.loads(json.dumps(keep, default=str))
    root = resolved.get("out_dir") or "."
    for path in RUN_PATHS if portable_paths else ():
        node = _holder(keep, path)
        if node is not None and node.get(path[-1]):
            value = node[path[-1]]
            node[path[-1]] = [portable(v, root) for v in value] if isinstance(value, list) else portable(value, root)
    for path, neutral in HASH_NEUTRAL.items():
        node = _holder(keep, path)
        if node is not None and path[-1] in node and (neutral is ANY or node[path[-1]] == neutral):
            del node[path[-1]]
    blob = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def split_labels(value: str | list[str]) -> list[str]:
    """Row labels or patterns given as 'full,pfeiffer,merge-*' (CLI) or as a YAML list."""
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]


def check_keys(data: dict, allowed, where: str | None = None, prefix: str = "", kind: str = "") -> None:
    """The one strict-key check (run configs, studies, claims, references, merge blocks): a key
    outside `allowed` is one line naming where, the key and the valid keys. `kind` ("config ")
    names a config section (`where`) in the sentence instead of leading with it."""
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        lead = f"{where}: " if where and not kind else ""
        under = f" under {where}" if where and kind else ""
        raise UserError(f"{lead}unknown {kind}key '{prefix}{unknown[0]}'; valid keys{under}: "
                        f"{', '.join(sorted(map(str, allowed)))}")
