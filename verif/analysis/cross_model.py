"""Is the mechanism the same in two models? One sweep's effects compared across models, prompt by prompt.

A sweep scores every model on the same prompts under the same conditions, so an effect in model a and
the same effect in model b are *paired* twice: by condition and by prompt. For each pair of models
(a before b in `model.path`) and each condition they share, `cross_model_table` compares

* `effect_a`, `effect_b`: each model's paired effect (condition minus baseline, as `stats.summarize`);
* `diff = effect_b - effect_a` with a bootstrap CI that resamples prompts, the same prompts for both
  models and both conditions of each, so prompt-to-prompt variation cancels from the difference;
* `ratio = effect_b / effect_a`;
* Pearson and Spearman correlations of the two models' per-prompt effects, with CIs;
* on the target's rows, the target-vs-controls test applied to `diff` (`stats.target_vs_controls`):
  did the mechanism change more at the target than at random sets of its size?

Metrics (`CROSS_METRICS`): `delta_correct` and `delta_incorrect` (paired change of normalised P(Yes)
on correct / incorrect attempts, as in summary.parquet), `delta_auroc` (change of the AUROC of
normalised P(Yes), correct vs incorrect; it has no per-prompt value, so no correlation) and
`delta_log_odds` (paired change of log P(Yes) - log P(No), in nats, over all attempts).

The bootstrap draws prompts with replacement within each label (each resample keeps the numbers of
correct and incorrect attempts, so an AUROC is always defined) and recomputes every statistic,
AUROCs included, on the resample. A resample is a matrix of counts (how often each prompt was drawn),
and every statistic is a weighted one, so the point estimate (all counts 1) and the resamples run the
same code: two identical models give a difference of exactly 0 and correlations of exactly 1.
A prompt counts for a condition when both models' rows under it and under the baseline are finite.

With `ablation.sweeps: [single_head]` (or `layer`) in both models, `effect_maps_table` compares the
per-head (per-layer) effect maps: the Spearman correlation across heads with a bootstrap CI over
prompts, and the overlap of the two models' top-k heads with its hypergeometric p against chance.

Pure polars + numpy, seeded as `stats` seeds (`stats.group_seed`); no torch, Ray or W&B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from verif.analysis import stats
from verif.analysis.stats import WeightedAuroc, stratified_counts

__all__ = [
    "CROSS_METRICS",
    "PER_PROMPT_METRICS",
    "MAP_SWEEPS",
    "pair_name",
    "model_pairs",
    "weighted_pearson",
    "weighted_spearman",
    "stratified_counts",
    "overlap_p",
    "topk_overlap",
    "cross_model_table",
    "effect_maps_table",
]

CROSS_METRICS: tuple[str, ...] = ("delta_correct", "delta_incorrect", "delta_auroc", "delta_log_odds")
# Metrics that are means of one value per prompt (so the two models' values can be correlated).
PER_PROMPT_METRICS: tuple[str, ...] = ("delta_correct", "delta_incorrect", "delta_log_odds")
# Condition kinds whose conditions form an effect map (one per head, one per layer).
MAP_SWEEPS: tuple[str, ...] = ("single_head", "layer")
# Without a target, the top-k overlap of an effect map uses this fraction of its components.
TOPK_FRACTION = 0.1
# Resamples are evaluated in chunks of at most this many (resample x prompt) counts: 512 KiB of float64,
# which stays in a core's cache (4x faster than chunks of 2000 resamples of 1024 prompts, measured).
_CHUNK_ENTRIES = 1 << 16


def pair_name(a: str, b: str) -> str:
    """The name of a model pair in tables, files and W&B keys (`cross/<a>__<b>/...`)."""
    return f"{a}__{b}"


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair (a, b) with a before b in `models` (the order of `model.path`)."""
    return [(models[i], models[j]) for i in range(len(models)) for j in range(i + 1, len(models))]


