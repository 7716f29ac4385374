"""Statistics over the sweep engine's frames: summaries, paired bootstrap CIs, target-vs-controls.

The sweep produces one row per (model, prompt, condition) with P(Yes)/P(No) read at the last
position. Every condition scores exactly the prompts of the baseline, so every effect here is a
*paired* change (condition minus baseline on the same prompt of the same model): prompt-to-prompt
variation cancels and the comparison is much tighter than a difference of two means.

Conventions used throughout:

* ``label`` True means the attempt is correct. "correct" / "incorrect" in column names refer to it.
* A row is *non-finite* when any of its metric columns (p_yes, p_no, p_yes_norm, log_odds, as
  present) is NaN, +-inf or null. Such rows are excluded from every mean and counted in
  ``n_nonfinite``; they are never silently averaged (one NaN would poison a mean, one inf would
  dominate it). A paired change needs both the condition row and the baseline row to be finite.
* Everything is float64 and every random draw comes from a seeded ``numpy.random.Generator``.

Pure polars + numpy: no torch, Ray or W&B, so the analysis can run anywhere the parquet files go.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from verif.design.conditions import INTERVENTIONS

__all__ = [
    "METRIC_COLUMNS",
    "DEFAULT_CONTROL_METRICS",
    "KIND_ORDER",
    "bootstrap_mean_ci",
    "group_seed",
    "stratified_counts",
    "WeightedAuroc",
    "labelled",
    "summarize",
    "paired_change",
    "target_vs_controls",
    "by_error_kind",
    "faithfulness",
]

# Columns of `results` that hold measurements; any of them being non-finite marks the row broken.
METRIC_COLUMNS: tuple[str, ...] = ("p_yes", "p_no", "p_yes_norm", "log_odds")
# Summary columns the target set is judged on against random sets by default.
DEFAULT_CONTROL_METRICS: tuple[str, ...] = ("delta_correct", "delta_incorrect", "delta_auroc")
# Display / sort order of condition kinds.
KIND_ORDER: tuple[str, ...] = ("baseline", "target", "layer", "single_head", "random")

_LABEL_NAMES = ("correct", "incorrect", "all")


# --------------------------------------------------------------------------------------------
# small building blocks
# --------------------------------------------------------------------------------------------


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int | Sequence[int] | np.random.SeedSequence = 0,
    ci: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile bootstrap CI, resampling the values with replacement.

    Vectorised: resamples are drawn as an index matrix and averaged with one numpy call per chunk
    (chunks keep the index matrix under ~4M entries so large n does not blow up memory); there is
    no Python loop per resample. Same seed, same values -> same interval. Returns NaNs for empty
    input; with n_boot <= 0 the interval is NaN.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError("values must be one-dimensional")
    n = v.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if n_boot <= 0:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        boots[start : start + m] = v[idx].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    # Floating-point summation can put a constant sample's mean a ulp outside its own resamples.
    return mean, float(min(lo, mean)), float(max(hi, mean))


def group_seed(seed: int, *parts: str | int) -> np.random.SeedSequence:
    """Seed for one group, independent of which other groups exist (stable across runs)."""
    keys = [int(seed)]
    for p in parts:
        keys.append(p if isinstance(p, int) else zlib.crc32(str(p).encode()))
    return np.random.SeedSequence(keys)


# --------------------------------------------------------------------------------------------
# resampling prompts by label: a resample is a row of draw counts, every statistic a weighted one
# --------------------------------------------------------------------------------------------


def stratified_counts(labels: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`[n_boot, n]` counts: each resample draws, within each label, as many prompts as it has, with
    replacement (so both labels keep their sizes and an AUROC is defined in every resample). The correct
    attempts' draws come first from `rng`, then the incorrect ones'."""
    labels = np.asarray(labels, dtype=bool)
    counts = np.zeros((n_boot, labels.size), dtype=np.float64)
    for side in (labels, ~labels):
        idx = np.flatnonzero(side)
        m = idx.size
        if m == 0:
            continue
        draws = rng.integers(0, m, size=(n_boot, m)) + m * np.arange(n_boot)[:, None]
        counts[:, idx] = np.bincount(draws.ravel(), minlength=n_boot * m).reshape(n_boot, m)
    return counts


