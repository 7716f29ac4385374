"""Ordering components by a score, and comparing two scores over the same components.

Effect scores (atp, exact, logit_yes_no) rank by magnitude: ablating a component that pushes the
verdict either way matters. The study's two heuristics rank by value: attention to the target is
never negative, and the study took the value vectors most aligned with the probe's "correct" class.
"""

from __future__ import annotations

import numpy as np

# Rankings that order by the signed score, largest first; every other ranking orders by |score|.
SIGNED_RANKINGS = frozenset({"attn_to_target", "probe_cos"})


def ranked(scores: np.ndarray, ranking: str) -> list[tuple[int, int]]:
    """`(layer, index)` of the components of a `[L, X]` score map, best first; NaN (unscored) left out.

    Ties keep layer-major order (stable sort), so a ranking is reproducible.
    """
    flat = np.asarray(scores, dtype=np.float64).ravel()
    key = flat if ranking in SIGNED_RANKINGS else np.abs(flat)
    order = np.argsort(-key, kind="stable")
    order = order[np.isfinite(key[order])]
    width = scores.shape[1]
    return [(int(i // width), int(i % width)) for i in order]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _paired_finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"correlation of {x.size} and {y.size} values: they must pair up")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both are finite; NaN with < 2 pairs or no spread."""
    x, y = _paired_finite(x, y)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks) over the pairs where both are finite."""
    x, y = _paired_finite(x, y)
    return pearson(_average_ranks(x), _average_ranks(y)) if x.size >= 2 else float("nan")
