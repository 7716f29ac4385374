"""The activation-patching metric on counterfactual pairs: how much of a pair's log-odds difference one
resample-ablated component set moves.

A resample condition replaces the set's activations on a prompt p by those of an unablated forward of
its partner q (the other prompt of its pair, `verif.task.pairs`). With LD = `log_odds` = log P(Yes) -
log P(No) (float64):

    recovered(p) = (LD_patched(p) - LD_self(p)) / (LD_partner - LD_self(p))

LD_patched(p) is the resample condition on p, LD_self(p) the baseline on p, LD_partner the baseline on
q. On the incorrect prompt of a pair this is *denoising* (clean activations into the corrupt run): +1
means the set alone carries the whole difference (sufficiency). On the correct prompt it is *noising*:
+1 means the corrupt activations of the set alone erase it (necessity). 0 is no effect. Heimersheim &
Nanda 2024, "How to use and interpret activation patching".

The denominator is the pair's baseline gap. A pair whose |gap| is below `MIN_GAP` is left out of both
sides and counted (`n_small_gap`), never divided by; a row with a non-finite LD is left out and
counted (`n_nonfinite`). Both sides of a pair share |gap|, so a pair is left out of both or neither
for its gap.

Pure polars + numpy, conventions of `verif.analysis.stats` (float64, seeded bootstrap per group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from verif.analysis.stats import _check_columns, bootstrap_mean_ci, group_seed
from verif.task.pairs import check_pairs

__all__ = ["MIN_GAP", "SIDES", "Patching", "patching"]

MIN_GAP = 0.1
"""Smallest |LD_partner - LD_self| (nats of log-odds) a pair is divided by. Near P(Yes) = 0.5 a log-odds
gap of 0.1 is 2.5 points of normalised P(Yes): below it the model barely tells the pair's prompts
apart, and the ratio's numerator (any scoring noise, any effect of the set unrelated to the pair's
difference) is blown up by 1 / gap into values of no meaning. Measured in the sweep's own units, so
it does not depend on the model."""

SIDES = ("denoising", "noising", "both")
"""denoising: the incorrect prompts patched; noising: the correct ones; both: per pair the mean of its
two sides (pairs where both are finite), so every side is a mean over pairs."""


@dataclass(frozen=True)
class Patching:
    """`per_pair`: one row per (model, condition, pair, side): prompt_id, partner_id, label, ld_self,
    ld_partner, ld_patched, gap (ld_partner - ld_self), recovered (null unless status is "ok"), status
    ("ok", "small_gap", "nonfinite").

    `summary`: one row per (model, condition): kind (from the conditions frame; what
    `stats.target_vs_controls` groups by), n_pairs, n_small_gap (pairs left out), n_nonfinite (rows
    left out), and for each side of SIDES `n_<side>`, `recovered_<side>` (the mean over pairs),
    `ci_low_<side>`, `ci_high_<side>` (percentile bootstrap over pairs)."""

    per_pair: pl.DataFrame
    summary: pl.DataFrame


def _partners(prompts: pl.DataFrame) -> pl.DataFrame:
    """prompt_id, label, pair_id, partner_id of every prompt; a ValueError when the prompts hold no pairs
    or break the pair rules (`verif.task.pairs.check_pairs`)."""
    _check_columns(prompts, ("prompt_id", "label", "pair_id"), "prompts")
    ids = prompts["prompt_id"].to_list()
    if not check_pairs(prompts["pair_id"].to_list(), prompts["label"].to_list(), [f"prompt {i}" for i in ids]):
        raise ValueError("prompts have no pair_id: the patching metric needs counterfactual pairs (prompts.pairs)")
    rows = prompts.select("prompt_id", "label", pl.col("pair_id").cast(pl.Int64))
    other = rows.select("pair_id", pl.col("prompt_id").alias("partner_id"))
    return rows.join(other, on="pair_id").filter(pl.col("prompt_id") != pl.col("partner_id"))


def _resample_ids(resample: Sequence[str] | pl.DataFrame) -> list[str]:
    if isinstance(resample, pl.DataFrame):
        _check_columns(resample, ("condition", "intervention"), "conditions")
        return resample.filter(pl.col("intervention") == "resample")["condition"].unique(maintain_order=True).to_list()
    return list(resample)


def _finite(col: str) -> pl.Expr:
    return pl.col(col).is_finite().fill_null(False)


def _per_pair(results: pl.DataFrame, partners: pl.DataFrame, ids: list[str], baseline: str,
              min_gap: float) -> pl.DataFrame:
    lo = results.select("model", "prompt_id", "condition", pl.col("log_odds").cast(pl.Float64))
    base = lo.filter(pl.col("condition") == baseline).select("model", "prompt_id", pl.col("log_odds").alias("ld_self"))
    missing = sorted(set(lo["model"].unique().to_list()) - set(base["model"].unique().to_list()))
    if missing:
        raise ValueError(f"no baseline condition {baseline!r} in results for model(s) {missing}; patching needs it")
    found = set(lo["condition"].unique().to_list())
    absent = [c for c in ids if c not in found]
    if absent:
        raise ValueError(f"resample condition(s) {absent} not in results")
    partner_base = base.select("model", pl.col("prompt_id").alias("partner_id"), pl.col("ld_self").alias("ld_partner"))
    gap = pl.col("ld_partner") - pl.col("ld_self")
    status = (
        pl.when(~(_finite("ld_self") & _finite("ld_partner"))).then(pl.lit("nonfinite"))
        .when(gap.abs() < min_gap).then(pl.lit("small_gap"))
        .when(~_finite("ld_patched")).then(pl.lit("nonfinite"))
        .otherwise(pl.lit("ok"))
    )  # fmt: skip
    return (
        lo.filter(pl.col("condition").is_in(ids))
        .rename({"log_odds": "ld_patched"})
        .join(partners, on="prompt_id", how="inner")
        .join(base, on=["model", "prompt_id"], how="left")
        .join(partner_base, on=["model", "partner_id"], how="left")
        .with_columns(gap.alias("gap"), status.alias("status"),
                      pl.when(pl.col("label")).then(pl.lit("noising")).otherwise(pl.lit("denoising")).alias("side"))
        .with_columns(pl.when(pl.col("status") == "ok")
                      .then((pl.col("ld_patched") - pl.col("ld_self")) / pl.col("gap")).alias("recovered"))
        .select("model", "condition", "pair_id", "side", "prompt_id", "partner_id", "label", "ld_self",
                "ld_partner", "ld_patched", "gap", "recovered", "status")
        .sort("model", "condition", "pair_id", "side")
    )


def _side_values(group: pl.DataFrame) -> dict[str, np.ndarray]:
    """Each side's recovered values, one per pair in pair_id order (both: the mean of a pair's two)."""
    ok = group.filter(pl.col("status") == "ok")
    values = {s: ok.filter(pl.col("side") == s).sort("pair_id")["recovered"].to_numpy() for s in SIDES[:2]}
    both = ok.group_by("pair_id").agg(pl.col("recovered").mean(), pl.len().alias("n")).filter(pl.col("n") == 2)
    values["both"] = both.sort("pair_id")["recovered"].to_numpy()
    return values


def patching(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    resample: Sequence[str] | pl.DataFrame,
    conditions: pl.DataFrame | None = None,
    baseline: str = "baseline",
    min_gap: float = MIN_GAP,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> Patching:
    """`recovered` per pair and side, and per (model, condition) its mean and bootstrap CI per side.

    results: model, prompt_id, condition, log_odds (other columns ignored). prompts: prompt_id, label,
    pair_id (every prompt paired). resample: the resample conditions' ids, or a conditions frame whose
    `intervention` column says which they are ("resample"). conditions: condition -> kind for the
    summary (defaults to `resample` when that is a frame; without either, kind is null), so that
    `stats.target_vs_controls(summary, ["recovered_denoising", ...])` judges the target's recovered
    against random sets exactly as every other effect.

    The CI resamples pairs (`stats.bootstrap_mean_ci`), seeded per (model, condition, side) from `seed`
    (`stats.group_seed`), so a group's interval does not change when other conditions are added.
    """
    _check_columns(results, ("model", "prompt_id", "condition", "log_odds"), "results")
    ids = _resample_ids(resample)
    per_pair = _per_pair(results, _partners(prompts), ids, baseline, min_gap)
    if conditions is None and isinstance(resample, pl.DataFrame):
        conditions = resample
    kind_of = {} if conditions is None else dict(conditions.select("condition", "kind").iter_rows())
    rows = []
    for (model, condition), group in per_pair.group_by(["model", "condition"], maintain_order=True):
        row = {
            "model": model, "condition": condition, "kind": kind_of.get(condition),
            "n_pairs": group["pair_id"].n_unique(),
            "n_small_gap": group.filter(pl.col("status") == "small_gap")["pair_id"].n_unique(),
            "n_nonfinite": int((group["status"] == "nonfinite").sum()),
        }  # fmt: skip
        for side, v in _side_values(group).items():
            mean, lo, hi = bootstrap_mean_ci(v, n_boot=n_boot, seed=group_seed(seed, model, condition, side), ci=ci)
            row |= {f"n_{side}": int(v.size), f"recovered_{side}": mean if v.size else None,
                    f"ci_low_{side}": lo if np.isfinite(lo) else None, f"ci_high_{side}": hi if np.isfinite(hi) else None}
        rows.append(row)
    schema = {"model": pl.Utf8, "condition": pl.Utf8, "kind": pl.Utf8, "n_pairs": pl.Int64, "n_small_gap": pl.Int64,
              "n_nonfinite": pl.Int64}
    for side in SIDES:
        schema |= {f"n_{side}": pl.Int64, f"recovered_{side}": pl.Float64, f"ci_low_{side}": pl.Float64,
                   f"ci_high_{side}": pl.Float64}
    return Patching(per_pair, pl.DataFrame(rows, schema=schema))
