"""Which examples a run uses: the held-out selection slice cut from train (stratified, seeded,
the same for every method at a data seed), k-shot samples, limits, and padding statistics."""

from __future__ import annotations

import math
import random

import numpy as np

from adapterbench.config import RunConfig
from adapterbench.data import tokenize
from adapterbench.errors import UserError


def subsample(examples: list, limit: int, seed: int) -> list:
    """The first `limit` examples of a seeded shuffle (0 = all), so subsets are class-mixed."""
    if not limit or limit >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def heldout_size(pool: int, used: int, fraction: float, minimum: int) -> int:
    """How many training examples the selection slice takes: `fraction` of the examples a run
    would train on (`used`), at least `minimum`, and never more than half of the split (`pool`)."""
    return min(max(math.ceil(fraction * used), minimum), pool // 2)


def heldout_split(examples: list, size: int, regression: bool, seed: int) -> tuple[list, list]:
    """(held-out slice, the rest): a seeded slice of `size` training examples, stratified by
    label (a regression task by label quintile), both in file order. The slice depends only on
    the split, `size` and `seed`, so every method at one data seed selects on the same examples
    and never trains on them (comparisons stay paired)."""
    from sklearn.model_selection import train_test_split
    if size < 1 or size >= len(examples):
        raise UserError(f"the held-out selection slice would hold {size} of {len(examples)} training examples: "
                        f"use train.selection=dev (or last) for a task this small")
    labels = np.array([e["label"] for e in examples], dtype=float)
    strata = np.digitize(labels, np.quantile(labels, [0.2, 0.4, 0.6, 0.8])) if regression else labels
    index = np.arange(len(examples))
    try:
        rest, held = train_test_split(index, test_size=size, stratify=strata, random_state=seed)
    except ValueError:            # a stratum too small to split: a plain seeded slice
        rest, held = train_test_split(index, test_size=size, random_state=seed)
    return [examples[i] for i in sorted(held)], [examples[i] for i in sorted(rest)]


def few_shot(examples: list, k: int, regression: bool, seed: int) -> list:
    """k examples per class (k in all for regression), drawn with `seed`, in file order."""
    rng = random.Random(seed)
    if regression:
        return subsample(examples, k, seed)
    by_class: dict = {}
    for i, e in enumerate(examples):
        by_class.setdefault(e["label"], []).append(i)
    keep = []
    for label, idx in sorted(by_class.items()):
        if len(idx) < k:
            raise UserError(f"train.shots={k} but class {label} has only {len(idx)} training examples: "
                            f"lower train.shots")
        keep += rng.sample(idx, k)
    return [examples[i] for i in sorted(keep)]


def padding_stats(lengths: list[int], batches: list[list[int]], pad_to: int) -> dict:
    """Token counts for these batches padded to their longest member vs padded to `pad_to`."""
    real = sum(lengths)
    dynamic = sum(len(b) * max(lengths[j] for j in b) for b in batches)
    fixed = len(lengths) * pad_to
    return {"real_tokens": real, "dynamic_tokens": dynamic, "fixed_tokens": fixed,
            "pad_share_dynamic": 1 - real / dynamic, "pad_share_fixed": 1 - real / fixed,
            "tokens_saved_vs_fixed": 1 - dynamic / fixed}


def prepare_items(task, splits, tokenizer, cfg: RunConfig, task_id: int = 0) -> dict:
    """Token ids per split. With train.selection=heldout the training split first gives up the
    held-out selection slice (`items["heldout"]`); what remains is cut by train.shots and
    train.limit."""
    items = {}
    data_seed = cfg.data.data_seed if cfg.data.data_seed is not None else cfg.seed
    for name, examples in splits.items():
        tokens = tokenize(examples, tokenizer, cfg.model.max_length)  # the whole split: one cache entry
        position = {id(e): i for i, e in enumerate(examples)}
        pick = lambda chosen: [dict(tokens[position[id(e)]]) for e in chosen]
        if name == "train" and cfg.train.selection == "heldout":
            size = heldout_size(len(examples), examples_used(task, examples, cfg.train),
                                cfg.train.heldout_fraction, cfg.train.heldout_min)
            held, examples = heldout_split(examples, size, task.regression, data_seed)
            items["heldout"] = pick(held)
        if name == "train" and cfg.train.shots:
            examples = few_shot(examples, cfg.train.shots, task.regression, data_seed)
        limit = {"train": cfg.train.limit, "dev": cfg.train.eval_limit}.get(name, 0)
        items[name] = pick(subsample(examples, limit, data_seed))
    for part in items.values():
        for j, it in enumerate(part):
            it["task_id"], it["uid"] = task_id, j
    return items


def examples_used(task, examples: list, train) -> int:
    """How many training examples a run trains on before any selection slice is cut: k per
    class with train.shots, at most train.limit, else the whole split."""
    if train.shots:
        return train.shots * (1 if task.regression else len({e["label"] for e in examples}))
    return min(train.limit, len(examples)) if train.limit else len(examples)
