"""Config precedence and strictness, task YAMLs, data loading quirks, metrics."""

import math

import pytest

from adapterbench import metrics
from adapterbench.config import merge_layers
from adapterbench.data import load_splits, read_rows
from adapterbench.errors import UserError
from adapterbench.recipe.stages import resolve
from adapterbench.tasks import load_task, task_files


def test_precedence_defaults_yaml_options_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("task: rte\nseed: 1\ntrain: {lr: 0.5, epochs: 4}\nmethod: houlsby\n")
    cfg = resolve(merge_layers(y, {"seed": 2, "train.epochs": 5}, ["train.epochs=6", "method.reduction_factor=8"]),
                  "extract")
    assert cfg.seed == 2                      # option beats YAML
    assert cfg.train.epochs == 6              # override beats option
    assert cfg.train.lr == 0.5                # YAML beats method defaults
    assert cfg.train.batch_size == 32         # dataclass default
    assert cfg.method.name == "houlsby" and cfg.method.reduction_factor == 8.0
    assert cfg.method.init == "houlsby"       # method default filled in


def test_method_train_defaults():
    assert resolve({"task": "rte"}, "finetune").train.lr == 2e-5
    assert resolve({"task": "rte"}, "extract").train.lr == 1e-4
    assert resolve({"task": "rte"}, "extract").method.name == "pfeiffer"
    assert resolve({"task": "rte"}, "extract").train.warmup_ratio == 0.1   # 10% warm-up for every method


def test_float_written_without_dot_is_a_number():
    assert resolve(merge_layers(None, {}, ["task=rte", "train.lr=3e-4"]), "extract").train.lr == 3e-4


@pytest.mark.parametrize("override,needle", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; valid keys under train: batch_size"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["method.rank=4"], "unknown config key 'method.rank'"),
    (["train.epochs=abc"], "'train.epochs' must be an integer"),
    (["train.epochs=0"], "'train.epochs' = 0 is out of range"),
    (["train.lr=-1"], "'train.lr' = -1.0 is out of range"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["trainlr"], "is not key=value"),
])
def test_bad_config_values_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        resolve(merge_layers(None, {"task": "rte"}, override), "extract")
    assert needle in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("task: rte\ntrain: {lr: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: malformed YAML"):
        merge_layers(y, {}, [])


def test_all_shipped_tasks_parse():
    names = set(task_files())
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_mismatched", "qnli", "rte", "wnli",
            "cb", "boolq", "scitail", "sick"} <= names
    for n in names:
        spec = load_task(n)
        assert spec.main_metric in spec.metrics and spec.track
    assert load_task("mnli_mismatched").sources.local.files["dev"] == "dev_mismatched.tsv"
    assert load_task("stsb").regression and load_task("stsb").num_labels == 1


def test_unknown_task_lists_known_ones():
    with pytest.raises(UserError, match="unknown task 'nope'; known tasks: .*rte"):
        load_task("nope")


def test_local_task_from_yaml(task_yamls, data_dir):
    spec = load_task(str(task_yamls["toy"]))
    splits = load_splits(spec, str(data_dir), ("train", "dev", "test"))
    assert len(splits["train"]) == 48 and len(splits["dev"]) == 16
    assert splits["train"][1]["label"] == 1 and len(splits["train"][0]["text"]) == 2
    assert splits["test"][0]["label"] is None and splits["test"][1]["id"] == "1"


def test_data_dir_from_environment(task_yamls, data_dir, monkeypatch):
    monkeypatch.setenv("ADAPTERBENCH_DATA_DIR", str(data_dir))
    spec = load_task(str(task_yamls["toyreg"]))
    assert load_splits(spec, None)["dev"][1]["label"] == 1.25


def test_split_by_column_and_label_map(tmp_path):
    (tmp_path / "S").mkdir()
    (tmp_path / "S" / "all.tsv").write_text(
        "a\tb\tlab\tset\r\nx y\tz\tYES\tTRAIN\r\nq\tw\tNO\tTRIAL\r\ne\tr\tNO\tTRAIN\r\n")
    (tmp_path / "t.yaml").write_text(
        "name: s\ntext_columns: [a, b]\nlabel_column: lab\nlabels: ['no', 'yes']\n"
        "sources:\n  local: {dir: S, files: {all: all.tsv}, split_column: set, "
        "split_values: {train: TRAIN, dev: TRIAL}, label_map: {'YES': 'yes', 'NO': 'no'}}\n")
    splits = load_splits(load_task(str(tmp_path / "t.yaml")), None)
    assert [e["label"] for e in splits["train"]] == [1, 0] and len(splits["dev"]) == 1