# --------------------------------------------------------------------------------------------
# weighted statistics: one row of weights per resample (counts), or all ones for the estimate
# --------------------------------------------------------------------------------------------


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of x and y (`[n]`, or `[B, n]` one row per resample) under the weights `w`
    (`[B, n]`), one per row of w; NaN where either side has no spread.

    Both sides are centred before the products (no cancellation), and the denominator is
    sqrt(sxx * syy), so x == y gives exactly 1 (the square root of a square is exact).
    """
    w = np.atleast_2d(w)
    total = w.sum(-1)
    if x.ndim == 1 and y.ndim == 1:  # the same values in every resample: matrix-vector products
        x, y = x - x.mean(), y - y.mean()
        sx, sy = w @ x, w @ y
        sxy = w @ (x * y) - sx * sy / total
        sxx, syy = w @ (x * x) - sx * sx / total, w @ (y * y) - sy * sy / total
        return _correlation(sxy, sxx, syy)
    dx = x - np.einsum("bn,bn->b", w, x)[:, None] / total[:, None]
    dy = y - np.einsum("bn,bn->b", w, y)[:, None] / total[:, None]
    return _centred_pearson(dx, dy, w)


def _centred_pearson(dx: np.ndarray, dy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of deviations from the rows' weighted means."""
    wdx, wdy = w * dx, w * dy
    return _correlation(np.einsum("bn,bn->b", wdx, dy), np.einsum("bn,bn->b", wdx, dx), np.einsum("bn,bn->b", wdy, dy))


def _correlation(sxy: np.ndarray, sxx: np.ndarray, syy: np.ndarray) -> np.ndarray:
    denom = np.sqrt(np.maximum(sxx, 0.0) * np.maximum(syy, 0.0))  # no spread can round to a tiny negative
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, sxy / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


class _Ranker:
    """The sort of fixed values `[n]`, for their average ranks in any resample: a value drawn c times
    takes c consecutive ranks, and equal values (drawn or tied) share the mean of theirs."""

    def __init__(self, x: np.ndarray):
        self.order = np.argsort(x, kind="stable")
        xs = x[self.order]
        new = np.r_[True, xs[1:] != xs[:-1]]
        self.starts = None if new.all() else np.flatnonzero(new)  # tie groups, where there are ties
        self.group = None if new.all() else np.cumsum(new) - 1
        self.position = np.empty(x.size, dtype=np.intp)  # where each value sits in the sort
        self.position[self.order] = np.arange(x.size)

    def sorted_ranks(self, w_sorted: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """`[B, n]` ranks minus `shift` (`[B, 1]`) in sorted order, from the weights `[B, n]` in sorted order:
        a group drawn c times after m draws below it takes ranks m+1..m+c, whose mean is m + (c + 1) / 2."""
        counts = w_sorted if self.starts is None else np.add.reduceat(w_sorted, self.starts, axis=1)
        avg = np.cumsum(counts, axis=1)
        avg -= 0.5 * counts
        avg -= shift - 0.5
        return avg if self.group is None else avg[:, self.group]


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray, rank_x: _Ranker | None = None,
                      rank_y: _Ranker | None = None) -> np.ndarray:
    """Spearman correlation (Pearson of average ranks) of x and y `[n]` in each resample `w` `[B, n]`.

    Everything is computed in x's sorted order (y's ranks are moved there), so no rank is scattered
    back; pass the `_Ranker`s of x and y to sort them once for many chunks of resamples. The ranks of
    N drawn values sum to N (N + 1) / 2 whatever the ties, so both means are (N + 1) / 2, and every
    rank, deviation and product is a multiple of 1/4: exact in float64.
    """
    rank_x, rank_y = rank_x or _Ranker(x), rank_y or _Ranker(y)
    w = np.atleast_2d(w).astype(np.float64, copy=False)
    w_x = w[:, rank_x.order]
    mean = (w.sum(1, keepdims=True) + 1) / 2
    dy = rank_y.sorted_ranks(w[:, rank_y.order], mean)[:, rank_y.position[rank_x.order]]
    return _centred_pearson(rank_x.sorted_ranks(w_x, mean), dy, w_x)


