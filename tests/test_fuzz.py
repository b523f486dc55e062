"""A property test of the whole input surface (hypothesis): run configs with values of every
type and range, task YAMLs with data files in several encodings, delimiters and line endings,
and study graphs. Every generated case either works or gets one line and exit code 2, never a
traceback, and never leaves a folder that looks finished. The number of cases per property is
ADAPTERBENCH_FUZZ_CASES (default 150); each test checks and prints how many it ran (no test
depends on another's order)."""

import os
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adapterbench.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow    # CI runs it; the inner loop leaves it out
CASES = int(os.environ.get("ADAPTERBENCH_FUZZ_CASES", "150"))
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize=os.environ.get("ADAPTERBENCH_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNT: dict[str, int] = {}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.lists(st.integers(-3, 3), max_size=3))
KEYS = {
    "train": ["lr", "epochs", "batch_size", "eval_batch_size", "warmup_ratio", "weight_decay", "max_grad_norm",
              "patience", "limit", "eval_limit", "max_steps", "log_every", "shots", "checkpoint_every", "checkpoint_minutes",
              "group_by_length", "eval_every", "precision", "log_with", "bogus"],
    "model": ["name", "max_length", "trust_remote_code", "dropout", "pooling", "nope"],
    "data": ["data_dir", "shuffle_seed", "data_seed"],
    "sampling": ["scheme", "temperature", "uncertainty_proxy"],
}
METHOD_KEYS = ["reduction_factor", "activation", "init", "rank", "alpha", "dropout", "target_modules", "variant",
               "attention_dropout", "temperature", "freeze_layers", "attn_blocks", "max_length", "placement"]


@st.composite
def run_configs(draw):
    cfg = {"task": draw(st.sampled_from(["toy", "rte", "", "nope", 3, None]))}
    for section, keys in KEYS.items():
        if draw(st.booleans()):
            cfg[section] = draw(st.one_of(scalars, st.dictionaries(st.sampled_from(keys), scalars, max_size=4)))
    method = draw(st.sampled_from(["pfeiffer", "houlsby", "lora", "head", "full", "fusion", "camtl", "mtl", "x"]))
    cfg["method"] = {"name": method, **draw(st.dictionaries(st.sampled_from(METHOD_KEYS), scalars, max_size=3))}
    if draw(st.booleans()):
        cfg[draw(st.sampled_from(["seed", "label", "init_from", "out_dir", "unknown"]))] = draw(scalars)
    return cfg


def one_line_or_ok(r, kind):
    COUNT[kind] = COUNT.get(kind, 0) + 1
    assert r.exit_code in (0, 2), (r.exit_code, r.output[-2000:], repr(r.exception))
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        assert r.output.strip().startswith("error:"), r.output


def ran(kind: str, prop, **fixtures) -> None:
    """Run a property and check it generated its cases (printed: the count per property)."""
    before = COUNT.get(kind, 0)
    prop(**fixtures)
    print(f"\nfuzz cases, {kind}: {COUNT.get(kind, 0) - before}")
    assert COUNT.get(kind, 0) - before >= min(CASES, 10)


def test_run_configs(tmp_path_factory, task_yamls):
    ran("run configs", run_config_property, tmp_path_factory=tmp_path_factory, task_yamls=task_yamls)


@SETTINGS
@given(cfg=run_configs())
def run_config_property(cfg, tmp_path_factory, task_yamls):
    folder = tmp_path_factory.mktemp("cfg")
    if cfg["task"] == "toy":
        cfg["task"] = str(task_yamls["toy"])
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one_line_or_ok(runner.invoke(app, ["validate", str(path)]), "run configs")
    assert not list(folder.glob("**/metrics.json"))


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]