def test_tsv_quoting_off_and_bom(tmp_path):
    p = tmp_path / "f.tsv"
    p.write_bytes('\ufeffQuality\ttext\n1\the said "yes\n0\t"quoted" start\n'.encode())
    rows = read_rows(p, "tsv", None)
    assert rows[0][1] == {"Quality": "1", "text": 'he said "yes'}
    assert rows[1][1]["text"] == '"quoted" start'


def test_headerless_file(tmp_path):
    p = tmp_path / "f.tsv"
    p.write_text("src\t1\t\tGood sentence.\nsrc\t0\t*\tBad sentence")  # no final newline (CoLA dev)
    rows = read_rows(p, "tsv", ["source", "label", "mark", "sentence"])
    assert [r["label"] for _, r in rows] == ["1", "0"] and rows[1][0] == 2


@pytest.mark.parametrize("content,needle", [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "label 'maybe' is not one of the task's labels"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\n", "3 fields where the header has 4"),
    ("index\tsentence1\tlabel\n0\ta\tpos\n", "column 'sentence2' (text 'sentence2') is missing"),
    ("index\tsentence1\tsentence2\tlabel\n", "is empty"),
])
def test_bad_data_rows(task_yamls, data_dir, content, needle):
    (data_dir / "TOY" / "train.tsv").write_text(content)
    with pytest.raises(UserError) as e:
        load_splits(load_task(str(task_yamls["toy"])), str(data_dir))
    assert needle in str(e.value) and "train.tsv" in str(e.value)


def test_nan_score_rejected(task_yamls, data_dir):
    (data_dir / "TOYREG" / "train.tsv").write_text("sentence\tscore\nthe cat\tnan\n")
    with pytest.raises(UserError, match="not finite"):
        load_splits(load_task(str(task_yamls["toyreg"])), str(data_dir))


def test_missing_files_offline(task_yamls, tmp_path):
    with pytest.raises(UserError, match="local files not found"):
        load_splits(load_task(str(task_yamls["toy"])), str(tmp_path / "nowhere"))