def _row_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) within each row of `[B, K]` (ties share the mean of their ranks)."""
    b, k = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    new = np.ones((b, k), dtype=bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    pos = np.broadcast_to(np.arange(k), (b, k))
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    end = np.ones((b, k), dtype=bool)
    end[:, :-1] = new[:, 1:]
    last = np.minimum.accumulate(np.where(end, pos, k - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((b, k), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def _percentile_ci(boots: np.ndarray, estimate: float, ci: float) -> tuple[float | None, float | None]:
    """Percentile interval of the finite resampled values, widened to hold the estimate (a constant
    statistic can land an ulp off its own resamples); None without any finite resample."""
    boots = boots[np.isfinite(boots)]
    if boots.size == 0 or not np.isfinite(estimate):
        return None, None
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(min(lo, estimate)), float(max(hi, estimate))


# --------------------------------------------------------------------------------------------
# overlap of two top-k sets against chance
# --------------------------------------------------------------------------------------------


def overlap_p(n_population: int, k_a: int, k_b: int, overlap: int) -> float:
    """P(X >= overlap) for X hypergeometric: k_b of n_population drawn, k_a of them marked. Exact
    integer arithmetic, one correctly rounded division at the end."""
    if not 0 <= k_a <= n_population or not 0 <= k_b <= n_population:
        raise ValueError(f"set sizes {k_a}, {k_b} must lie in 0..{n_population}")
    top = min(k_a, k_b)
    tail = sum(math.comb(k_a, j) * math.comb(n_population - k_a, k_b - j) for j in range(max(overlap, 0), top + 1))
    return tail / math.comb(n_population, k_b)


def topk_overlap(a: Sequence, b: Sequence, n_population: int) -> dict:
    """How many members two sets share, how many two random sets of their sizes share on average
    (k_a * k_b / n), and the hypergeometric p of sharing at least that many."""
    sa, sb = set(a), set(b)
    shared = len(sa & sb)
    return {"k_a": len(sa), "k_b": len(sb), "overlap": shared, "expected_overlap": len(sa) * len(sb) / n_population,
            "p_overlap": overlap_p(n_population, len(sa), len(sb), shared)}


# --------------------------------------------------------------------------------------------
# per-prompt changes of every model
# --------------------------------------------------------------------------------------------


def _changes(results: pl.DataFrame, prompts: pl.DataFrame, baseline: str) -> pl.DataFrame:
    """Per (model, condition, prompt) with finite rows under it and the baseline: label, p (normalised
    P(Yes)), p_base, d_p = p - p_base, d_lo = log-odds change."""
    df = stats.labelled(results, prompts)
    if "log_odds" not in df.columns:
        raise ValueError(f"results lack log_odds (columns {results.columns}); delta_log_odds needs it")
    fin = df.filter(pl.col("_finite"))
    base = fin.filter(pl.col("condition") == baseline).select(
        "model", "prompt_id", pl.col("p_yes_norm").alias("p_base"), pl.col("log_odds").alias("lo_base"))
    return fin.filter(pl.col("condition") != baseline).join(base, on=["model", "prompt_id"], how="inner").select(
        "model", "condition", "prompt_id", "label", pl.col("p_yes_norm").alias("p"), "p_base",
        (pl.col("p_yes_norm") - pl.col("p_base")).alias("d_p"), (pl.col("log_odds") - pl.col("lo_base")).alias("d_lo"))


@dataclass(frozen=True)
class _Side:
    """One model's arrays on a condition's shared prompts (correct attempts first): each per-prompt
    metric's values and their sort, and the AUROC tables of the condition and the baseline."""

    values: dict[str, np.ndarray]
    rankers: dict[str, _Ranker]
    auroc_cond: WeightedAuroc | None
    auroc_base: WeightedAuroc | None


