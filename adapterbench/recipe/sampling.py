"""Batch sources: what feeds the one training loop (train.py). The only difference between a
single-task and a multi-task run is here, in which examples make up the next batch.

A source yields *global* batches (lists of tokenized items) that every process computes
identically from its seeds; the loop gives each process its share. `state()` at any moment
(JSON) and `restore(state)` continue the stream exactly where it was, so a resumed run sees
the same batches.

- `Shuffled`: one task, a seeded shuffle per epoch, or length-grouped batches.
- `TaskMixture`: several tasks; which task feeds the next batch is drawn from
  proportional: p_t ~ n_t;  uniform: p_t = 1/K;  temperature: p_t ~ n_t^(1/T);
  annealed (Stickland & Murray 2019): p_t ~ n_t^alpha, alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch e of E.
- `Uncertainty`: MT-Uncertainty (Pilault et al. 2021, Sec. 3.3; reference code's
  `MtUcertaintyIterator`): one batch from every task, each example scored by its prediction
  entropy / log(#labels) times its task's mean / the largest task mean, the top b kept.
  Scored without gradients but in train mode (dropout on), as the reference does. A regression
  task has no entropy: it borrows the scores of its proxy classification task
  (`sampling.uncertainty_proxy`, STS-B -> MRPC by default as in the reference), one to one;
  a regression task without a proxy gets the highest score of the step for its examples, so it
  is never starved (documented choice: the paper gives no rule).
An epoch is sum_t n_t / b steps for every multi-task scheme by default, so every scheme trains
on as many examples as plain MTL; `sampling.epoch: reference` makes it the reference code's
T * max_t ceil(n_t / b) steps (set in stages.batch_source), for every scheme alike.
Each task's examples come in a seeded shuffle per pass, or with `sampling.group_by_length` in
length-grouped batches (`TaskStreams`), as `train.group_by_length` orders a single task's.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import torch

from adapterbench.errors import UserError

SCHEMES = ("proportional", "uniform", "temperature", "annealed", "uncertainty")
DEFAULT_PROXIES = {"stsb": "mrpc"}   # the reference code's only regression task borrows MRPC's scores


def task_probs(sizes: list[int], scheme: str, temperature: float = 2.0, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if scheme == "proportional":
        w = n
    elif scheme == "uniform":
        w = np.ones_like(n)
    elif scheme == "temperature":
        w = n ** (1.0 / temperature)
    elif scheme == "annealed":
        w = n ** (1.0 - 0.8 * epoch / max(epochs - 1, 1))
    else:
        raise UserError(f"sampling.scheme '{scheme}' has no fixed task distribution")
    return w / w.sum()


class Shuffled:
    """One task: every epoch a seeded permutation cut into batches (or length-grouped batches:
    shuffle, cut into mega-batches of 50 batches, sort each by length, shuffle the batches)."""

    def __init__(self, items: list[dict], batch_size: int, seed: int, group_by_length: bool = False):
        self.items, self.b, self.grouped = items, batch_size, group_by_length
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch_state = self.gen.get_state()    # generator state at the start of the current epoch
        self.pos = 0                               # batches given out in the current epoch
        self.steps_per_epoch = max(1, math.ceil(len(items) / batch_size))

    def _order(self) -> list[list[int]]:
        if self.grouped:
            return length_grouped([len(it["input_ids"]) for it in self.items], self.b, self.gen)
        perm = torch.randperm(len(self.items), generator=self.gen).tolist()
        return [perm[i:i + self.b] for i in range(0, len(perm), self.b)]

    def epoch(self, e: int):
        self.gen.set_state(self.epoch_state)
        order = self._order()
        while self.pos < len(order):
            batch = [self.items[i] for i in order[self.pos]]
            self.pos += 1
            yield batch
        self.epoch_state, self.pos = self.gen.get_state(), 0

    def state(self) -> dict:
        return {"gen": self.epoch_state.tolist(), "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch_state = torch.tensor(state["gen"], dtype=torch.uint8)
        self.pos = state["pos"]


def length_grouped(lengths: list[int], batch_size: int, gen: torch.Generator, group: int = 50) -> list[list[int]]:
    """Index batches of similar length in a seeded random order: shuffle, cut into mega-batches
    of `group` batches, sort each by length (longest first), shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    mega, batches = batch_size * group, []
    for i in range(0, len(perm), mega):
        chunk = sorted(perm[i:i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


class TaskStreams:
    """Endless shuffled batches per task (reshuffled after each pass), seeded. `grouped`
    (sampling.group_by_length): each pass in length-grouped batches (`length_grouped`), so a
    batch of one task pads little; the seed of each pass comes from the same generator."""

    def __init__(self, items: list[list[dict]], batch_size: int, seed: int, grouped: bool = False):
        self.items, self.b, self.grouped = items, batch_size, grouped
        self.rng = random.Random(seed)
        self.order: list[list[int]] = [[] for _ in items]

    def refill(self, t: int) -> list[int]:
        """One pass over task t, in the order `take` pops it (from the end)."""
        if not self.grouped:
            order = list(range(len(self.items[t])))
            self.rng.shuffle(order)
            return order
        gen = torch.Generator().manual_seed(self.rng.getrandbits(63))
        batches = length_grouped([len(it["input_ids"]) for it in self.items[t]], self.b, gen)
        return [i for batch in reversed(batches) for i in reversed(batch)]

    def take(self, t: int, k: int | None = None) -> list[dict]:
        k = k or self.b
        out = []
        while len(out) < k:
            if not self.order[t]:
                self.order[t] = self.refill(t)
            out.append(self.items[t][self.order[t].pop()])
        return out


class TaskMixture:
    """Several tasks: each step one task, drawn by `scheme`, gives the whole batch."""

    def __init__(self, items: list[list[dict]], batch_size: int, seed: int, scheme: str,
                 temperature: float = 2.0, epochs: int = 1, grouped: bool = False):
        if scheme not in SCHEMES:
            raise UserError(f"sampling.scheme '{scheme}' must be one of {', '.join(SCHEMES)}")
        self.items, self.b, self.scheme = items, batch_size, scheme
        self.temperature, self.epochs = temperature, epochs
        self.sizes = [len(x) for x in items]
        self.streams = TaskStreams(items, batch_size, seed, grouped)
        self.rng = np.random.default_rng(seed)
        self.pos = 0
        self.steps_per_epoch = max(1, sum(self.sizes) // batch_size)
        self.drawn = 0                                  # examples drawn (scored or trained)
        self.picks = [[0] * len(items)]                 # examples trained per task, per epoch
        self.used = [set() for _ in items]              # distinct examples trained per task

    def next_batch(self, e: int) -> list[dict]:
        p = task_probs(self.sizes, self.scheme, self.temperature, e, self.epochs)
        chosen = self.streams.take(int(self.rng.choice(len(self.items), p=p)))
        self.drawn += len(chosen)
        return chosen

    def epoch(self, e: int):
        while len(self.picks) <= e:
            self.picks.append([0] * len(self.items))
        while self.pos < self.steps_per_epoch:
            batch = self.next_batch(e)
            for it in batch:
                self.picks[e][it["task_id"]] += 1
                self.used[it["task_id"]].add(it["uid"])
            self.pos += 1
            yield batch
        self.pos = 0

    def state(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state), "py": json.dumps(self.streams.rng.getstate()),
                "orders": self.streams.order, "pos": self.pos, "drawn": self.drawn, "picks": self.picks,
                "used": [sorted(u) for u in self.used]}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.streams.rng.setstate(_tuple(json.loads(state["py"])))
        self.streams.order = state["orders"]
        self.pos, self.drawn, self.picks = state["pos"], state["drawn"], state["picks"]
        self.used = [set(u) for u in state["used"]]


class Uncertainty(TaskMixture):
    """MT-Uncertainty: b candidates from every task, the b most uncertain kept (see the module
    docstring). `scorer(candidates, position)` returns each classification candidate's normalised entropy
    (NaN for regression candidates); the recipe builds it from the model."""

    def __init__(self, items, batch_size, seed, tasks, proxies: dict[str, str], scorer=None, grouped: bool = False):
        super().__init__(items, batch_size, seed, "proportional", grouped=grouped)
        self.tasks, self.scorer = tasks, scorer
        self.proxy = proxy_index(tasks, proxies)

    def next_batch(self, e: int) -> list[dict]:
        cands = [it for t in range(len(self.items)) for it in self.streams.take(t)]
        scores = self.scorer(cands, self.drawn)     # `drawn` (restored on resume) seeds the scoring dropout
        self.drawn += len(cands)
        return pick_uncertain(cands, scores, self.b, self.proxy)


def proxy_index(tasks, proxies: dict[str, str]) -> dict[int, int]:
    """{regression task's index: its proxy classification task's index} for the proxies named
    among `tasks` (a proxy that is absent or itself a regression task is ignored)."""
    names, out = [t.name for t in tasks], {}
    for i, t in enumerate(tasks):
        if t.regression and proxies.get(t.name) in names and not tasks[names.index(proxies[t.name])].regression:
            out[i] = names.index(proxies[t.name])
    return out


def uncertainty_profile(items, tasks, scorer, b: int, proxies: dict[str, str], draws: int, seed: int = 0) -> dict:
    """What MT-Uncertainty keeps from a model as it is now: `draws` times, b random training
    candidates from every task, scored by `scorer` (the run's, `stages.uncertainty_scorer`) and
    kept as `pick_uncertain` keeps them. Per task: the mean normalised entropy of its candidates
    (None for a regression task), its weight (that mean over the largest task mean) and its share
    of the kept examples. Explains a run's `sampling_share`: which tasks the sampler feeds, and why."""
    rng = random.Random(seed)
    proxy = proxy_index(tasks, proxies)
    entropy = [[] for _ in tasks]
    kept = [0] * len(tasks)
    for d in range(draws):
        cands = [it for its in items for it in rng.sample(its, min(b, len(its)))]
        scores = scorer(cands, d * len(cands))
        for c, v in zip(cands, scores.tolist()):
            if not math.isnan(v):
                entropy[c["task_id"]].append(v)
        for c in pick_uncertain(cands, scores, b, proxy):
            kept[c["task_id"]] += 1
    means = [sum(e) / len(e) if e else None for e in entropy]
    top = max((m for m in means if m is not None), default=None)
    return {t.name: {"entropy": means[i], "weight": None if means[i] is None or not top else means[i] / top,
                     "kept": kept[i] / max(sum(kept), 1)} for i, t in enumerate(tasks)}


def pick_uncertain(cands: list[dict], entropy: torch.Tensor, b: int, proxy: dict[int, int]) -> list[dict]:
    """Keep the b candidates with the highest task-weighted entropy; regression candidates
    take their proxy's scores one to one (the k-th regression candidate the k-th proxy
    candidate's score), or, without a proxy, the step's highest score."""
    task_of = torch.tensor([c["task_id"] for c in cands])
    score = entropy.clone().float()
    means = {int(t): score[task_of == t].mean().item() for t in task_of.unique() if not score[task_of == t].isnan().any()}
    top = max(means.values()) if means else 1.0
    for t, m in means.items():
        score[task_of == t] *= m / max(top, 1e-12)
    for t, p in proxy.items():
        rows, src = (task_of == t).nonzero().squeeze(-1), (task_of == p).nonzero().squeeze(-1)
        k = min(len(rows), len(src))
        score[rows[:k]] = score[src[:k]]
    known = score[~score.isnan()]
    score = torch.where(score.isnan(), known.max() if len(known) else torch.tensor(1.0), score)
    keep = score.argsort(descending=True, stable=True)[:b]
    return [cands[i] for i in sorted(keep.tolist())]


def _tuple(x):
    """JSON turned Python's random state tuples into lists; turn them back."""
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x
