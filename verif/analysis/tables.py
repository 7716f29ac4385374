"""Result tables shaped for reading: one row per attempt with its baseline and target P(Yes)."""

from __future__ import annotations

import polars as pl


def per_prompt_table(results: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """One row per (model, prompt): the attempt, its label, and baseline vs target p_yes_norm."""
    wide = (
        results.filter(pl.col("condition").is_in(["baseline", "target"]))
        .pivot(on="condition", index=["model", "prompt_id"], values="p_yes_norm")
        .rename({"baseline": "p_yes_norm_baseline"})
    )
    if "target" in wide.columns:
        wide = wide.rename({"target": "p_yes_norm_target"}).with_columns(
            (pl.col("p_yes_norm_target") - pl.col("p_yes_norm_baseline")).alias("change")
        )
    cols = ["prompt_id", "numbers", "target", "attempt", "label", "error_kind", "prompt"]
    return wide.join(prompts.select(cols).rename({"target": "target_value"}), on="prompt_id").sort(["model", "prompt_id"])
