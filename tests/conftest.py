"""Tiny in-memory encoders (hidden 32, 2 layers) for every supported architecture, a tiny
BERT model folder with a word-level tokenizer, and offline fixture tasks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ADAPTERBENCH_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                          f"adapterbench-test-cache-{os.getuid()}"))

WORDS = ("the a cat dog sat on mat good bad movie is was not very fine awful great film "
         "plot acting and but it this that").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tiny_config(kind: str):
    import transformers as T
    common = dict(vocab_size=len(VOCAB) + 5, max_position_embeddings=130)   # model.max_length 128 fits
    if kind == "distilbert":
        return T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **common)
    if kind == "mpnet":
        return T.MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                             pad_token_id=1, **common)
    cls = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig,
           "electra": T.ElectraConfig, "deberta-v2": T.DebertaV2Config}[kind]
    extra = {"embedding_size": 32} if kind == "electra" else {}
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
               pad_token_id=0, **common, **extra)


ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "mpnet"]


def tiny_encoder(kind: str, seed: int = 0):
    from transformers import AutoModel
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(kind))
    model.eval()
    return model


def tiny_batch(seed: int = 0, batch: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT (weights + tokenizer), loadable like any hub folder."""
    from transformers import BertTokenizer
    out = tmp_path_factory.mktemp("tiny-bert")
    tiny_encoder("bert").save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(out)
    return out


def _sentence(rng: random.Random, good: bool) -> str:
    mood = ["good", "great", "fine"] if good else ["bad", "awful", "not"]
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))] + [rng.choice(mood)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """Fixture tasks in glue_data layout: TOY (pairs, 2 labels, TSV) and TOYREG (regression)."""
    return write_data(tmp_path / "data")


def write_data(root: Path) -> Path:
    rng = random.Random(0)
    for name, n in (("train", 48), ("dev", 16)):
        (root / "TOY").mkdir(parents=True, exist_ok=True)
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            y = i % 2
            lines.append(f"{i}\t{_sentence(rng, y == 1)}\t{_sentence(rng, y == 1)}\t{['neg', 'pos'][y]}")
        (root / "TOY" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        (root / "TOYREG").mkdir(parents=True, exist_ok=True)
        lines = ["sentence\tscore"] + [f"{_sentence(rng, i % 2 == 0)}\t{(i % 5) * 1.25}" for i in range(n)]
        (root / "TOYREG" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    (root / "TOY" / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tthe cat\ta dog\n1\tgood film\tbad plot\n")
    return root


TOY_TASK = """\
name: toy
version: 1
track: nli
text_columns: [sentence1, sentence2]
labels: [neg, pos]
id_column: index
metrics: [accuracy, f1]
main_metric: accuracy
sources:
  local: {dir: TOY, format: tsv, files: {train: train.tsv, dev: dev.tsv, test: test.tsv}}
"""

TOYREG_TASK = """\
name: toyreg
version: 1
text_columns: [sentence]
label_column: score
regression: true
metrics: [pearson, spearman]
main_metric: pearson
sources:
  local: {dir: TOYREG, format: tsv, files: {train: train.tsv, dev: dev.tsv}}
"""


@pytest.fixture()
def task_yamls(tmp_path) -> dict[str, Path]:
    return write_task_yamls(tmp_path)


def write_task_yamls(folder: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("toy", TOY_TASK), ("toyreg", TOYREG_TASK)):
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(text)
    return out


SLOW_TIER = Path(__file__).with_name("slow_tier.txt")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests listed in slow_tier.txt (measured, with how) join the slow tier, so `-m "not slow"`
    stays the quick inner loop; CI runs both tiers."""
    listed = {line.strip() for line in SLOW_TIER.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)
