"""Cross-model activation patching (CMAP): how much of the gap between two models a component set carries.

A source model a and a receiver model b score the same prompt. Patching a set means running b with
the set's activations (its heads' slices of the o_proj input, its neurons' down_proj inputs, at every
position) replaced by a's on that prompt. With LD the log-odds log P(Yes) - log P(No), per prompt

    gap_closed = (LD_patched - LD_b) / (LD_a - LD_b)

is 1 when the set alone turns b's verdict into a's and 0 when patching it changes nothing (Prakash et
al., ICLR 2024, credit fine-tuning gains to head groups this way). Where the two models nearly agree
the ratio divides rounding by rounding: a prompt whose gap |LD_a - LD_b| is below `MIN_GAP` nats is
left out of the mean and counted. Random sets of the target's size, patched the same way, are the
null: "these heads carry the difference between the models" becomes the target's mean gap_closed
against theirs, with the sweep's empirical p-value (`stats.target_vs_controls`).

This module is the statistics only; the patched forwards are the engine's. Input frames have one row
per (source, receiver, condition, prompt): `source`, `model` (the receiver), `condition`, `kind`,
`prompt_id`, `ld_patched`, `ld_source`, `ld_receiver` (the last two from unablated forwards).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from verif.analysis import stats

__all__ = ["MIN_GAP", "cmap_frame", "gap_closed", "cmap_table", "cmap_vs_controls"]

MIN_GAP = 0.1
"""Smallest |LD_a - LD_b| (nats of log-odds) a prompt's gap is divided by. Near P(Yes) = 0.5 a gap of 0.1
is 2.5 points of normalised P(Yes): below it the two models barely differ on the prompt, and any
scoring noise in the numerator is blown up by 1 / gap into values of no meaning. The counterfactual-pair
patching metric divides by the same (`verif.analysis.patching.MIN_GAP`)."""
CMAP_COLUMNS = ("source", "model", "condition", "kind", "prompt_id", "ld_patched", "ld_source", "ld_receiver")


def cmap_frame(results: pl.DataFrame, conditions: pl.DataFrame, source: str, baseline: str = "baseline",
               intervention: str = "cross") -> pl.DataFrame:
    """The CMAP rows of a sweep (CMAP_COLUMNS): per receiver (every model with `intervention` rows; the
    source has none), condition of that intervention and prompt, LD_patched from the receiver's row,
    LD_source and LD_receiver from the source's and the receiver's `baseline` rows on the same prompt.
    A prompt either baseline lacks is not in the frame."""
    meta = conditions.filter(pl.col("intervention") == intervention).select("condition", "kind")
    if source not in set(results["model"].to_list()):
        raise ValueError(f"CMAP: the source model {source!r} has no rows; models: {results['model'].unique().to_list()}")
    base = results.filter(pl.col("condition") == baseline)
    ld_source = base.filter(pl.col("model") == source).select("prompt_id", pl.col("log_odds").alias("ld_source"))
    ld_receiver = base.select("model", "prompt_id", pl.col("log_odds").alias("ld_receiver"))
    patched = results.filter(pl.col("model") != source).join(meta, on="condition", how="inner")
    return (patched.select("model", "condition", "kind", "prompt_id", pl.col("log_odds").alias("ld_patched"))
            .join(ld_source, on="prompt_id", how="inner").join(ld_receiver, on=["model", "prompt_id"], how="inner")
            .select(pl.lit(source).alias("source"), *[c for c in CMAP_COLUMNS if c != "source"])
            .sort(["model", "condition", "prompt_id"]))


def gap_closed(ld_patched: np.ndarray, ld_source: np.ndarray, ld_receiver: np.ndarray,
               min_gap: float = MIN_GAP) -> np.ndarray:
    """Per prompt (LD_patched - LD_b) / (LD_a - LD_b), NaN where |LD_a - LD_b| < min_gap or any input
    is not finite (the prompt is left out)."""
    patched, source, receiver = (np.asarray(v, dtype=np.float64) for v in (ld_patched, ld_source, ld_receiver))
    gap = source - receiver
    keep = np.isfinite(patched) & np.isfinite(gap) & (np.abs(gap) >= min_gap)
    out = np.full(gap.shape, np.nan)
    out[keep] = (patched[keep] - receiver[keep]) / gap[keep]
    return out


def cmap_table(frame: pl.DataFrame, n_boot: int = 2000, seed: int = 0, ci: float = 0.95,
               min_gap: float = MIN_GAP) -> pl.DataFrame:
    """Per (source, receiver, condition): n_prompts (kept), n_left_out (gap below min_gap or not
    finite), gap_closed (mean over kept prompts) with a bootstrap CI over them (`stats.bootstrap_mean_ci`,
    one generator per row from seed, both models and the condition)."""
    missing = [c for c in CMAP_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"CMAP frame lacks column(s) {missing}; has {frame.columns}")
    rows = []
    keys = ["source", "model", "condition", "kind"]
    for (source, model, condition, kind), part in frame.sort("prompt_id").group_by(keys, maintain_order=True):
        g = gap_closed(part["ld_patched"].to_numpy(), part["ld_source"].to_numpy(), part["ld_receiver"].to_numpy(),
                       min_gap)
        kept = g[np.isfinite(g)]
        mean, lo, hi = stats.bootstrap_mean_ci(kept, n_boot, stats.group_seed(seed, "cmap", source, model, condition), ci)
        rows.append({"source": source, "model": model, "condition": condition, "kind": kind,
                     "n_prompts": int(kept.size), "n_left_out": int(g.size - kept.size),
                     "gap_closed": mean if kept.size else None,
                     "gap_closed_lo": lo if np.isfinite(lo) else None, "gap_closed_hi": hi if np.isfinite(hi) else None})
    schema = {"source": pl.Utf8, "model": pl.Utf8, "condition": pl.Utf8, "kind": pl.Utf8, "n_prompts": pl.Int64,
              "n_left_out": pl.Int64, "gap_closed": pl.Float64, "gap_closed_lo": pl.Float64, "gap_closed_hi": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def cmap_vs_controls(table: pl.DataFrame) -> pl.DataFrame:
    """The target's gap_closed against the random sets' of each (source, receiver): `stats.target_vs_controls`
    rows with `source` and `model` (the receiver) in front. `p_greater` answers "does the target carry
    more of the gap than random sets of its size"; `p_empirical` is the two-sided count."""
    if table.height == 0:
        raise ValueError("cmap_vs_controls: no CMAP rows")
    found = []
    for (source, model), part in table.group_by(["source", "model"], maintain_order=True):
        named = part.with_columns(pl.lit(f"{source}->{model}").alias("model"), pl.lit("cross").alias("intervention"))
        tvc = stats.target_vs_controls(named, "gap_closed")
        found.append(tvc.drop("model").select(pl.lit(source).alias("source"), pl.lit(model).alias("model"), pl.all()))
    return pl.concat(found)
