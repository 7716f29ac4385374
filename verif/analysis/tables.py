"""Result tables shaped for reading: one row per attempt with its baseline and target P(Yes)."""

from __future__ import annotations

import polars as pl


def target_conditions(conditions: list[str]) -> list[str]:
    """The target set's conditions, one per intervention kind (`target`, `target@mean`, ...), as ids say."""
    return [c for c in conditions if c == "target" or c.startswith("target@")]


def per_prompt_table(results: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """One row per (model, prompt): the attempt, its label, and baseline vs target p_yes_norm (columns
    `p_yes_norm_target` and `change` for zero, `p_yes_norm_target@<kind>` and `change@<kind>` for each other
    intervention kind)."""
    targets = target_conditions(results["condition"].unique().sort().to_list())
    wide = (
        results.filter(pl.col("condition").is_in(["baseline", *targets]))
        .pivot(on="condition", index=["model", "prompt_id"], values="p_yes_norm")
        .rename({"baseline": "p_yes_norm_baseline"})
    )
    for t in targets:
        suffix = t.removeprefix("target")
        wide = wide.rename({t: f"p_yes_norm_{t}"}).with_columns(
            (pl.col(f"p_yes_norm_{t}") - pl.col("p_yes_norm_baseline")).alias(f"change{suffix}")
        )
    cols = ["prompt_id", "numbers", "target", "attempt", "label", "error_kind", "prompt"]
    return wide.join(prompts.select(cols).rename({"target": "target_value"}), on="prompt_id").sort(["model", "prompt_id"])
