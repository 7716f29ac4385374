"""Every condition's effect with a confidence interval: the numbers a per-condition chart plots.

`summary.parquet` holds each condition's paired effects (delta_correct, delta_incorrect, delta_auroc)
but an interval only for the target (`stats.paired_change`). A reviewer comparing the target with
each random set, or reading a layer sweep, needs the interval of every condition, and a single-head
sweep has hundreds of them, so the bootstrap is drawn once per model and shared by all conditions:

* prompts are resampled with replacement within each label (n_correct draws among the correct
  attempts, n_incorrect among the incorrect ones), one draw per resample, the same for every
  condition of the model (a condition's interval does not depend on which other conditions exist);
* in resample b a condition's delta_correct is the mean paired change over the drawn correct prompts
  whose condition and baseline rows are both finite, as in the summary; delta_auroc is its weighted
  AUROC (Mann-Whitney with the draw counts as weights, ties counted half) minus the baseline's on the
  same draw;
* the interval is the percentile interval of the resamples.

The point estimates equal the summary's. The target's interval is drawn differently from
`stats.paired_change` (which resamples each condition's finite pairs with its own generator), so the
two agree within the bootstrap's noise, not to the digit.

Pure polars + numpy, float64 throughout.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from verif.analysis.stats import WeightedAuroc, group_seed, labelled, stratified_counts

EFFECT_METRICS: tuple[str, ...] = ("delta_correct", "delta_incorrect", "delta_auroc")
# Entries of the resample-count matrix held at once (resamples x prompts), as in bootstrap_mean_ci.
_CHUNK_ENTRIES = 4_000_000


def _interval(boots: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of [n_boot, n_conditions], NaN where no resample is defined."""
    alpha = (1.0 - ci) / 2.0
    lo = np.full(boots.shape[1], np.nan)
    hi = np.full(boots.shape[1], np.nan)
    ok = np.isfinite(boots).any(axis=0)
    if ok.any():
        lo[ok], hi[ok] = np.nanquantile(boots[:, ok], [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def _model_effects(df: pl.DataFrame, model: str, baseline: str, n_boot: int, seed: int, ci: float) -> dict:
    """Point estimates and intervals of one model's conditions (columns of the result frame)."""
    ids = np.sort(df["prompt_id"].unique().to_numpy())
    conds = df["condition"].unique(maintain_order=True).to_list()
    index = {p: i for i, p in enumerate(ids)}
    score = np.full((len(conds), ids.size), np.nan)
    finite = np.zeros((len(conds), ids.size), dtype=bool)
    label = np.zeros(ids.size, dtype=bool)
    c_of = {c: i for i, c in enumerate(conds)}
    for row in df.select("condition", "prompt_id", "p_yes_norm", "_finite", "label").iter_rows():
        c, p = c_of[row[0]], index[row[1]]
        score[c, p], finite[c, p], label[p] = row[2], row[3], row[4]
    b = c_of[baseline]
    paired = finite & finite[b]
    change = np.where(paired, score - np.where(finite[b], score[b], 0.0), 0.0)
    pos, neg = np.flatnonzero(label), np.flatnonzero(~label)

    def auroc_of(c: int, weights_t: np.ndarray) -> np.ndarray:
        """Condition c's AUROC over its finite prompts under each column of `weights_t` ([n_prompts, n])."""
        p, n = pos[finite[c, pos]], neg[finite[c, neg]]
        return WeightedAuroc.of(score[c, p], score[c, n]).auroc(weights_t[p], weights_t[n])

    def deltas(weights: np.ndarray) -> dict[str, np.ndarray]:
        """[n_weights, n_conditions] delta_correct, delta_incorrect and delta_auroc under each weight row."""
        out = {}
        for name, side in (("delta_correct", label), ("delta_incorrect", ~label)):
            w = weights * side
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = (w @ (paired * change).T) / (w @ paired.T)
        weights_t = np.ascontiguousarray(weights.T)  # prompts first: gathering prompts copies whole rows
        auroc = np.stack([auroc_of(c, weights_t) for c in range(len(conds))], axis=1)
        out["delta_auroc"] = auroc - auroc[:, [b]]
        return out

    point = {k: v[0] for k, v in deltas(np.ones((1, ids.size))).items()}
    boots = {k: np.empty((max(n_boot, 0), len(conds))) for k in EFFECT_METRICS}
    rng = np.random.default_rng(group_seed(seed, model, "condition_effects"))
    chunk = max(1, _CHUNK_ENTRIES // max(ids.size, 1))
    for start in range(0, max(n_boot, 0), chunk):
        m = min(chunk, n_boot - start)
        for k, v in deltas(stratified_counts(label, m, rng)).items():
            boots[k][start:start + m] = v
    columns: dict[str, list] = {"model": [model] * len(conds), "condition": conds,
                                "n_pairs_correct": (paired[:, pos]).sum(axis=1).tolist(),
                                "n_pairs_incorrect": (paired[:, neg]).sum(axis=1).tolist()}
    for k in EFFECT_METRICS:
        lo, hi = _interval(boots[k], ci) if n_boot > 0 else (np.full(len(conds), np.nan),) * 2
        columns[k], columns[f"{k}_lo"], columns[f"{k}_hi"] = point[k], lo, hi
    return columns


def condition_effects(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    conditions: pl.DataFrame,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    baseline: str = "baseline",
) -> pl.DataFrame:
    """One row per (model, condition): delta_correct, delta_incorrect and delta_auroc with `_lo` / `_hi`
    percentile bounds (module docstring), the finite pairs behind each delta, and every column of
    `conditions` (kind, heads, layer, head, and whatever a later sweep adds, e.g. `intervention`).

    Undefined numbers (no finite pair, one label absent) are null."""
    df = labelled(results, prompts)
    frames = []
    for model in df["model"].unique(maintain_order=True).to_list():
        part = df.filter(pl.col("model") == model)
        if part.filter(pl.col("condition") == baseline).height == 0:
            raise ValueError(f"model {model!r}: no baseline condition {baseline!r}; effects are paired changes")
        frames.append(pl.DataFrame(_model_effects(part, model, baseline, n_boot, seed, ci)))
    floats = [c for k in EFFECT_METRICS for c in (k, f"{k}_lo", f"{k}_hi")]
    effects = pl.concat(frames).with_columns(
        [pl.col(c).cast(pl.Float64).fill_nan(None) for c in floats]
        + [pl.col(c).cast(pl.Int64) for c in ("n_pairs_correct", "n_pairs_incorrect")])
    meta = conditions.unique("condition", keep="first", maintain_order=True)
    order = {c: i for i, c in enumerate(meta["condition"].to_list())}
    return (effects.join(meta, on="condition", how="left")
            .with_columns(pl.col("condition").replace_strict(order, default=len(order), return_dtype=pl.Int64)
                          .alias("_order"))
            .sort("model", "_order").drop("_order")
            .select("model", "condition", *[c for c in meta.columns if c != "condition"],
                    *floats, "n_pairs_correct", "n_pairs_incorrect"))