def _side(frame: pl.DataFrame, suffix: str, label: np.ndarray) -> _Side:
    p, base = frame[f"p{suffix}"].to_numpy(), frame[f"p_base{suffix}"].to_numpy()
    d, lo = frame[f"d_p{suffix}"].to_numpy(), frame[f"d_lo{suffix}"].to_numpy()
    values = {"delta_correct": d[label], "delta_incorrect": d[~label], "delta_log_odds": lo}
    both = label.any() and (~label).any()
    return _Side(values, {m: _Ranker(v) for m, v in values.items()},
                 WeightedAuroc.of(p[label], p[~label]) if both else None,
                 WeightedAuroc.of(base[label], base[~label]) if both else None)


def _weights(metric: str, w_p: np.ndarray, w_n: np.ndarray) -> np.ndarray:
    """The resamples' weights of the prompts a per-prompt metric averages (correct attempts first)."""
    if metric == "delta_correct":
        return w_p
    if metric == "delta_incorrect":
        return w_n
    return np.hstack([w_p, w_n])


def _statistics(a: _Side, b: _Side, w_p: np.ndarray, w_n: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """{(metric, statistic): `[B]`} for statistic in effect_a, effect_b, diff and, for per-prompt
    metrics, pearson and spearman (NaN where undefined: an empty label, no spread)."""
    out = {}
    for m in CROSS_METRICS:
        if m == "delta_auroc":  # WeightedAuroc takes the weights prompts first
            wt_p, wt_n = np.ascontiguousarray(w_p.T), np.ascontiguousarray(w_n.T)
            ea, eb = (_auroc_change(s, wt_p, wt_n) for s in (a, b))
        else:
            w = _weights(m, w_p, w_n)
            with np.errstate(invalid="ignore", divide="ignore"):
                ea, eb = (w @ s.values[m] / w.sum(1) for s in (a, b))
            xa, xb = a.values[m], b.values[m]
            nan = np.full(w.shape[0], np.nan)
            out[m, "pearson"] = weighted_pearson(xa, xb, w) if xa.size >= 2 else nan
            out[m, "spearman"] = weighted_spearman(xa, xb, w, a.rankers[m], b.rankers[m]) if xa.size >= 2 else nan
        out[m, "effect_a"], out[m, "effect_b"], out[m, "diff"] = ea, eb, eb - ea
    return out


def _auroc_change(s: _Side, wt_p: np.ndarray, wt_n: np.ndarray) -> np.ndarray:
    """The AUROC's change from the baseline per resample (weights prompts first, `[n, B]`)."""
    if s.auroc_cond is None:
        return np.full(wt_p.shape[1], np.nan)
    return s.auroc_cond.auroc(wt_p, wt_n) - s.auroc_base.auroc(wt_p, wt_n)


CROSS_SCHEMA = {
    "pair": pl.Utf8, "model_a": pl.Utf8, "model_b": pl.Utf8, "condition": pl.Utf8, "kind": pl.Utf8,
    "n_heads": pl.Int64, "n_neurons": pl.Int64, "metric": pl.Utf8, "n_prompts": pl.Int64,
    "effect_a": pl.Float64, "effect_a_lo": pl.Float64, "effect_a_hi": pl.Float64,
    "effect_b": pl.Float64, "effect_b_lo": pl.Float64, "effect_b_hi": pl.Float64,
    "diff": pl.Float64, "diff_lo": pl.Float64, "diff_hi": pl.Float64, "ratio": pl.Float64,
    "pearson": pl.Float64, "pearson_lo": pl.Float64, "pearson_hi": pl.Float64,
    "spearman": pl.Float64, "spearman_lo": pl.Float64, "spearman_hi": pl.Float64,
}  # fmt: skip
# The target-vs-controls test on diff (`stats.target_vs_controls`), on the target's rows only.
DIFF_TEST_COLUMNS = ("control_mean", "control_std", "n_controls", "z", "p_empirical", "p_less", "p_greater", "rank")


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _condition_rows(a: _Side, b: _Side, label: np.ndarray, n_boot: int, seed: np.random.SeedSequence,
                    ci: float) -> dict[str, dict]:
    """Every metric's statistics and CIs for one condition of one pair, keyed by metric."""
    n_p, n_n = int(label.sum()), int((~label).sum())
    point = _statistics(a, b, np.ones((1, n_p)), np.ones((1, n_n)))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ENTRIES // max(label.size, 1))
    parts: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, n_boot, chunk):
        counts = stratified_counts(label, min(chunk, n_boot - start), rng)
        for key, v in _statistics(a, b, counts[:, :n_p], counts[:, n_p:]).items():
            parts[key].append(v)
    rows = {}
    for m in CROSS_METRICS:
        row: dict = {"n_prompts": {"delta_correct": n_p, "delta_incorrect": n_n}.get(m, n_p + n_n)}
        for stat in ("effect_a", "effect_b", "diff", "pearson", "spearman"):
            if (m, stat) not in point:
                row.update({stat: None, f"{stat}_lo": None, f"{stat}_hi": None})
                continue
            est = float(point[m, stat][0])
            row[stat] = _finite_or_none(est)
            row[f"{stat}_lo"], row[f"{stat}_hi"] = _percentile_ci(np.concatenate(parts[m, stat]), est, ci)
        ea, eb = row["effect_a"], row["effect_b"]
        row["ratio"] = eb / ea if ea not in (None, 0.0) and eb is not None else None
        rows[m] = row
    return rows


