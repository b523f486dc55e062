"""The command line as a whole, fuzzed (issue 42, family 5). Hypothesis builds command lines for
every command: each of its options left out, given a working value, or given a value of the
wrong type, outside its declared range or hostile (empty, '..', a path out of the folder, a
newline, 300 characters, a file where a folder belongs), plus `key=value` overrides of every config
key with values of every shape. Each case runs in its own copy of a small workspace (a tiny
model, toy data, two finished runs, an exported adapter, a study) and must either work or fail
with exit code 2 and one `error:` line: never a traceback, never a file written outside its
folder, never a finished-looking run from a failed command."""

import dataclasses
import inspect
import os
import shutil
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.config import RunConfig
from adapterbench.methods import method_config

from .conftest import write_data, write_task_yamls

runner = CliRunner()
EXAMPLES = int(os.environ.get("ADAPTERBENCH_FUZZ_EXAMPLES", "6"))   # per command
FRESH = os.environ.get("ADAPTERBENCH_FUZZ_FRESH") == "1"    # new random cases (else the same, derandomized)

# what a case may cost: training commands get these caps after the generated overrides
CAPS = ["train.epochs=1", "train.max_steps=2", "train.limit=16", "train.batch_size=8", "train.eval_batch_size=8",
        "train.heldout_min=4", "train.log_with=[none]", "train.patience=0"]
TRAINING = {"extract", "finetune", "multitask", "fuse", "tune", "validate"}


def commands() -> dict[str, inspect.Signature]:
    """Every registered command and its signature (Typer reads the same one)."""
    return {info.name or info.callback.__name__.replace("_", "-"): inspect.signature(info.callback)
            for info in app.registered_commands}


def parameters(sig: inspect.Signature) -> dict[str, tuple[str | None, object, object]]:
    """name -> (its flag, e.g. '--out', or None for an argument; its OptionInfo/ArgumentInfo; its type)."""
    out = {}
    for name, p in sig.parameters.items():
        info = p.default
        flag = None
        if isinstance(info, typer.models.OptionInfo):
            flag = next((d for d in [info.default if isinstance(info.default, str) and info.default.startswith("-")
                                     else None, *info.param_decls] if d and d.startswith("--")), None)
        out[name] = (flag, info, p.annotation)
    return out


def kind(annotation) -> str:
    text = str(annotation)
    for word in ("list", "bool", "int", "float", "Path"):
        if word in text:
            return word
    return "str"


# --- the workspace every case copies ------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert_dir):
    base = tmp_path_factory.mktemp("fuzz")
    ws, outside = base / "ws", base / "outside"
    outside.mkdir()
    (outside / "theirs.txt").write_text("not yours")
    write_data(ws / "data")
    write_task_yamls(ws)
    shutil.copytree(tiny_bert_dir, ws / "tiny")
    (ws / "a.txt").write_text("a file")
    (ws / "empty").mkdir()
    (ws / "out-link").symlink_to(outside)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        for task in ("toy", "toyreg"):
            r = runner.invoke(app, ["extract", "--task", f"{task}.yaml", "--model", "tiny", "--data-dir", "data",
                                    "--out", "runs", *CAPS])
            assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["export", run_of(ws, "toy"), "--out", "hub"])
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    (ws / "run.yaml").write_text("task: toy.yaml\nmodel: {name: tiny}\ndata: {data_dir: data}\n"
                                 "train: {epochs: 1, max_steps: 2, limit: 16, batch_size: 8}\n")
    (ws / "study.yaml").write_text("name: f\ntasks: [toy.yaml]\nseeds: [1]\nmodels: [tiny]\nout_dir: study\n"
                                   "defaults:\n  data: {data_dir: data}\n"
                                   "  train: {epochs: 1, max_steps: 2, limit: 16, batch_size: 8}\n"
                                   "methods:\n  - {name: pfeiffer}\n")
    return ws


def run_of(ws: Path, task: str) -> str:
    return str(next((ws / "runs").glob(f"extract/*/{task}/*")).relative_to(ws))


def working_lines(ws: Path) -> dict[str, list[str]]:
    """A command line per command that works, relative to the case's folder; the fuzz varies it."""
    toy, toyreg = run_of(ws, "toy"), run_of(ws, "toyreg")
    model = ["--model", "tiny"]
    return {
        "extract": ["extract", "--task", "toy.yaml", *model, "--data-dir", "data"],
        "finetune": ["finetune", "--task", "toy.yaml", *model, "--data-dir", "data"],
        "multitask": ["multitask", "--tasks", "toy.yaml,toyreg.yaml", *model, "--data-dir", "data"],
        "fuse": ["fuse", "--target", "toy.yaml", "--adapters", toy, "--adapters", toyreg, *model, "--data-dir", "data"],
        "tune": ["tune", "--task", "toy.yaml", *model, "--data-dir", "data", "--trials", "1",
                 "--space", "train.lr=loguniform(1e-4,1e-2)"],
        "validate": ["validate", "run.yaml", "--data-dir", "data"],
        "merge": ["merge", "--adapters", toy, "--adapters", toyreg, "--out", "merged"],
        "evaluate": ["evaluate", toy, "--data-dir", "data"],
        "export": ["export", toy, "--out", "exported"],
        "import": ["import", "hub", "--out", "imported", *model],
        "report": ["report", "runs", "--out", "report.md"],
        "archive": ["archive", "runs", "--out", "runs.jsonl"],
        "run": ["run", "study.yaml"],
        "status": ["status", "study.yaml", "--data-dir", "data"],
        "ls": ["ls", "methods"],
        "check-method": ["check-method", "pfeiffer"],
        "bench": ["bench", *model, "--configs", "pfeiffer", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                  "--seq-len", "16", "--modes", "train", "--out", "bench"],
    }