@dataclass(frozen=True)
class WeightedAuroc:
    """The AUROC of fixed scores, correct (`pos`) vs incorrect (`neg`) attempts, under many weightings of
    the attempts (the bootstrap's draw counts): the incorrect scores are sorted once, and each correct
    attempt's place among them (strictly below, below or equal) serves every weighting.

    With integer weights every cumulative sum, win count and product is an integer or a half: exact in
    float64, so the result is the one correctly rounded division whatever the summation order."""

    neg_order: np.ndarray
    below: np.ndarray
    below_or_equal: np.ndarray

    @classmethod
    def of(cls, pos: np.ndarray, neg: np.ndarray) -> WeightedAuroc:
        order = np.argsort(neg, kind="stable")
        sorted_neg = neg[order]
        return cls(order, np.searchsorted(sorted_neg, pos, "left"), np.searchsorted(sorted_neg, pos, "right"))

    def auroc(self, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
        """P(correct > incorrect) + P(tie) / 2 (Mann-Whitney) under each column of the weights, prompts
        first (`w_pos` `[n_pos, B]`, `w_neg` `[n_neg, B]`: gathering prompts copies whole rows), one per
        resample; NaN where either side has no weight."""
        cum = np.zeros((w_neg.shape[0] + 1, w_neg.shape[1]))
        np.cumsum(w_neg[self.neg_order], axis=0, out=cum[1:])
        # each correct attempt beats the incorrect ones below it and ties those equal to it: (lt + le) / 2
        wins = 0.5 * np.einsum("nb,nb->b", w_pos, cum[self.below] + cum[self.below_or_equal])
        total = w_pos.sum(axis=0) * cum[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def _metric_cols(results: pl.DataFrame) -> list[str]:
    return [c for c in METRIC_COLUMNS if c in results.columns]


def _finite_expr(cols: Sequence[str]) -> pl.Expr:
    """True where every one of `cols` is a finite, non-null number."""
    return pl.all_horizontal([pl.col(c).is_finite().fill_null(False) for c in cols])


def _check_columns(df: pl.DataFrame, needed: Sequence[str], name: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{name} frame lacks column(s) {missing}; has {df.columns}")


def labelled(results: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """`results` with float64 metrics, `label`/`error_kind` joined from prompts, and `_finite`."""
    _check_columns(results, ("model", "prompt_id", "condition", "p_yes_norm"), "results")
    _check_columns(prompts, ("prompt_id", "label"), "prompts")
    cols = _metric_cols(results)
    keep = ["prompt_id", "label"] + (["error_kind"] if "error_kind" in prompts.columns else [])
    df = results.with_columns([pl.col(c).cast(pl.Float64) for c in cols]).join(
        prompts.select(keep).unique("prompt_id"), on="prompt_id", how="left"
    )
    if "error_kind" not in df.columns:
        df = df.with_columns(
            pl.when(pl.col("label")).then(pl.lit("none")).otherwise(pl.lit("unknown")).alias("error_kind")
        )
    unknown = df.filter(pl.col("label").is_null())
    if unknown.height:
        ids = unknown["prompt_id"].unique().sort().head(5).to_list()
        raise ValueError(f"{unknown.height} result rows have prompt_ids absent from prompts, e.g. {ids}")
    return df.with_columns(_finite_expr(cols).alias("_finite"))


def _require_baseline(df: pl.DataFrame, baseline: str) -> None:
    models = set(df["model"].unique().to_list())
    have = set(df.filter(pl.col("condition") == baseline)["model"].unique().to_list())
    if models - have:
        raise ValueError(
            f"no baseline condition {baseline!r} in results for model(s) {sorted(models - have)}; "
            "paired changes need it"
        )


def _with_baseline(df: pl.DataFrame, baseline: str, cols: Sequence[str]) -> pl.DataFrame:
    """Add `_base_<col>` from the same model's finite baseline row on the same prompt."""
    base = df.filter((pl.col("condition") == baseline) & pl.col("_finite")).select(
        ["model", "prompt_id"] + [pl.col(c).alias(f"_base_{c}") for c in cols]
    )
    return df.join(base, on=["model", "prompt_id"], how="left")


def _kind_rank_expr() -> pl.Expr:
    return (
        pl.col("kind")
        .replace_strict(list(KIND_ORDER), list(range(len(KIND_ORDER))), default=len(KIND_ORDER), return_dtype=pl.Int64)
        .fill_null(len(KIND_ORDER))
    )


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def summarize(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    conditions: pl.DataFrame | None,
    baseline: str = "baseline",
) -> pl.DataFrame:
    """One row per (model, condition): levels, paired changes vs baseline, and discrimination.

    Columns: model, condition, kind, intervention (none for the baseline, else the condition's kind of
    intervention: zero, mean, mean_positional, resample), n_heads, layer, head, n_correct, n_incorrect, n_nonfinite,
    mean_p_yes_norm_correct/incorrect, mean_p_no_norm_correct/incorrect (1 - p_yes_norm),
    delta_correct/incorrect (mean paired change of p_yes_norm vs baseline), mean_log_odds_correct/
    incorrect, delta_log_odds_correct/incorrect, auroc, delta_auroc.

    Why these: a verifier that is "broken" by ablation can fail two ways, by shifting every answer
    (the deltas) or by losing the ability to tell correct from incorrect attempts (AUROC of
    p_yes_norm, positives = correct attempts). n_correct / n_incorrect count finite rows only;
    non-finite rows are excluded everywhere and counted in n_nonfinite. Paired deltas use the
    prompts where both the condition row and the baseline row are finite. This frame is what gets
    written as `summary.parquet`.
    """
    df = labelled(results, prompts)
    _require_baseline(df, baseline)
    has_lo = "log_odds" in df.columns
    val_cols = ["p_yes_norm"] + (["log_odds"] if has_lo else [])
    df = _with_baseline(df, baseline, val_cols)
    fin = pl.col("_finite")
    df = df.with_columns(
        pl.when(fin).then(pl.col("p_yes_norm") - pl.col("_base_p_yes_norm")).alias("_d"),
        (pl.when(fin).then(pl.col("log_odds") - pl.col("_base_log_odds")) if has_lo else pl.lit(None, pl.Float64)).alias(
            "_dlo"
        ),
        (pl.col("log_odds") if has_lo else pl.lit(None, pl.Float64)).alias("_lo"),
    )
    pos = fin & pl.col("label")
    neg = fin & ~pl.col("label")
    agg = df.group_by(["model", "condition"]).agg(
        pos.sum().cast(pl.Int64).alias("n_correct"),
        neg.sum().cast(pl.Int64).alias("n_incorrect"),
        (~fin).sum().cast(pl.Int64).alias("n_nonfinite"),
        pl.col("p_yes_norm").filter(pos).mean().alias("mean_p_yes_norm_correct"),
        pl.col("p_yes_norm").filter(neg).mean().alias("mean_p_yes_norm_incorrect"),
        pl.col("_d").filter(pos).mean().alias("delta_correct"),
        pl.col("_d").filter(neg).mean().alias("delta_incorrect"),
        pl.col("_lo").filter(pos).mean().alias("mean_log_odds_correct"),
        pl.col("_lo").filter(neg).mean().alias("mean_log_odds_incorrect"),
        pl.col("_dlo").filter(pos).mean().alias("delta_log_odds_correct"),
        pl.col("_dlo").filter(neg).mean().alias("delta_log_odds_incorrect"),
    )
    # AUROC by Mann-Whitney on average ranks within each (model, condition), finite rows only.
    ranked = df.filter(fin).with_columns(
        pl.col("p_yes_norm").rank(method="average").over(["model", "condition"]).cast(pl.Float64).alias("_r")
    )
    au = ranked.group_by(["model", "condition"]).agg(
        pl.col("label").sum().cast(pl.Float64).alias("_np"),
        (~pl.col("label")).sum().cast(pl.Float64).alias("_nn"),
        pl.col("_r").filter(pl.col("label")).sum().alias("_rp"),
    )
    au = au.with_columns(
        pl.when((pl.col("_np") > 0) & (pl.col("_nn") > 0))
        .then((pl.col("_rp") - pl.col("_np") * (pl.col("_np") + 1) / 2) / (pl.col("_np") * pl.col("_nn")))
        .otherwise(None)
        .cast(pl.Float64)
        .alias("auroc")
    ).select("model", "condition", "auroc")
    out = agg.join(au, on=["model", "condition"], how="left")
    base_au = out.filter(pl.col("condition") == baseline).select("model", pl.col("auroc").alias("_base_auroc"))
    out = out.join(base_au, on="model", how="left").with_columns(
        (pl.col("auroc") - pl.col("_base_auroc")).alias("delta_auroc"),
        (1.0 - pl.col("mean_p_yes_norm_correct")).alias("mean_p_no_norm_correct"),
        (1.0 - pl.col("mean_p_yes_norm_incorrect")).alias("mean_p_no_norm_incorrect"),
    )
    out = out.join(_condition_meta(conditions, baseline), on="condition", how="left")
    out = out.with_columns(
        # The baseline is the baseline even when the conditions table forgot to say so.
        pl.when(pl.col("condition") == baseline).then(pl.lit("baseline")).otherwise(pl.col("kind")).alias("kind"),
        pl.when(pl.col("condition") == baseline).then(pl.lit("none"))
        .otherwise(pl.col("intervention").fill_null("zero")).alias("intervention"),
        pl.when(pl.col("condition") == baseline).then(pl.lit(0, pl.Int64)).otherwise(pl.col("n_heads")).alias("n_heads"),
    )
    cols = [
        "model", "condition", "kind", "intervention", "n_heads", "layer", "head",
        "n_correct", "n_incorrect", "n_nonfinite",
        "mean_p_yes_norm_correct", "mean_p_yes_norm_incorrect",
        "mean_p_no_norm_correct", "mean_p_no_norm_incorrect",
        "delta_correct", "delta_incorrect",
        "mean_log_odds_correct", "mean_log_odds_incorrect",
        "delta_log_odds_correct", "delta_log_odds_incorrect",
        "auroc", "delta_auroc",
    ]  # fmt: skip
    float_cols = [c for c in cols if c.startswith(("mean_", "delta_")) or c == "auroc"]
    return (
        out.with_columns([pl.col(c).cast(pl.Float64) for c in float_cols])
        .with_columns(_kind_rank_expr().alias("_k"))
        .with_columns(_intervention_rank_expr().alias("_i"))
        .sort(["model", "_i", "_k", "layer", "head", "condition"], nulls_last=True)
        .select(cols)
    )


def _intervention_rank_expr() -> pl.Expr:
    order = ("none", *INTERVENTIONS)
    return pl.col("intervention").replace_strict(list(order), list(range(len(order))), default=len(order),
                                                 return_dtype=pl.Int64)


def _condition_meta(conditions: pl.DataFrame | None, baseline: str) -> pl.DataFrame:
    """condition -> kind, intervention, n_heads, layer, head (typed, one row per condition)."""
    schema = {"condition": pl.Utf8, "kind": pl.Utf8, "intervention": pl.Utf8, "n_heads": pl.Int64, "layer": pl.Int64,
              "head": pl.Int64}
    if conditions is None or conditions.height == 0:
        return pl.DataFrame(schema=schema)
    _check_columns(conditions, ("condition", "kind"), "conditions")
    exprs = []
    for c, t in schema.items():
        exprs.append(pl.col(c).cast(t) if c in conditions.columns else pl.lit(None, t).alias(c))
    return conditions.select(exprs).unique("condition", keep="first")


# --------------------------------------------------------------------------------------------
# paired change with bootstrap CI
# --------------------------------------------------------------------------------------------


def paired_change(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    condition: str,
    baseline: str = "baseline",
    metric: str = "p_yes_norm",
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> pl.DataFrame:
    """Mean paired change of `metric` (condition - baseline) per model and label, with bootstrap CI.

    Rows: one per model and label in ("correct", "incorrect", "all"). Columns: model, condition,
    baseline, metric, label, n (finite pairs), n_dropped (pairs dropped as non-finite),
    mean_baseline, mean_condition, mean_change, ci_low, ci_high.

    The CI is a percentile bootstrap resampling *prompts* (pairs) with replacement, which respects
    the paired design. Each (model, label) group gets its own generator derived from `seed`, the
    model name and the label, so a group's interval does not change when other models are added.
    `metric` is a column of results (p_yes_norm, log_odds, p_yes, p_no) or "p_no_norm"
    (= 1 - p_yes_norm).
    """
    df = labelled(results, prompts)
    if metric == "p_no_norm":
        df = df.with_columns((1.0 - pl.col("p_yes_norm")).alias("p_no_norm"))
    elif metric not in df.columns:
        raise ValueError(f"metric {metric!r} not in results (columns {results.columns}) nor 'p_no_norm'")
    for c in (condition, baseline):
        if df.filter(pl.col("condition") == c).height == 0:
            raise ValueError(f"condition {c!r} not found in results")
    cond = df.filter(pl.col("condition") == condition).select(
        "model", "prompt_id", "label", pl.col(metric).alias("_c"), pl.col("_finite").alias("_fc")
    )
    base = df.filter(pl.col("condition") == baseline).select(
        "model", "prompt_id", pl.col(metric).alias("_b"), pl.col("_finite").alias("_fb")
    )
    pairs = cond.join(base, on=["model", "prompt_id"], how="inner").with_columns(
        (pl.col("_fc") & pl.col("_fb")).alias("_ok")
    )
    rows: list[dict] = []
    for model in sorted(pairs["model"].unique().to_list()):
        pm = pairs.filter(pl.col("model") == model)
        for li, lab in enumerate(_LABEL_NAMES):
            g = pm if lab == "all" else pm.filter(pl.col("label") == (lab == "correct"))
            ok = g.filter(pl.col("_ok"))
            b = ok["_b"].to_numpy().astype(np.float64)
            c = ok["_c"].to_numpy().astype(np.float64)
            mean, lo, hi = bootstrap_mean_ci(c - b, n_boot=n_boot, seed=group_seed(seed, model, condition, li), ci=ci)
            rows.append(
                {
                    "model": model,
                    "condition": condition,
                    "baseline": baseline,
                    "metric": metric,
                    "label": lab,
                    "n": int(ok.height),
                    "n_dropped": int(g.height - ok.height),
                    "mean_baseline": float(b.mean()) if b.size else None,
                    "mean_condition": float(c.mean()) if c.size else None,
                    "mean_change": mean if b.size else None,
                    "ci_low": lo if b.size and np.isfinite(lo) else None,
                    "ci_high": hi if b.size and np.isfinite(hi) else None,
                }
            )
    schema = {
        "model": pl.Utf8, "condition": pl.Utf8, "baseline": pl.Utf8, "metric": pl.Utf8, "label": pl.Utf8,
        "n": pl.Int64, "n_dropped": pl.Int64, "mean_baseline": pl.Float64, "mean_condition": pl.Float64,
        "mean_change": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


# --------------------------------------------------------------------------------------------
# target vs random controls
# --------------------------------------------------------------------------------------------


def target_vs_controls(
    summary: pl.DataFrame,
    metric: str | Sequence[str] = "delta_correct",
    target_kind: str = "target",
    control_kind: str = "random",
) -> pl.DataFrame:
    """Judge the target head set's effect against the effects of random head sets.

    `metric` is one summary column or a list of them (e.g. DEFAULT_CONTROL_METRICS); the result is
    long: one row per (model, metric, target condition). Columns: model, intervention, metric,
    target_condition, target_effect, control_mean, control_std (ddof=1), n_controls, z, p_empirical,
    p_less, p_greater, rank. A target is judged against the random sets of its own intervention kind
    (the summary's `intervention` column; all of them when it has none).

    * p_empirical (two-sided) = (1 + #controls with |effect| >= |target effect|) / (n_controls + 1).
      The +1 counts the target as one draw of the null, so p is never 0 and with n controls the
      smallest attainable p is 1/(n+1) (19 controls -> 0.05): a claim needs enough controls.
    * p_less = (1 + #controls <= target) / (n + 1), p_greater = (1 + #controls >= target) / (n + 1):
      one-sided variants, both given so no direction is chosen after seeing the data.
    * z = (target - control_mean) / control_std; null when std is 0 or there are < 2 controls
      (the empirical p is the honest number then).
    * rank: 1 + #controls with |effect| > |target effect| (1 = target is the most extreme).

    Controls whose metric is null/non-finite (e.g. AUROC with one class empty) are left out of
    n_controls. Raises ValueError when there is no target or no control condition for a model.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    _check_columns(summary, ["model", "condition", "kind"] + metrics, "summary")
    rows: list[dict] = []
    if "intervention" not in summary.columns:
        summary = summary.with_columns(pl.lit("zero").alias("intervention"))
    for model in sorted(summary["model"].unique().to_list()):
        sm = summary.filter(pl.col("model") == model)
        if sm.filter(pl.col("kind") == target_kind).height == 0:
            raise ValueError(f"model {model!r}: no condition of kind {target_kind!r} in summary")
        if sm.filter(pl.col("kind") == control_kind).height == 0:
            raise ValueError(f"model {model!r}: no condition of kind {control_kind!r} (random controls) in summary")
        kinds = sm.filter(pl.col("kind") == target_kind)["intervention"].unique(maintain_order=True).to_list()
        for kind in kinds:
            rows += _judged(sm.filter(pl.col("intervention") == kind), model, kind, metrics, target_kind, control_kind)
    schema = {
        "model": pl.Utf8, "intervention": pl.Utf8, "metric": pl.Utf8, "target_condition": pl.Utf8,
        "target_effect": pl.Float64, "control_mean": pl.Float64, "control_std": pl.Float64, "n_controls": pl.Int64,
        "z": pl.Float64, "p_empirical": pl.Float64, "p_less": pl.Float64, "p_greater": pl.Float64, "rank": pl.Int64,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _judged(sm: pl.DataFrame, model: str, kind: str, metrics: list[str], target_kind: str,
            control_kind: str) -> list[dict]:
    """target_vs_controls' rows for one model and intervention kind."""
    rows: list[dict] = []
    targets = sm.filter(pl.col("kind") == target_kind)
    controls = sm.filter(pl.col("kind") == control_kind)
    if controls.height == 0:
        raise ValueError(f"model {model!r}: no condition of kind {control_kind!r} (random controls) under {kind}")
    for m in metrics:
        cv = controls[m].cast(pl.Float64).to_numpy()
        cv = cv[np.isfinite(cv)]
        n = int(cv.size)
        mu = float(cv.mean()) if n else None
        sd = float(cv.std(ddof=1)) if n >= 2 else None
        for trow in targets.select("condition", m).iter_rows():
            tcond, t = trow
            ok = t is not None and np.isfinite(t) and n > 0
            rows.append(
                {
                    "model": model,
                    "intervention": kind,
                    "metric": m,
                    "target_condition": tcond,
                    "target_effect": float(t) if t is not None else None,
                    "control_mean": mu,
                    "control_std": sd,
                    "n_controls": n,
                    "z": (t - mu) / sd if ok and sd is not None and sd > 0 else None,
                    "p_empirical": (1 + int((np.abs(cv) >= abs(t)).sum())) / (n + 1) if ok else None,
                    "p_less": (1 + int((cv <= t).sum())) / (n + 1) if ok else None,
                    "p_greater": (1 + int((cv >= t).sum())) / (n + 1) if ok else None,
                    "rank": 1 + int((np.abs(cv) > abs(t)).sum()) if ok else None,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# by error kind
# --------------------------------------------------------------------------------------------


def by_error_kind(results: pl.DataFrame, prompts: pl.DataFrame, baseline: str = "baseline") -> pl.DataFrame:
    """Per model, condition and error_kind: n, mean p_yes_norm, mean paired change vs baseline.

    Why: "incorrect" mixes easy errors (a number that is not in the list) with subtle ones (an
    arithmetic slip in a partial result). Heads that do verification may matter for some kinds
    only, which the pooled incorrect mean would hide. error_kind "none" is the correct attempts.

    Columns: model, condition, error_kind, label, n (finite rows), n_nonfinite, n_paired (finite
    pairs with the baseline), mean_p_yes_norm, mean_delta_p_yes_norm.
    """
    df = labelled(results, prompts)
    _require_baseline(df, baseline)
    df = _with_baseline(df, baseline, ["p_yes_norm"])
    fin = pl.col("_finite")
    df = df.with_columns(pl.when(fin).then(pl.col("p_yes_norm") - pl.col("_base_p_yes_norm")).alias("_d"))
    out = df.group_by(["model", "condition", "error_kind"]).agg(
        pl.col("label").first().alias("label"),
        fin.sum().cast(pl.Int64).alias("n"),
        (~fin).sum().cast(pl.Int64).alias("n_nonfinite"),
        pl.col("_d").is_not_null().sum().cast(pl.Int64).alias("n_paired"),
        pl.col("p_yes_norm").filter(fin).mean().cast(pl.Float64).alias("mean_p_yes_norm"),
        pl.col("_d").mean().cast(pl.Float64).alias("mean_delta_p_yes_norm"),
    )
    return out.sort(["model", "condition", "error_kind"])


# --------------------------------------------------------------------------------------------
# faithfulness of a set (circuit conditions)
# --------------------------------------------------------------------------------------------

CIRCUIT_KINDS = ("circuit", "circuit_random", "circuit_empty")


def faithfulness(
    results: pl.DataFrame, prompts: pl.DataFrame, conditions: pl.DataFrame, baseline: str = "baseline"
) -> pl.DataFrame:
    """How much of the model's verdict a set carries alone (Wang et al. 2022, IOI), for the target and for the
    random sets of its size, per model, circuit intervention kind and label group (correct, incorrect, all).

    `faithfulness = (M(circuit) - M(nothing kept)) / (M(model) - M(nothing kept))`, M the mean log-odds
    over the group's finite rows: 1 when keeping the set alone restores the model's mean verdict, 0 when it
    does no better than keeping nothing. Undefined (null) where the model and the empty circuit agree
    (|M(model) - M(nothing kept)| == 0) or a mean is not finite.

    Columns: model, intervention, condition, kept (target or random-NNN), label, n, m_circuit, m_empty,
    m_model, faithfulness; and on the target's row its judgement against the random sets of its size:
    n_random, random_mean, random_max, p_greater ((1 + #random sets with faithfulness >= the target's) /
    (n_random + 1)) and `verdict`, which says when a random set of its size explains as much.
    """
    meta = conditions.select("condition", "kind", "intervention", "kept")
    df = labelled(results, prompts).join(meta, on="condition", how="left")
    schema = {
        "model": pl.Utf8, "intervention": pl.Utf8, "condition": pl.Utf8, "kept": pl.Utf8, "label": pl.Utf8,
        "n": pl.Int64, "m_circuit": pl.Float64, "m_empty": pl.Float64, "m_model": pl.Float64,
        "faithfulness": pl.Float64, "n_random": pl.Int64, "random_mean": pl.Float64, "random_max": pl.Float64,
        "p_greater": pl.Float64, "verdict": pl.Utf8,
    }  # fmt: skip
    rows: list[dict] = []

    def mean(part: pl.DataFrame) -> float | None:
        v = part.filter(pl.col("_finite"))["log_odds"].to_numpy()
        return float(v.mean()) if v.size else None

    for model in sorted(df["model"].unique().to_list()):
        dm = df.filter(pl.col("model") == model)
        circuits = dm.filter(pl.col("kind").is_in(CIRCUIT_KINDS))
        for kind in circuits["intervention"].unique(maintain_order=True).to_list():
            dk = circuits.filter(pl.col("intervention") == kind)
            for lab in _LABEL_NAMES:
                pick = (lambda d: d) if lab == "all" else (lambda d, c=lab == "correct": d.filter(pl.col("label") == c))
                m_model = mean(pick(dm.filter(pl.col("condition") == baseline)))
                m_empty = mean(pick(dk.filter(pl.col("kind") == "circuit_empty")))
                found = []
                for cond in dk.filter(pl.col("kind") != "circuit_empty")["condition"].unique(maintain_order=True):
                    part = pick(dk.filter(pl.col("condition") == cond))
                    m = mean(part)
                    ok = None not in (m, m_empty, m_model) and m_model != m_empty
                    found.append({"model": model, "intervention": kind, "condition": cond, "kept": part["kept"][0],
                                  "label": lab, "n": part.filter(pl.col("_finite")).height, "m_circuit": m,
                                  "m_empty": m_empty, "m_model": m_model,
                                  "faithfulness": (m - m_empty) / (m_model - m_empty) if ok else None})
                rows += _judge_faithfulness(found)
    return pl.DataFrame(rows, schema=schema)


def _judge_faithfulness(found: list[dict]) -> list[dict]:
    """The target's row gets the random sets' faithfulness next to its own, and what it says."""
    random = np.array([r["faithfulness"] for r in found if r["kept"] != "target" and r["faithfulness"] is not None])
    for r in found:
        if r["kept"] != "target":
            continue
        n = int(random.size)
        r.update(n_random=n, random_mean=float(random.mean()) if n else None,
                 random_max=float(random.max()) if n else None)
        f = r["faithfulness"]
        if f is None or not n:
            r["verdict"] = "undefined" if f is None else "no random set of its size to compare with"
            continue
        beaten = int((random >= f).sum())
        r["p_greater"] = (1 + beaten) / (n + 1)
        r["verdict"] = (f"explains more than all {n} random sets of its size" if not beaten else
                        f"explains no more than a random set of its size: {beaten} of {n} random sets explain as much "
                        "or more")
    return found