def _meta(conditions: pl.DataFrame | None) -> dict[str, dict]:
    """condition -> kind, n_heads, n_neurons (what the table carries beside each condition)."""
    if conditions is None:
        return {}
    cols = [c for c in ("kind", "n_heads", "n_neurons") if c in conditions.columns]
    return {r["condition"]: {c: r[c] for c in cols} for r in conditions.select("condition", *cols).iter_rows(named=True)}


def _pair_frame(changes: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """Both models' changes on the (condition, prompt) pairs they share, `_b` columns for model b."""
    side = ["condition", "prompt_id", "label", "p", "p_base", "d_p", "d_lo"]
    fa = changes.filter(pl.col("model") == a).select(side)
    fb = changes.filter(pl.col("model") == b).select(side).rename({c: f"{c}_b" for c in side[3:]})
    return fa.join(fb, on=["condition", "prompt_id", "label"], how="inner").sort(["condition", "prompt_id"])


def cross_model_table(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    conditions: pl.DataFrame | None,
    models: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    baseline: str = "baseline",
) -> pl.DataFrame:
    """`cross_model.parquet`: one row per (model pair, shared condition, metric); see the module docstring.

    `models` is the order of `model.path` (pairs are (a, b) with a first). Each (pair, condition) gets
    its own generator from `seed`, both model names and the condition (`stats.group_seed`), so its
    intervals do not move when other models or conditions are added. n_prompts counts the prompts the
    metric averages (finite in both models, under the condition and the baseline).
    """
    if len(models) < 2:
        raise ValueError(f"cross_model_table needs two or more models, got {list(models)}")
    changes = _changes(results, prompts, baseline)
    meta = _meta(conditions)
    rows: list[dict] = []
    for a, b in model_pairs(models):
        pair = _pair_frame(changes, a, b)
        for (condition,), part in pair.partition_by("condition", as_dict=True, maintain_order=True).items():
            # correct attempts first: the weights' columns are [correct | incorrect]
            part = pl.concat([part.filter(pl.col("label")), part.filter(~pl.col("label"))])
            label = part["label"].to_numpy().astype(bool)
            stats_by_metric = _condition_rows(_side(part, "", label), _side(part, "_b", label), label, n_boot,
                                              stats.group_seed(seed, "cross", a, b, condition), ci)
            info = meta.get(condition, {})
            for m, values in stats_by_metric.items():
                rows.append({"pair": pair_name(a, b), "model_a": a, "model_b": b, "condition": condition,
                             "kind": info.get("kind"), "n_heads": info.get("n_heads"),
                             "n_neurons": info.get("n_neurons"), "metric": m, **values})
    table = pl.DataFrame(rows, schema=CROSS_SCHEMA)
    return _with_diff_test(table)


def _with_diff_test(table: pl.DataFrame) -> pl.DataFrame:
    """The target-vs-controls test on `diff`, per pair and metric, as `diff_<stat>` columns of the
    target's rows (null elsewhere, and where a pair has no target or no random set)."""
    empty = {f"diff_{c}": (pl.Int64 if c in ("n_controls", "rank") else pl.Float64) for c in DIFF_TEST_COLUMNS}
    found = []
    for pair in table["pair"].unique(maintain_order=True).to_list():
        wide = (table.filter((pl.col("pair") == pair) & pl.col("kind").is_in(["target", "random"]))
                .pivot(on="metric", index=["condition", "kind"], values="diff"))
        if not {"target", "random"} <= set(wide["kind"].to_list()):
            continue
        tvc = stats.target_vs_controls(wide.with_columns(pl.lit(pair).alias("model")), list(CROSS_METRICS))
        found.append(tvc.select(pl.col("model").alias("pair"), pl.col("target_condition").alias("condition"),
                                "metric", *[pl.col(c).alias(f"diff_{c}") for c in DIFF_TEST_COLUMNS]))
    if not found:
        return table.with_columns([pl.lit(None, t).alias(c) for c, t in empty.items()])
    return table.join(pl.concat(found), on=["pair", "condition", "metric"], how="left")


# --------------------------------------------------------------------------------------------
# per-head (per-layer) effect maps
# --------------------------------------------------------------------------------------------

MAPS_SCHEMA = {
    "pair": pl.Utf8, "model_a": pl.Utf8, "model_b": pl.Utf8, "sweep": pl.Utf8, "metric": pl.Utf8,
    "n_components": pl.Int64, "n_prompts": pl.Int64, "spearman": pl.Float64, "spearman_lo": pl.Float64,
    "spearman_hi": pl.Float64, "pearson": pl.Float64, "k": pl.Int64, "overlap": pl.Int64,
    "expected_overlap": pl.Float64, "p_overlap": pl.Float64,
}  # fmt: skip


def _map_k(n_components: int, target_size: int | None) -> int:
    """The top-k compared: the target's number of heads when the map is per head and the sweep has a
    target smaller than the map, else TOPK_FRACTION of the components (at least 1)."""
    if target_size and 0 < target_size < n_components:
        return int(target_size)
    return max(1, math.ceil(TOPK_FRACTION * n_components))


def _map_matrix(part: pl.DataFrame, order: list[str], suffix: str) -> np.ndarray:
    """`[prompts, components]` per-prompt values, columns in `order`."""
    wide = part.pivot(on="condition", index="prompt_id", values=f"v{suffix}").sort("prompt_id")
    return wide.select(order).to_numpy().astype(np.float64)


def effect_maps_table(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    conditions: pl.DataFrame,
    models: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    baseline: str = "baseline",
) -> pl.DataFrame:
    """`cross_model_maps.parquet`: per (pair, sweep kind in MAP_SWEEPS both models ran, per-prompt metric)
    the Spearman correlation of the two effect maps across components with a bootstrap CI (prompts
    resampled within each label, each component's effect recomputed in both models), the Pearson
    correlation, and the overlap of the two top-k sets (by |effect|) with its hypergeometric p.

    The prompts are those finite under every condition of the sweep and the baseline in both models.
    k is `_map_k`'s: the target's head count for a per-head map, else 10% of the components.
    Empty (with its columns) when no sweep was run in both models of any pair.
    """
    changes = _changes(results, prompts, baseline)
    kinds = conditions.select("condition", "kind", *[c for c in ("layer", "head") if c in conditions.columns])
    target = conditions.filter(pl.col("kind") == "target")
    target_size = int(target["n_heads"][0]) if target.height and "n_heads" in target.columns else None
    rows: list[dict] = []
    for a, b in model_pairs(models):
        pair = _pair_frame(changes, a, b).join(kinds, on="condition", how="inner")
        for sweep in MAP_SWEEPS:
            part = pair.filter(pl.col("kind") == sweep)
            order = (part.select("condition", *[c for c in ("layer", "head") if c in part.columns]).unique()
                     .sort([c for c in ("layer", "head", "condition") if c in part.columns])["condition"].to_list())
            if len(order) < 2:
                continue
            complete = part.group_by("prompt_id").len().filter(pl.col("len") == len(order))["prompt_id"]
            part = part.filter(pl.col("prompt_id").is_in(complete.implode()))
            k = _map_k(len(order), target_size if sweep == "single_head" else None)
            rng_seed = stats.group_seed(seed, "cross_maps", a, b, sweep)
            rows += _map_rows(part, order, k, n_boot, rng_seed, ci,
                              {"pair": pair_name(a, b), "model_a": a, "model_b": b, "sweep": sweep})
    return pl.DataFrame(rows, schema=MAPS_SCHEMA)


def _map_rows(part: pl.DataFrame, order: list[str], k: int, n_boot: int, seed: np.random.SeedSequence, ci: float,
              keys: dict) -> list[dict]:
    labels = part.filter(pl.col("condition") == order[0]).sort("prompt_id")["label"].to_numpy().astype(bool)
    counts = stratified_counts(labels, n_boot, np.random.default_rng(seed))
    rows = []
    for metric in PER_PROMPT_METRICS:
        value = {"delta_correct": "d_p", "delta_incorrect": "d_p"}.get(metric, "d_lo")
        keep = {"delta_correct": labels, "delta_incorrect": ~labels}.get(metric, np.ones(labels.size, dtype=bool))
        framed = part.select("condition", "prompt_id", pl.col(value).alias("v"), pl.col(f"{value}_b").alias("v_b"))
        ma, mb = _map_matrix(framed, order, "")[keep], _map_matrix(framed, order, "_b")[keep]
        n = int(keep.sum())
        row = {**keys, "metric": metric, "n_components": len(order), "n_prompts": n}
        if n == 0:
            rows.append({**row, "k": k})
            continue
        ea, eb = ma.mean(0), mb.mean(0)
        ones = np.ones((1, len(order)))
        rho = float(weighted_pearson(_row_ranks(ea[None]), _row_ranks(eb[None]), ones)[0])
        w = counts[:, keep]
        boot_a, boot_b = w @ ma / n, w @ mb / n
        boots = weighted_pearson(_row_ranks(boot_a), _row_ranks(boot_b), np.ones_like(boot_a))
        lo, hi = _percentile_ci(boots, rho, ci)
        top_a = np.argsort(-np.abs(ea), kind="stable")[:k]
        top_b = np.argsort(-np.abs(eb), kind="stable")[:k]
        ov = topk_overlap(top_a.tolist(), top_b.tolist(), len(order))
        rows.append({**row, "spearman": _finite_or_none(rho), "spearman_lo": lo, "spearman_hi": hi,
                     "pearson": _finite_or_none(float(weighted_pearson(ea, eb, ones)[0])), "k": k,
                     "overlap": ov["overlap"], "expected_overlap": ov["expected_overlap"], "p_overlap": ov["p_overlap"]})
    return rows
