"""GLUE metrics by convention (CoLA MCC, MRPC/QQP F1 + accuracy, STS-B Pearson + Spearman),
computed with scikit-learn/scipy, the libraries the Hub's metric scripts call anyway."""

from __future__ import annotations

import numpy as np

# scipy and scikit-learn load on the first score, not with the task registry (`--help` stays quick)


def _acc(y, p):
    from sklearn.metrics import accuracy_score
    return accuracy_score(y, p)


def _f1(y, p):
    from sklearn.metrics import f1_score
    return f1_score(y, p, average="binary" if len(set(y) | set(p)) <= 2 else "macro")


def _macro_f1(y, p):
    from sklearn.metrics import f1_score
    return f1_score(y, p, average="macro")


def _mcc(y, p):
    from sklearn.metrics import matthews_corrcoef
    return matthews_corrcoef(y, p)


def _pearson(y, p):
    from scipy.stats import pearsonr
    return pearsonr(p, y)[0] if np.ptp(np.asarray(p, dtype=float)) > 0 else 0.0


def _spearman(y, p):
    from scipy.stats import spearmanr
    return spearmanr(p, y)[0] if np.ptp(np.asarray(p, dtype=float)) > 0 else 0.0


# name -> (function(labels, predictions), higher is better). All are reported x100.
METRICS = {
    "accuracy": (_acc, True),
    "f1": (_f1, True),
    "macro_f1": (_macro_f1, True),
    "mcc": (_mcc, True),
    "pearson": (_pearson, True),
    "spearman": (_spearman, True),
}


def compute(names: list[str], labels, predictions) -> dict[str, float]:
    """Each named metric, as a percentage rounded to 1e-4 points."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    out = {}
    for n in names:
        value = float(METRICS[n][0](labels, predictions))
        out[n] = round(100.0 * (0.0 if np.isnan(value) else value), 4)
    return out
