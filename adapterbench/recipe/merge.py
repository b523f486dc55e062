"""Merging adapters into one (He et al. 2023, MerA, arXiv 2308.15982), with the
"same-track" choice of sources.

The paper's exact alignment is not public; what follows is OUR INTERPRETATION, written into
every merged adapter's config:
- avg: weighted parameter average (weights normalised to sum 1).
- align: per site, the bottleneck units of every adapter are permuted to match the first
  (reference) adapter, then averaged. Permuting units (rows of W_down and b_down with the
  columns of W_up) leaves an adapter's function unchanged, and optimal transport between
  two equal-size unit sets with uniform marginals is a linear assignment, solved exactly
  (scipy's linear_sum_assignment). Cost: squared distance of [W_down row, b_down, W_up
  column], or 1 - correlation of the units' activations on target examples (--align-on).
- ties: TIES-merging (Yadav et al. 2023) with a zero base: keep each adapter's top
  `density` share of entries by magnitude, elect a sign per entry, average the agreeing ones.
- task-arithmetic: sum_i w_i theta_i (Ilharco et al. 2023) with a zero base; weights default to 1.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from adapterbench.errors import UserError
from adapterbench.fileio import prepare_out, save_tensors, staged, write_json
from adapterbench.recipe.artifacts import Source, file_hash, read_sources

STRATEGIES = ("avg", "align", "ties", "task-arithmetic")
NOTE = ("MerA's exact alignment is not public: avg/align/ties/task-arithmetic here are "
        "adapterbench's interpretation (see adapterbench/recipe/merge.py)")


def unit_keys(state: dict) -> list[str]:
    """The site prefixes ('3.ffn') that hold a bottleneck (down/up pair)."""
    return sorted({k[: -len(".down.weight")] for k in state if k.endswith(".down.weight")})


def permute_units(state: dict, site: str, perm) -> None:
    """Reorder one site's bottleneck units in place: function unchanged."""
    perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    state[f"{site}.down.weight"] = state[f"{site}.down.weight"][perm]
    state[f"{site}.down.bias"] = state[f"{site}.down.bias"][perm]
    state[f"{site}.up.weight"] = state[f"{site}.up.weight"][:, perm]


def unit_features(state: dict, site: str) -> torch.Tensor:
    """One row per unit: [W_down row, b_down, W_up column]."""
    return torch.cat([state[f"{site}.down.weight"], state[f"{site}.down.bias"][:, None],
                      state[f"{site}.up.weight"].T], dim=1).double()


def weight_cost(ref: dict, other: dict, site: str) -> np.ndarray:
    return torch.cdist(unit_features(ref, site), unit_features(other, site)).pow(2).numpy()


def activation_cost(ref_acts: torch.Tensor, other_acts: torch.Tensor) -> np.ndarray:
    """1 - Pearson correlation between units' activations (tokens x m each)."""
    def z(a):
        a = a.double() - a.double().mean(0)
        return a / (a.norm(dim=0) + 1e-12)
    return (1.0 - z(ref_acts).T @ z(other_acts)).numpy()


def align(states: list[dict], costs=None, moved: list | None = None) -> list[dict]:
    """Permute the units of states[1:] to match states[0], site by site (exact assignment).
    `moved`, when given, receives per source {site: share of units not mapped to themselves}."""
    from scipy.optimize import linear_sum_assignment
    out = [dict(states[0])]
    if moved is not None:
        moved.append({site: 0.0 for site in unit_keys(states[0])})
    for i, st in enumerate(states[1:], start=1):
        st = dict(st)
        shares = {}
        for site in unit_keys(st):
            cost = costs(i, site) if costs else weight_cost(states[0], st, site)
            rows, cols = linear_sum_assignment(cost)
            perm = cols[np.argsort(rows)]
            shares[site] = float(np.mean(perm != np.arange(len(perm))))
            permute_units(st, site, perm)
        if moved is not None:
            moved.append(shares)
        out.append(st)
    return out


