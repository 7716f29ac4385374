"""After the shards: statistics, figures, the optional weight diff, and the W&B run.

Called with the complete results (the sweep checks completeness first). Everything is computed from
what is on disk, so a resumed sweep and an uninterrupted one summarise exactly the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from jobs.config import Config
from jobs.cross_model import CrossModel, cross_model_outputs
from jobs.runtime.storage import OutDir, write_parquet_atomic, writing
from jobs.tracking import log_sweep
from jobs.weight_diff import run_configured_weight_diff
from verif.analysis import figures, stats
from verif.analysis.effects import condition_effects
from verif.analysis.patching import patching
from verif.analysis.tables import per_prompt_table
from verif.model.loading import Arch

# Tables written under OUT/stats/ when they apply.
STATS_TABLES = ("by_error_kind", "paired_change", "target_vs_controls", "condition_effects", "faithfulness",
                "patching", "patching_pairs", "patching_vs_controls")  # (CMAP's: jobs.cross_model)
# The patching metric's columns the target's recovered is judged on against random sets (verif.analysis.patching).
RECOVERED_METRICS = ("recovered_denoising", "recovered_noising", "recovered_both")


@dataclass
class Finalized:
    """What finalize produced: the summary frame, the figure files and where the W&B run is."""

    summary: pl.DataFrame
    figures: list[Path]
    wandb_dir: str | None
    cross: CrossModel | None = None


def compute_tables(cfg: Config, out: OutDir, results: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """All statistics of a finished sweep, as frames (also written under OUT/)."""
    prompts = pl.read_parquet(out.prompts)
    conditions = pl.read_parquet(out.conditions)
    st = cfg.stats
    tables = {"results": results, "prompts": prompts, "conditions": conditions}
    tables["summary"] = stats.summarize(results, prompts, conditions)
    tables["by_error_kind"] = stats.by_error_kind(results, prompts)
    tables["per_prompt"] = per_prompt_table(results, prompts)
    tables["condition_effects"] = condition_effects(results, prompts, conditions, n_boot=st.n_boot, seed=st.seed)
    kinds = set(conditions["kind"].to_list())
    targets = conditions.filter(pl.col("kind") == "target")["condition"].to_list()  # one per intervention kind
    if targets:
        tables["paired_change"] = pl.concat([stats.paired_change(results, prompts, t, n_boot=st.n_boot, seed=st.seed)
                                             for t in targets])
    if {"target", "random"} <= kinds:
        tables["target_vs_controls"] = stats.target_vs_controls(tables["summary"], list(stats.DEFAULT_CONTROL_METRICS))
    if "circuit" in kinds:
        tables["faithfulness"] = stats.faithfulness(results, prompts, conditions)
    tables.update(patching_tables(results, prompts, conditions, cfg))
    write_parquet_atomic(tables["summary"], out.summary)
    for name in STATS_TABLES:
        if name in tables:
            write_parquet_atomic(tables[name], out.stats / f"{name}.parquet")
    return tables


def patching_tables(results: pl.DataFrame, prompts: pl.DataFrame, conditions: pl.DataFrame,
                    cfg: Config) -> dict[str, pl.DataFrame]:
    """With resample conditions: `recovered` per condition (`patching`) and per pair (`patching_pairs`), and
    the target's recovered against the random sets of its size (`patching_vs_controls`)."""
    resample = conditions.filter(pl.col("intervention") == "resample")
    if resample.height == 0:
        return {}
    patched = patching(results, prompts, resample, n_boot=cfg.stats.n_boot, seed=cfg.stats.seed)
    summary = patched.summary.with_columns(pl.lit("resample").alias("intervention"))
    found = {"patching": summary, "patching_pairs": patched.per_pair}
    if {"target", "random"} <= set(resample["kind"].to_list()):
        found["patching_vs_controls"] = stats.target_vs_controls(summary, list(RECOVERED_METRICS))
    return found


def finalize(cfg: Config, out: OutDir, results: pl.DataFrame, arch: Arch, bookkeeping: dict,
             config_file: str | None = None, models: Sequence[str] = (), cmap_source: str | None = None) -> Finalized:
    """Summary, figures, the cross-model tables (two or more `models`, in model.path order; CMAP's with
    `cmap_source`, the cross source's name), the configured weight diff and the W&B run of a complete sweep
    (`config_file`: the --config it ran with, for the run's lineage)."""
    tables = compute_tables(cfg, out, results)
    cross = cross_model_outputs(cfg, out, tables, models, cmap_source)
    if cross is not None:
        tables["cross_model"], tables["cross_model_maps"] = cross.table, cross.maps
        tables["cmap"], tables["cmap_vs_controls"] = cross.cmap, cross.cmap_vs
    with writing(out.figures):
        pngs = figures.make_figures(
            tables["results"], tables["prompts"], tables["conditions"], tables["summary"], out.figures,
            n_layers=arch.n_layers, n_heads=arch.n_heads, n_boot=cfg.stats.n_boot, seed=cfg.stats.seed,
            faith=tables.get("faithfulness"),
        )
    weight_diff = run_configured_weight_diff(cfg, out)
    if weight_diff is not None:
        tables["weight_diff_selection"] = weight_diff.selection
    wandb_dir = log_sweep(cfg, out, tables, pngs, weight_diff.table if weight_diff else None, bookkeeping,
                          config_file)
    return Finalized(tables["summary"], pngs, wandb_dir, cross)
