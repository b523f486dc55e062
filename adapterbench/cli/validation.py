"""`adapterbench validate FILE`: check any kind of file the project reads, without training.

The kind is told by the file's keys: a task YAML has `sources`, a study `methods`, a claims
file `claims`; anything else is a run config. A task is checked down to its data: every split
is read (row count, label distribution, the first problem found)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from adapterbench.config import check_keys, load_yaml
from adapterbench.errors import UserError


def kind_of(data: dict) -> str:
    if "sources" in data or "include" in data:
        return "task"
    if "methods" in data:
        return "study"
    if "claims" in data or "tables" in data:
        return "claims"
    if "columns" in data and "table" in data:
        return "reference"
    return "run config"


def validate_file(path: Path, stage: str | None, data_dir: str | None, overrides: list[str]) -> list[str]:
    """Lines to print; a problem raises UserError (one line, exit 2)."""
    from adapterbench.tasks import configs_dir
    if not Path(path).exists():   # a shipped file by name: a study, claims file, run config or task
        found = [p for kind in ("studies", "claims", "runs", "tasks") if (p := configs_dir() / kind / f"{path}.yaml").is_file()]
        if not found:
            raise UserError(f"{path} does not exist and is no shipped study, claims file, run config or task "
                            f"(see {configs_dir()})")
        path = found[0]
    data = load_yaml(path)
    kind = kind_of(data)
    return {"task": check_task, "study": check_study, "claims": check_claims, "reference": check_reference,
            "run config": check_run_config}[kind](path, stage=stage, data_dir=data_dir, overrides=overrides)


def check_task(path: Path, data_dir: str | None = None, **_) -> list[str]:
    from adapterbench.data import load_splits
    from adapterbench.tasks import parse_task
    spec = parse_task(path)
    lines = [f"task {spec.name}: definition ok ({'regression' if spec.regression else f'{len(spec.labels)} labels'}, "
             f"main metric {spec.main_metric})"]
    for split in ("train", "dev", "test"):
        if spec.sources.local is not None and split not in spec.sources.local.files and not spec.sources.local.split_column:
            continue
        try:
            examples = load_splits(spec, data_dir, (split,))[split]   # the first bad row raises, naming file and line
        except UserError as e:
            if split != "test":
                raise
            lines.append(f"  test: not there ({e}); training and dev scoring do not need it")
            continue
        labels = [e["label"] for e in examples if e["label"] is not None]
        if spec.regression:
            shown = (f"labels {min(labels):.2f}..{max(labels):.2f}" if labels else "unlabelled")
        else:
            counts = Counter(spec.labels[i] for i in labels)
            shown = ", ".join(f"{k} {v}" for k, v in counts.most_common()) if counts else "unlabelled"
        lines.append(f"  {split}: {len(examples)} rows; {shown}")
    lines.append(f"{path}: ok")
    return lines


def check_run_config(path: Path, stage: str | None = None, overrides: list[str] = (), **_) -> list[str]:
    import yaml

    from adapterbench.config import merge_layers, to_dict
    from adapterbench.methods import get_method
    from adapterbench.recipe.stages import resolve, tasks_of
    tree = merge_layers(path, {}, list(overrides))
    method = (tree.get("method") or {}).get("name", "pfeiffer")
    stage = stage or get_method(method).STAGE
    if stage not in ("extract", "finetune", "fuse", "multitask"):
        raise UserError(f"--stage '{stage}' must be extract, finetune, fuse or multitask")
    cfg = resolve(tree, stage)
    tasks_of(cfg)
    return [yaml.safe_dump(to_dict(cfg), sort_keys=False), f"{path}: ok (run config for `adapterbench {stage}`)"]


def check_study(path: Path, **_) -> list[str]:
    from adapterbench.study import plan as S
    st = S.load_study(path)
    try:
        nodes = S.plan(st)
    except UserError as e:
        if "matches no folder" not in str(e):
            raise
        return [f"study {st.name}: entries ok; its plan waits for existing adapters ({e})", f"{path}: ok"]
    by_stage = Counter(n.stage for n in nodes)
    return [f"study {st.name}: {len(nodes)} runs (" + ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items()))
            + f"), into {st.out_dir}", f"{path}: ok"]


def check_reference(path: Path, **_) -> list[str]:
    """A paper's table (configs/references/): columns name the rows, table[task][row] the numbers."""
    data = load_yaml(path)
    check_keys(data, {"name", "source", "metric", "columns", "table", "notes", "paper_mean"}, str(path))
    rows = set(data["columns"].values())
    for task, cells in data["table"].items():
        bad = sorted(set(cells) - rows)
        if bad:
            raise UserError(f"{path}: table.{task} names row '{bad[0]}', which columns does not list")
    return [f"reference: {len(data['table'])} tasks x {len(rows)} rows", f"{path}: ok"]


def check_claims(path: Path, **_) -> list[str]:
    from adapterbench.results.claims import load_claims
    spec = load_claims(path)
    return [f"claims: {len(spec.get('tables', []))} tables, {len(spec['claims'])} claims", f"{path}: ok"]