@st.composite
def tasks_with_data(draw):
    fmt = draw(st.sampled_from(["tsv", "csv", "jsonl"]))
    delim = draw(st.sampled_from(["\t", ",", ";", "|"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    words = st.text(alphabet=string.ascii_letters + " äöüé\"'\t,;", min_size=0, max_size=12)
    labels = draw(st.lists(st.sampled_from(["neg", "pos", "mid", "", "1", "0"]), min_size=1, max_size=4))
    rows = draw(st.lists(st.tuples(words, st.sampled_from(labels + ["other"])), min_size=0, max_size=8))
    if fmt == "jsonl":
        import json
        lines = [json.dumps({"sentence": s, "label": lab}) if draw(st.booleans()) else "[]" for s, lab in rows]
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["[1, 2]", "{bad json", "\"text\"", "42"])))
    else:
        lines = [delim.join(["sentence", "label"])] + [delim.join([s, lab]) for s, lab in rows]
    text = newline.join(lines) + newline
    spec = {"name": draw(st.sampled_from(["fz", "fz-1", "../up", "a b", "ok_name"])), "text_columns": ["sentence"],
            "labels": labels, "regression": draw(st.booleans()), "metrics": ["accuracy"], "main_metric": "accuracy",
            "sources": {"local": {"dir": "D", "format": fmt, "files": {"train": f"train.{fmt}", "dev": f"train.{fmt}"}}}}
    return spec, text, draw(st.sampled_from(ENCODINGS))


def test_task_yamls_and_data_files(tmp_path_factory):
    ran("task YAMLs + data", task_property, tmp_path_factory=tmp_path_factory)


@SETTINGS
@given(case=tasks_with_data())
def task_property(case, tmp_path_factory):
    spec, text, encoding = case
    folder = tmp_path_factory.mktemp("task")
    (folder / "D").mkdir()
    fmt = spec["sources"]["local"]["format"]
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    (folder / "D" / f"train.{fmt}").write_bytes(data)
    (folder / "t.yaml").write_text(yaml.safe_dump(spec))
    one_line_or_ok(runner.invoke(app, ["validate", str(folder / "t.yaml"), "--data-dir", str(folder)]), "task YAMLs + data")


@st.composite
def studies(draw):
    labels = ["a", "b", "c", "d"]
    entries = []
    for label in draw(st.lists(st.sampled_from(labels), min_size=1, max_size=4, unique=True)):
        e = {"name": draw(st.sampled_from(["pfeiffer", "fusion", "full", "mtl", "camtl", "lora", "x"])), "label": label}
        if draw(st.booleans()):
            e["source_method"] = draw(st.sampled_from(labels + ["pfeiffer", "zz"]))
        if draw(st.booleans()):
            e["merge"] = draw(st.one_of(st.just({"strategy": "avg"}), st.just({"strategy": "align", "same_track": True}),
                                        st.just({"bogus": 1}), scalars))
        if draw(st.booleans()):
            e[draw(st.sampled_from(["seeds", "tasks", "sources", "include_target", "train", "oops"]))] = draw(scalars)
        entries.append(e)
    study = {"name": draw(st.sampled_from(["s", "s-1", "../bad", ""])), "tasks": ["toy", "toyreg"],
             "seeds": draw(st.one_of(st.just([1]), st.lists(st.integers(-2, 3), max_size=3), scalars)),
             "models": ["tiny-bert"], "methods": entries}
    for key, plausible in (("first", st.lists(st.sampled_from(labels + ["zz"]), max_size=2)),   # the study's order
                           ("first_seeds", st.lists(st.integers(-1, 3), max_size=2)),
                           ("sweep", st.fixed_dictionaries({"seed": st.integers(-1, 3)})),
                           ("shots", st.lists(st.integers(-1, 4), max_size=2))):
        if draw(st.booleans()):
            study[key] = draw(st.one_of(plausible, scalars))
    return study


def test_study_graphs(tmp_path_factory, task_yamls):
    ran("study graphs", study_property, tmp_path_factory=tmp_path_factory, task_yamls=task_yamls)


@SETTINGS
@given(study=studies())
def study_property(study, tmp_path_factory, task_yamls):
    folder = tmp_path_factory.mktemp("study")
    study["tasks"] = [str(task_yamls[t]) for t in study["tasks"]]
    study["out_dir"] = str(folder / "runs")
    (folder / "s.yaml").write_text(yaml.safe_dump(study))
    one_line_or_ok(runner.invoke(app, ["validate", str(folder / "s.yaml")]), "study graphs")
    assert not (folder / "runs").exists()
