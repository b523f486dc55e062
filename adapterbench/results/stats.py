"""Statistics a reviewer accepts for a claim "row A beats (or matches) row B on these tasks".

The effect is the **stratified mean difference** Δ = (1/T) Σ_t d̄_t, the mean over the T tasks of
each task's mean paired difference d̄_t = mean over seeds s of (A_ts − B_ts): tasks are strata,
not replicates, so a task with many seeds does not outweigh one with few. Its variance is
Var(Δ) = (1/T²) Σ_t s_t²/n_t (s_t: the standard deviation of task t's paired differences over
its n_t seeds), with Welch–Satterthwaite degrees of freedom; the CI and tests use Student's t
with those degrees of freedom.

- gain claims: one-sided test of Δ > 0 at α = 0.05, Holm-adjusted across the gain claims of one
  claims file (Holm 1979);
- parity claims: non-inferiority, one-sided test of Δ > −margin at the same α (no Holm: a
  parity claim is not a discovery);
- power at the paper's Δ: the probability that the same test rejects, with these per-task
  spreads and n seeds, if the true Δ were the paper's (non-central t); and the seeds per task
  that would give 80%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05          # one-sided, for gain and for parity (non-inferiority) claims alike
CI_LEVEL = 0.95
TARGET_POWER = 0.8


@dataclass(frozen=True)
class Estimate:
    delta: float                  # stratified mean difference
    se: float                     # its standard error
    df: float                     # Welch–Satterthwaite degrees of freedom
    variances: tuple              # per task: s_t² (sample variance of the paired differences)
    seeds: tuple                  # per task: n_t

    @property
    def ci(self) -> tuple[float, float]:
        """The two-sided CI_LEVEL confidence interval of Δ."""
        from scipy.stats import t
        half = float(t.ppf(0.5 + CI_LEVEL / 2, self.df)) * self.se if self.se > 0 else 0.0
        return self.delta - half, self.delta + half

    def p_greater(self, bound: float = 0.0) -> float:
        """One-sided p of H0: Δ ≤ bound against Δ > bound."""
        from scipy.stats import t
        if self.se == 0:
            return 0.0 if self.delta > bound else 1.0
        return float(t.sf((self.delta - bound) / self.se, self.df))


def stratified(diffs: dict[str, list[float]]) -> Estimate:
    """Δ and its standard error from each task's paired differences (at least 2 seeds each)."""
    tasks = [t for t in diffs if len(diffs[t]) >= 2]
    if not tasks or len(tasks) != len(diffs):
        raise ValueError("every task needs at least 2 paired differences")
    T = len(tasks)
    means = [float(np.mean(diffs[t])) for t in tasks]
    var = [float(np.var(diffs[t], ddof=1)) for t in tasks]
    n = [len(diffs[t]) for t in tasks]
    return Estimate(float(np.mean(means)), _se(var, n, T), _df(var, n), tuple(var), tuple(n))


def _se(var, n, T) -> float:
    return math.sqrt(sum(v / k for v, k in zip(var, n))) / T


def _df(var, n) -> float:
    """Welch–Satterthwaite: (Σ v_t/n_t)² / Σ (v_t/n_t)²/(n_t − 1); with no spread, Σ (n_t − 1)."""
    parts = [v / k for v, k in zip(var, n)]
    den = sum(p * p / (k - 1) for p, k in zip(parts, n))
    return (sum(parts) ** 2 / den) if den > 0 else float(sum(k - 1 for k in n))


def power(est: Estimate, effect: float, seeds: int | None = None, shift: float = 0.0) -> float | None:
    """Power of the one-sided test of Δ > −shift (gain: shift 0; parity: the margin) at ALPHA if
    the true Δ were `effect`, with the observed per-task spreads and `seeds` per task (default:
    as observed). None where the spread is 0 (nothing to say)."""
    from scipy.stats import nct, t
    n = tuple([seeds] * len(est.seeds)) if seeds else est.seeds
    se = _se(est.variances, n, len(n))
    if se == 0:
        return None
    df = _df(est.variances, n)
    return float(nct.sf(t.ppf(1 - ALPHA, df), df, (effect + shift) / se))


def seeds_for_power(est: Estimate, effect: float, shift: float = 0.0, most: int = 100) -> int | None:
    """The fewest seeds per task giving TARGET_POWER at `effect` (None: not within `most`, or no spread)."""
    for k in range(2, most + 1):
        p = power(est, effect, k, shift)
        if p is None:
            return None
        if p >= TARGET_POWER:
            return k
    return None


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at ALPHA over the list)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
