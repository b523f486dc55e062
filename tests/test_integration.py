"""Real GLUE files and the real MiniLM model; runs only when ADAPTERBENCH_DATA_DIR is set
(.ci/run points it at ../shared/data/glue)."""

import json
import os

import pytest
from typer.testing import CliRunner

from adapterbench.cli import app
from adapterbench.data import load_splits
from adapterbench.tasks import load_task

DATA = os.environ.get("ADAPTERBENCH_DATA_DIR")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not DATA, reason="set ADAPTERBENCH_DATA_DIR to a glue_data folder")]

# Row counts from shared/data/MANIFEST.md (official split sizes).
SIZES = {"rte": (2490, 277, 3000), "mrpc": (3668, 408, 1725), "stsb": (5749, 1500, 1379),
         "cola": (8551, 1043, 1063), "sst2": (67349, 872, 1821), "wnli": (635, 71, 146),
         "cb": (250, 56, 250), "sick": (4439, 495, 4906)}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_real_files_load_with_their_quirks(task):
    spec = load_task(task)
    splits = load_splits(spec, DATA, ("train", "dev", "test"))
    assert tuple(len(splits[s]) for s in ("train", "dev", "test")) == SIZES[task]
    assert all(e["label"] is not None for e in splits["dev"])
    if not spec.regression:
        assert set(e["label"] for e in splits["train"]) == set(range(len(spec.labels)))


def test_label_distributions_match_manifest():
    cola = load_splits(load_task("cola"), DATA, ("train", "dev"))
    assert sum(e["label"] for e in cola["train"]) == 6023 and sum(e["label"] for e in cola["dev"]) == 721
    mrpc = load_splits(load_task("mrpc"), DATA, ("dev",))["dev"]
    assert sum(e["label"] for e in mrpc) == 279
    qnli = load_splits(load_task("qnli"), DATA, ("dev",))["dev"]
    assert len(qnli) == 5463


@pytest.mark.slow
def test_extract_a_few_steps_on_real_rte(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--task", "rte", "--model", "minilm-l6", "--out", str(tmp_path),
                            "train.limit=32", "train.eval_limit=32", "train.max_steps=2", "train.batch_size=16"])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("extract/pfeiffer/rte/*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["steps"] == 2 and m["tasks"]["rte"]["dev_examples"] == 32
    assert m["trainable_params"] == 6 * (2 * 384 * 24 + 384 + 24) + 384 * 384 + 384 + 2 * 384 + 2
    r = runner.invoke(app, ["evaluate", str(run)])
    assert r.exit_code == 0 and json.loads((run / "eval_dev.json").read_text())["reproduced"] is True