def average(states: list[dict], weights: list[float]) -> dict:
    w = np.asarray(weights, dtype=np.float64)
    if abs(w.sum()) < 1e-12:
        raise UserError("merge weights sum to 0: they cannot be normalised; use task-arithmetic")
    w = w / w.sum()
    return {k: sum(float(wi) * s[k].double() for wi, s in zip(w, states)).to(states[0][k].dtype) for k in states[0]}


def task_arithmetic(states: list[dict], weights: list[float]) -> dict:
    return {k: sum(float(wi) * s[k].double() for wi, s in zip(weights, states)).to(states[0][k].dtype)
            for k in states[0]}


def ties(states: list[dict], weights: list[float], density: float) -> dict:
    """Trim to the top `density` by magnitude, elect signs, mean of agreeing entries."""
    out = {}
    for k in states[0]:
        stack = torch.stack([float(w) * s[k].double() for w, s in zip(weights, states)])
        flat = stack.reshape(len(states), -1)
        keep = max(1, int(round(density * flat.shape[1])))
        thresh = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = merged.reshape(stack.shape[1:]).to(states[0][k].dtype)
    return out


def same_track(sources: list[Source], target: str, include_target: bool) -> list[Source]:
    """Sources whose task is in the target's track (the target's own only if asked)."""
    from adapterbench.tasks import load_task
    track = load_task(target).track
    if not track:
        raise UserError(f"task {target} names no track: add `track:` to its YAML")
    tracks = {s.path: source_track(s) for s in sources}
    keep = [s for s in sources if tracks[s.path] == track
            and (include_target or s.meta.get("task") != load_task(target).name)]
    if not keep:
        raise UserError(f"no source adapter is in track '{track}' of {target} (sources' tasks: "
                        f"{', '.join(str(s.meta.get('task')) for s in sources)})")
    return keep


def source_track(source: Source) -> str:
    """A source adapter's track, from the task.yaml its run folder keeps (else by task name)."""
    from adapterbench.tasks import load_task
    folder = Path(source.path)
    for cand in (folder / "task.yaml", folder.parent / "task.yaml"):
        if cand.is_file():
            return load_task(str(cand)).track
    task = source.meta.get("task")
    return load_task(task).track if task else ""


