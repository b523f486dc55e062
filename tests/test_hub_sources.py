"""Every shipped task's Hub source read as the Hub publishes it. The Hub is unreachable here, so
each dataset's published feature schema is written down below (column names, ClassLabel names
or value types, as `datasets` reports them) and a small dataset with exactly that schema stands
in for `datasets.load_dataset`; a local `datasets` folder is read, validated and hashed by
content; a pinned revision is passed on and enters the run identity."""

import datasets
import pytest

from adapterbench.data import read_hub_split, task_identity
from adapterbench.errors import UserError
from adapterbench.tasks import load_task, task_files

C = lambda *names: datasets.ClassLabel(names=list(names))   # noqa: E731
S, F, I = datasets.Value("string"), datasets.Value("float32"), datasets.Value("int32")
# (path, config) -> features, as published (nyu-mll/glue, aps/super_glue, allenai/scitail, RobZamp/sick)
SCHEMAS = {
    ("nyu-mll/glue", "cola"): {"sentence": S, "label": C("unacceptable", "acceptable"), "idx": I},
    ("nyu-mll/glue", "sst2"): {"sentence": S, "label": C("negative", "positive"), "idx": I},
    ("nyu-mll/glue", "mrpc"): {"sentence1": S, "sentence2": S, "label": C("not_equivalent", "equivalent"), "idx": I},
    ("nyu-mll/glue", "qqp"): {"question1": S, "question2": S, "label": C("not_duplicate", "duplicate"), "idx": I},
    ("nyu-mll/glue", "stsb"): {"sentence1": S, "sentence2": S, "label": F, "idx": I},
    ("nyu-mll/glue", "mnli"): {"premise": S, "hypothesis": S, "label": C("entailment", "neutral", "contradiction"),
                               "idx": I},
    ("nyu-mll/glue", "qnli"): {"question": S, "sentence": S, "label": C("entailment", "not_entailment"), "idx": I},
    ("nyu-mll/glue", "rte"): {"sentence1": S, "sentence2": S, "label": C("entailment", "not_entailment"), "idx": I},
    ("nyu-mll/glue", "wnli"): {"sentence1": S, "sentence2": S, "label": C("not_entailment", "entailment"), "idx": I},
    ("aps/super_glue", "boolq"): {"question": S, "passage": S, "idx": I, "label": C("False", "True")},
    ("aps/super_glue", "cb"): {"premise": S, "hypothesis": S, "idx": I,
                               "label": C("entailment", "contradiction", "neutral")},
    ("allenai/scitail", "tsv_format"): {"premise": S, "hypothesis": S, "label": S},
    ("RobZamp/sick", None): {"id": S, "sentence_A": S, "sentence_B": S,
                             "label": C("entailment", "neutral", "contradiction"), "relatedness_score": F},
}
# what each class of the dataset means in the task's own label list (class index -> task label)
MEANING = {"cola": ["0", "1"], "sst2": ["0", "1"], "mrpc": ["0", "1"], "qqp": ["0", "1"], "wnli": ["0", "1"],
           "mnli": ["entailment", "neutral", "contradiction"], "mnli_mismatched": ["entailment", "neutral", "contradiction"],
           "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
           "boolq": ["False", "True"], "cb": ["entailment", "contradiction", "neutral"],
           "sick": ["entailment", "neutral", "contradiction"]}


def fake(features: dict, n: int = 6) -> datasets.Dataset:
    rows = {}
    for name, f in features.items():
        if isinstance(f, datasets.ClassLabel):
            rows[name] = [i % f.num_classes for i in range(n)]
        elif name == "label" and f == S:
            rows[name] = ["entails" if i % 2 else "neutral" for i in range(n)]
        else:
            rows[name] = [float(i) / 2 if f == F else (i if f == I else f"text {i}") for i in range(n)]
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


HUB_TASKS = [n for n, p in task_files().items() if load_task(n).sources.hub and load_task(n).sources.hub.path]


@pytest.mark.parametrize("name", HUB_TASKS)
def test_every_shipped_hub_source_reads_the_published_schema(name, monkeypatch):
    task = load_task(name)
    hub = task.sources.hub
    schema = SCHEMAS[(hub.path, hub.name)]
    seen = {}

    def load_dataset(path, config=None, split=None, revision=None):
        seen.update(path=path, config=config, split=split)
        return fake(schema)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for split in ("train", "dev"):
        examples = read_hub_split(task, split, None)
        assert seen["split"] == hub.splits[split] and len(examples) == 6
        assert all(len(e["text"]) == len(task.text_columns) and all(e["text"]) for e in examples)
        label = schema[hub.columns.get(task.label_column, task.label_column)]
        if task.regression:
            assert [e["label"] for e in examples] == [i / 2 for i in range(6)]
        elif isinstance(label, datasets.ClassLabel):   # class i of the dataset is the task label MEANING[i]
            assert [task.labels[e["label"]] for e in examples] == [MEANING[name][i % label.num_classes] for i in range(6)]
        else:                                          # string labels, by name
            assert [task.labels[e["label"]] for e in examples] == ["entails" if i % 2 else "neutral" for i in range(6)]