# --- values -----------------------------------------------------------------------------

TEXT = ["", " ", "..", "../outside", "/", "a\nb", "x" * 300, "ü-ñ", "-", "[a,b]", "toy,toy", "nan", "{", "*"]
PATHS = ["nowhere/none", "a.txt", "empty", "out-link", "", ".", "../outside/theirs.txt"]
OVERRIDE_VALUES = ["", "nan", "inf", "-1", "0", "1", "4294967296", "1e400", "[a,b]", "{a: 1}", "true", "null",
                   "x" * 300, "a\nb", "../..", "4_5", "0.5"]
NEVER = {"debug", "peer", "peer_pad_to_max", "compile_model", "wait", "launcher", "partition", "slurm_param",
         "trust_remote_code"}   # another program, the network or a cluster: their own tests


def numbers(info, integer: bool) -> list[str]:
    lo, hi = getattr(info, "min", None), getattr(info, "max", None)
    near = [lo, hi] if integer else [lo]
    out = [str(v) for v in near if v is not None and (not integer or abs(v) <= 2)]
    out += [str(v) for v in (lo - 1 if lo is not None else None, hi + 1 if hi is not None else None) if v is not None]
    out += ["1", "2", "1.5", "abc", "", "nan", "10" * 12] if integer else ["nan", "inf", "-inf", "abc", "1e400", "0.5"]
    return out


def config_keys() -> list[str]:
    """Every key of a run's config, dotted (train.lr, method.reduction_factor, ...), and the sections."""
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield f"{prefix}{f.name}"
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
    cfg = RunConfig()
    cfg.method = method_config(cfg.method)
    return sorted(set(walk(cfg, ""))) + ["nokey", "train.nokey", "method.adapters"]


@st.composite
def command_lines(draw, name: str, ws: Path) -> list[str]:
    base = working_lines(ws)[name]
    sig = commands()[name]
    line = list(base)
    for pname, (flag, info, annotation) in parameters(sig).items():
        if pname in NEVER or flag is None or not draw(st.booleans()):
            continue
        k = kind(annotation)
        if k == "bool":
            line.append(flag)
            continue
        pool = (numbers(info, True) if k == "int" else numbers(info, False) if k == "float" else
                PATHS if k == "Path" else TEXT + PATHS)
        if flag == "--out":      # a link the user names as the output is theirs to write through
            pool = [v for v in pool if v != "out-link"]
        line += [flag, draw(st.sampled_from(pool))]
    if any(isinstance(p.default, typer.models.ArgumentInfo) and "list" in str(p.annotation)
           for p in sig.parameters.values()) and name in TRAINING | {"validate"}:
        keys = draw(st.lists(st.sampled_from(config_keys()), max_size=3))
        line += [f"{key}={draw(st.sampled_from(OVERRIDE_VALUES))}" for key in keys]
    if name in TRAINING:
        line += CAPS
    return line


# --- one case ---------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(folder))] = ("file", p.stat().st_size, p.stat().st_mtime_ns)
    return out


def finished_runs(folder: Path) -> set[str]:
    return {str(m.parent) for m in folder.rglob("metrics.json") if '"status": "ok"' in m.read_text()}


def run_case(ws: Path, line: list[str]) -> None:
    case = ws.parent / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(ws, case, symlinks=True)
    outside = ws.parent / "outside"
    assert sorted(p.name for p in outside.iterdir()) == ["theirs.txt"]
    before_outside, before_base = snapshot(outside), sorted(p.name for p in ws.parent.iterdir())
    before_ok = finished_runs(case)
    cwd = os.getcwd()
    os.chdir(case)
    try:
        r = runner.invoke(app, line)
    finally:
        os.chdir(cwd)
    shown = f"{line}\n{r.output[-1500:]}"
    assert r.exit_code in (0, 2), shown
    assert r.exception is None or isinstance(r.exception, SystemExit), (shown, repr(r.exception))
    assert "Traceback" not in r.output, shown
    if r.exit_code == 2:
        errors = [s for s in r.output.splitlines() if s.startswith("error:")]
        assert len(errors) == 1 and r.output.rstrip().splitlines()[-1] == errors[0].rstrip(), shown
        assert finished_runs(case) <= before_ok, shown              # nothing finished-looking from a failure
    assert snapshot(outside) == before_outside, shown              # nothing written outside the case
    assert sorted(p.name for p in ws.parent.iterdir()) == before_base, shown


def test_every_command_is_fuzzed_and_every_number_declares_its_range(workspace):
    """A new command joins the fuzz (it needs a working line); a new numeric option states its
    range, so click refuses what is outside it in one line before anything starts."""
    assert set(working_lines(workspace)) == set(commands())
    for name, sig in commands().items():
        for pname, (flag, info, annotation) in parameters(sig).items():
            if flag and kind(annotation) in ("int", "float"):
                assert info.min is not None and info.max is not None, f"{name} {flag} declares no range"


@pytest.mark.slow        # about 40 s for the 17 commands at 6 cases each
@pytest.mark.parametrize("name", sorted(commands()))
def test_a_fuzzed_command_line_works_or_is_one_line(name, workspace):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not FRESH, database=None,
              suppress_health_check=list(HealthCheck))
    @given(line=command_lines(name, workspace))
    def case(line):
        run_case(workspace, line)
    case()