def merge(paths: list[str], strategy: str = "avg", weights: list[float] | None = None, out: Path | None = None,
          target: str | None = None, same_track_only: bool = False, include_target: bool = False,
          align_on: str | None = None, align_examples: int = 64, density: float = 0.2,
          data_dir: str | None = None, force: bool = False) -> Path:
    """Merge adapter folders into one adapter folder; returns it."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy '{strategy}' must be one of {', '.join(STRATEGIES)}")
    sources = read_sources(paths, "merge", allow_trained_norms=strategy in ("avg", "align"), load=True)
    if same_track_only:
        if not target:
            raise UserError("--same-track needs --target TASK")
        sources = same_track(sources, target, include_target)
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources):
        raise UserError(f"--weights has {len(weights)} values for {len(sources)} sources")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"--weights {','.join(map(str, weights))}: every weight must be a finite number")
    if align_on and align_examples < 1:
        raise UserError(f"--align-examples {align_examples} must be at least 1")
    if not 0 < density <= 1:
        raise UserError(f"--density {density} must be in (0, 1]")
    states = [s.state for s in sources]
    moved: list = []
    if strategy == "align":
        costs = activation_costs(sources, align_on, align_examples, data_dir) if align_on else None
        merged = average(align(states, costs, moved), weights)
    elif strategy == "avg":
        merged = average(states, weights)
    elif strategy == "ties":
        merged = ties(states, weights, density)
    else:
        merged = task_arithmetic(states, weights)
    out = Path(out) if out else default_out(sources, strategy, weights)
    diagnostics = [{"task": s.meta.get("task"), "relative_change": relative_change(s),
                    "units_moved": moved[i] if moved else None} for i, s in enumerate(sources)]
    write_merged(out, sources, merged, strategy, weights, target, same_track_only, align_on, force, diagnostics)
    return out


def relative_change(source: Source) -> float | None:
    """||theta - theta_0|| / ||theta_0|| of a source adapter trained by adapterbench: its
    initialisation is rebuilt from its run's config (the same seed rule as training); None for
    adapters without a run folder (imported ones)."""
    import torch

    from adapterbench.config import RunConfig, build
    from adapterbench.methods import get_method, method_config
    from adapterbench.records import run_config
    from adapterbench.models import load_encoder
    from adapterbench.recipe.runmodel import init_seed
    from adapterbench.recipe.train import seed_everything
    run = Path(source.path).parent
    if not (run / "config.yaml").is_file():
        return None
    cfg = build(RunConfig, run_config(run))
    mcfg = method_config(cfg.method)
    method = get_method(mcfg.name)
    encoder, _ = load_encoder(source.meta["base_model"])
    name = source.meta.get("task") or "task"
    seed_everything(init_seed(cfg, [name]))
    method.apply(encoder, mcfg, [name])
    init = method.trainable_state(encoder, mcfg, [name])
    keys = [k for k in init if k in source.state and ".ffn_norm." not in k and ".attn_norm." not in k]
    num = torch.sqrt(sum((source.state[k].double() - init[k].double()).pow(2).sum() for k in keys))
    den = torch.sqrt(sum(init[k].double().pow(2).sum() for k in keys))
    return round(float(num / den), 6) if float(den) > 0 else None


def default_out(sources, strategy, weights) -> Path:
    blob = "|".join(s.path for s in sources) + strategy + ",".join(map(str, weights))
    return Path("runs") / "merge" / strategy / hashlib.sha256(blob.encode()).hexdigest()[:8]


@staged
def write_merged(out: Path, sources, merged, strategy, weights, target, same_track_only, align_on, force,
                 diagnostics: list | None = None) -> None:
    prepare_out(out, force)
    meta = dict(sources[0].meta)
    meta["task"] = None
    meta["merge"] = {"strategy": strategy, "weights": weights, "target": target, "same_track": same_track_only,
                     "align_on": align_on, "note": NOTE,
                     "kind": "merge" if len(sources) > 1 else "transfer (one source: nothing is merged)",
                     "sources": [{"path": s.path, "task": s.meta.get("task"), "sha256": file_hash(s.weights),
                                  **(diagnostics[i] if diagnostics else {})} for i, s in enumerate(sources)]}
    save_tensors(out / "adapter.safetensors", merged, {"format": "pt"})
    write_json(out / "adapter_config.json", meta)


def activation_costs(sources, task_name: str, n: int, data_dir: str | None):
    """Cost function over (adapter index, site): 1 - correlation of bottleneck activations on
    `n` training examples of `task_name`, each adapter run alone in the base model."""
    from adapterbench.data import Collator, load_splits, tokenize
    from adapterbench.methods.bottleneck import (
        add_adapter,
        load_adapter_state,
        site_paths,
    )
    from adapterbench.models import get_sub, load_encoder
    from adapterbench.recipe.splits import subsample
    from adapterbench.tasks import load_task
    task = load_task(task_name)
    meta = sources[0].meta
    bcfg = sources[0].bottleneck()
    encoder, tokenizer = load_encoder(meta["base_model"])
    examples = subsample(load_splits(task, data_dir, ("train",))["train"], n, 0)
    batch = Collator(tokenizer.pad_token_id or 0)(tokenize(examples, tokenizer, 128))
    batch.pop("labels", None)
    batch.pop("task_ids", None)
    mask = batch["attention_mask"].bool()
    acts = []
    for i, s in enumerate(sources):
        add_adapter(encoder, bcfg, f"m{i}")
        load_adapter_state(encoder, bcfg, f"m{i}", s.state)
    encoder.eval()
    for i in range(len(sources)):
        found, hooks = {}, []
        for key, path, _ in site_paths(encoder, bcfg.placement):
            site = get_sub(encoder, path)
            site.active = [f"m{i}"]
            hooks.append(site.adapters[f"m{i}"].act.register_forward_hook(
                lambda mod, inp, outp, key=key: found.__setitem__(key, outp[mask].detach())))
        with torch.no_grad():
            encoder(**batch)
        for h in hooks:
            h.remove()
        acts.append(found)
    return lambda i, site: activation_cost(acts[0][site], acts[i][site])