def test_metrics_glue_conventions():
    y = [0, 1, 1, 0, 1, 1]
    p = [0, 1, 0, 0, 1, 1]
    m = metrics.compute(["accuracy", "f1", "mcc"], y, p)
    assert m["accuracy"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert m["f1"] == pytest.approx(100 * 2 * 3 / (2 * 3 + 1), abs=1e-3)  # tp=3, fn=1, fp=0
    assert m["mcc"] == pytest.approx(100 * 0.7071, abs=0.01)
    r = metrics.compute(["pearson", "spearman"], [1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.2, 3.9])
    assert r["spearman"] == 100.0 and 99 < r["pearson"] < 100
    assert not math.isnan(metrics.compute(["pearson"], [1.0, 2.0], [3.0, 3.0])["pearson"])


def test_length_grouped_batches_cover_everything_with_less_padding():
    import torch
    from adapterbench.recipe.splits import padding_stats
    from adapterbench.recipe.sampling import length_grouped
    lengths = [((i * 37) % 100) + 5 for i in range(1000)]
    grouped = length_grouped(lengths, 16, torch.Generator().manual_seed(0), group=10)
    assert sorted(j for b in grouped for j in b) == list(range(1000))
    again = length_grouped(lengths, 16, torch.Generator().manual_seed(0), group=10)
    assert grouped == again
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    plain = [order[i:i + 16] for i in range(0, 1000, 16)]
    g, p = padding_stats(lengths, grouped, 128), padding_stats(lengths, plain, 128)
    assert g["pad_share_dynamic"] < p["pad_share_dynamic"] < g["pad_share_fixed"]
    assert g["real_tokens"] == sum(lengths) and g["fixed_tokens"] == 128 * 1000


def test_token_cache_reads_what_it_wrote(tmp_path, monkeypatch, tiny_bert_dir):
    from transformers import AutoTokenizer
    from adapterbench.data import tokenize
    monkeypatch.setenv("ADAPTERBENCH_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    examples = [{"text": ("the cat sat", "a dog"), "label": 1}, {"text": ("good film", "bad plot is not fine"), "label": 0}]
    first = tokenize(examples, tok, 16)
    files = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = tokenize(examples, tok, 16)
    assert again == first and files[0].stat().st_mtime_ns == stamp          # read back, not rewritten
    assert first[1]["input_ids"] == tok("good film", "bad plot is not fine")["input_ids"]
    assert first[0]["labels"] == 1 and "token_type_ids" in first[0]
    short = tokenize(examples, tok, 5)                                       # another max_length: another entry
    assert len(short[1]["input_ids"]) == 5 and len(list(files[0].parent.glob("*.safetensors"))) == 2
    files[0].write_bytes(b"garbage")                                         # a damaged entry is rebuilt
    assert tokenize(examples, tok, 16) == first


def test_evaluation_in_length_order_returns_predictions_in_item_order():
    """Dev/test are scored in length order (less padding); the predictions come back in the
    items' order and equal each item's prediction made alone."""
    import random

    import numpy as np
    import torch
    from adapterbench.data import Collator
    from adapterbench.models import ClassificationHead, HeadConfig, TaskModel
    from adapterbench.recipe.train import evaluate
    from tests.conftest import tiny_encoder

    rng = random.Random(0)
    items = []
    for i in range(23):
        ids = [2] + [rng.randint(5, 30) for _ in range(rng.randint(3, 30))] + [3]
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": float(i % 5)})
    torch.manual_seed(0)
    model = TaskModel(tiny_encoder("bert"), ClassificationHead(HeadConfig(32, 1, True))).eval()
    task = type("T", (), {"regression": True, "metrics": ["pearson"], "name": "t"})()
    collate = Collator(0)
    got, preds = evaluate(model, [items], [task], collate, batch_size=4, precision="fp32")
    got, preds = got["t"], preds["t"]
    alone = [evaluate(model, [[it]], [task], collate, batch_size=1, precision="fp32")[1]["t"][0] for it in items]
    np.testing.assert_allclose(preds, alone, atol=1e-5)
    labels = [it["labels"] for it in items]
    assert got["pearson"] == pytest.approx(metrics.compute(["pearson"], labels, list(preds))["pearson"], abs=1e-6)


# Runs from before the held-out protocol selected on dev: with train.selection=dev they keep their
# folders (a run selecting on the held-out slice is another run, in another folder).
@pytest.mark.parametrize("user,stage,golden", [
    ({"task": "rte", "model": {"name": "tiny-bert"}, "train": {"warmup_ratio": 0.0, "selection": "dev"}}, "extract",
     "0413fba8"),
    ({"task": "mrpc", "method": {"name": "houlsby"}, "train": {"lr": 3e-4, "warmup_ratio": 0.0, "selection": "dev"},
      "model": {"pooling": "cls"}}, "extract", "31a49fce"),
    ({"task": "rte", "method": {"name": "full"}, "model": {"pooling": "cls"}, "train": {"selection": "dev"}},
     "finetune", "ffd78b8d"),
    # computed at ff28140, before fusion had method.encoder
    ({"task": "rte", "model": {"name": "tiny-bert"}, "method": {"name": "fusion", "adapters": ["/x/rte", "/x/mrpc"]},
      "train": {"selection": "dev"}}, "fuse", "dddb7ae2"),
])
def test_golden_config_hashes_keep_existing_run_folder_names(user, stage, golden):
    """Hashes computed by the code before this session's changes (commit ccd85ae) for configs
    whose results do not change: a new config key must be hash-neutral at its old behaviour,
    or every finished run would be renamed and retrained."""
    from adapterbench.config import config_hash, to_dict
    assert config_hash(to_dict(resolve(user, stage))) == golden


def test_new_default_behaviour_gets_a_new_hash():
    """Changed defaults (10% warm-up, mean pooling for minilm-l6) are new runs, not old ones."""
    from adapterbench.config import config_hash, to_dict
    old = resolve({"task": "rte", "model": {"name": "tiny-bert"}, "train": {"warmup_ratio": 0.0}}, "extract")
    new = resolve({"task": "rte", "model": {"name": "tiny-bert"}}, "extract")
    assert config_hash(to_dict(new)) != config_hash(to_dict(old))
    assert resolve({"task": "rte"}, "extract").model.pooling == "mean"       # minilm-l6 was trained mean-pooled
    assert resolve({"task": "rte", "model": {"name": "tiny-bert"}}, "extract").model.pooling == "cls"