def test_a_column_the_dataset_lacks_is_one_line(tmp_path, monkeypatch):
    y = tmp_path / "t.yaml"
    y.write_text("name: t\ntext_columns: [sentence1, sentence2]\nlabels: [a, b]\n"
                 "sources: {hub: {path: nyu-mll/glue, name: mnli}}\n")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake(SCHEMAS[("nyu-mll/glue", "mnli")]))
    with pytest.raises(UserError, match="has no column 'sentence1' .*premise, hypothesis.*sources.hub.columns"):
        read_hub_split(load_task(str(y)), "train", None)


def test_a_label_the_task_lacks_is_one_line(tmp_path, monkeypatch):
    y = tmp_path / "t.yaml"
    y.write_text("name: t\ntext_columns: [premise, hypothesis]\nlabels: [pos, neg]\n"
                 "sources: {hub: {path: allenai/scitail, name: tsv_format}}\n")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake(SCHEMAS[("allenai/scitail", "tsv_format")]))
    with pytest.raises(UserError, match="label 'neutral' is none of the task's labels.*label_map"):
        read_hub_split(load_task(str(y)), "train", None)
    y.write_text(y.read_text().replace("tsv_format}", "tsv_format, label_map: {entails: pos, neutral: neg}}"))
    assert [e["label"] for e in read_hub_split(load_task(str(y)), "train", None)][:2] == [1, 0]   # neutral, entails


def test_a_local_datasets_folder_is_read_validated_and_hashed_by_content(tmp_path):
    from typer.testing import CliRunner
    from adapterbench.cli import app
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": fake(SCHEMAS[("nyu-mll/glue", "rte")], 8),
                          "validation": fake(SCHEMAS[("nyu-mll/glue", "rte")], 4)}).save_to_disk(str(folder))
    y = tmp_path / "mine.yaml"
    y.write_text(f"name: mine\ntext_columns: [sentence1, sentence2]\nlabels: [entailment, not_entailment]\n"
                 f"sources: {{hub: {{path: {folder}}}}}\n")
    task = load_task(str(y))
    assert len(read_hub_split(task, "train", None)) == 8
    r = CliRunner().invoke(app, ["validate", str(y)])
    assert r.exit_code == 0 and "train: 8 rows" in r.output and "dev: 4 rows" in r.output
    assert "test: not there" in r.output, r.output
    before = task_identity(task, None)
    datasets.DatasetDict({"train": fake(SCHEMAS[("nyu-mll/glue", "rte")], 9),
                          "validation": fake(SCHEMAS[("nyu-mll/glue", "rte")], 4)}).save_to_disk(str(tmp_path / "ds2"))
    import shutil
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "ds2", folder)
    assert task_identity(task, None)["digest"] != before["digest"]   # edited data: another run


def test_a_pinned_revision_reaches_datasets_and_the_identity(tmp_path, monkeypatch):
    y = tmp_path / "t.yaml"
    y.write_text("name: t\ntext_columns: [sentence1, sentence2]\nlabels: [entailment, not_entailment]\n"
                 "sources: {hub: {path: nyu-mll/glue, name: rte, revision: abc123}}\n")
    seen = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.update(k) or fake(SCHEMAS[("nyu-mll/glue", "rte")]))
    read_hub_split(load_task(str(y)), "train", None)
    assert seen["revision"] == "abc123"
    pinned = task_identity(load_task(str(y)), None)
    y.write_text(y.read_text().replace("revision: abc123", "revision: def456"))
    assert task_identity(load_task(str(y)), None)["digest"] != pinned["digest"]


def test_shipped_identities_are_unchanged_by_the_new_keys():
    """label_map and revision at their defaults leave a task's identity as it was (finished runs
    keep their folders): digests computed by the code before the keys existed."""
    golden = {"rte": "0aebd2235e1429ac", "scitail": "e118a9c5f1042f15", "sick": "2d0bed4f75e4202b",
              "stsb": "fc724abc8d0e9ead"}
    assert {n: task_identity(load_task(n), "/nonexistent")["digest"] for n in golden} == golden
