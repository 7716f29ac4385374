"""After the shards: check completeness, compute statistics, draw figures, log the W&B run.

Everything here reads the parquet files back from disk, so a resumed sweep and an uninterrupted one
summarise exactly the same data.
"""

from __future__ import annotations

import polars as pl

from jobs.storage import OutDir, write_parquet_atomic
from verif.analysis import figures, stats


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


def compute_tables(plan, out: OutDir) -> dict[str, pl.DataFrame]:
    """All statistics of a finished sweep, as frames (also written under OUT/)."""
    from jobs.sweep import check_complete

    results = out.read_results()
    check_complete(results, plan)
    prompts = pl.read_parquet(out.prompts)
    conditions = pl.read_parquet(out.conditions)
    st = plan.cfg["stats"]
    tables = {"results": results, "prompts": prompts, "conditions": conditions}
    tables["summary"] = stats.summarize(results, prompts, conditions)
    tables["by_error_kind"] = stats.by_error_kind(results, prompts)
    tables["per_prompt"] = per_prompt_table(results, prompts)
    kinds = set(conditions["kind"].to_list())
    if "target" in kinds:
        tables["paired_change"] = stats.paired_change(results, prompts, "target", n_boot=st["n_boot"], seed=st["seed"])
    if {"target", "random"} <= kinds:
        tables["target_vs_controls"] = stats.target_vs_controls(tables["summary"], list(stats.DEFAULT_CONTROL_METRICS))
    write_parquet_atomic(tables["summary"], out.summary)
    for name in ("by_error_kind", "paired_change", "target_vs_controls"):
        if name in tables:
            write_parquet_atomic(tables[name], out.root / "stats" / f"{name}.parquet")
    return tables


def finalize(plan, out: OutDir, report) -> None:
    """Summary, figures, optional weight diff and the W&B run; fills the report's paths."""
    from jobs.tracking import log_sweep

    cfg = plan.cfg
    tables = compute_tables(plan, out)
    report.summary = tables["summary"]
    report.figures = figures.make_figures(
        tables["results"], tables["prompts"], tables["conditions"], tables["summary"], out.figures,
        n_layers=plan.arch.n_layers, n_heads=plan.arch.n_heads,
        n_boot=cfg["stats"]["n_boot"], seed=cfg["stats"]["seed"],
    )
    wd = cfg["weight_diff"]
    weight_diff = None
    if wd["base"] and wd["tuned"]:
        from jobs.weight_diff import run_weight_diff

        target = next((c.heads for c in plan.conditions if c.kind == "target"), None)
        result = run_weight_diff(wd["base"], wd["tuned"], out.root, target_heads=list(target) if target else None,
                                 top_k=wd["top_k"])
        weight_diff = result.table
        tables["weight_diff_selection"] = result.selection
    report.wandb_dir = log_sweep(cfg, out, tables, report.figures, weight_diff, report)


def summary_lines(report) -> list[str]:
    """The end-of-run report: what was written and where to look."""
    out = report.out
    lines = [
        f"rows written: {report.rows_written} in {report.shards_run} shards "
        f"({report.shards_skipped} already on disk), {report.seconds:.1f} s "
        f"(startup {report.startup_seconds:.1f} s)",
    ]
    if report.retried:
        lines.append(f"shards retried after a worker died: {', '.join(report.retried)}")
    lines += [
        f"results:  {out.results}/ (one parquet per shard)",
        f"summary:  {out.summary}",
        f"stats:    {out.root / 'stats'}/",
        f"figures:  {out.figures}/ ({len(report.figures)} PNG)",
        f"manifest: {out.manifest}",
        f"W&B run:  {report.wandb_dir or 'disabled'}",
    ]
    if report.summary is not None:
        lines.append(_headline(report.summary))
    return lines


def _pair(row: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    return f"correct {fmt(row['mean_p_yes_norm_correct'])} / incorrect {fmt(row['mean_p_yes_norm_incorrect'])}"


def _headline(summary: pl.DataFrame) -> str:
    """One line per model: baseline vs target mean p_yes_norm on correct / incorrect attempts."""
    parts = []
    for model in summary["model"].unique(maintain_order=True).to_list():
        rows = {r["condition"]: r for r in summary.filter(pl.col("model") == model).iter_rows(named=True)}
        base, tgt = rows.get("baseline"), rows.get("target")
        text = f"{model}: mean P(yes) baseline {_pair(base)}"
        if tgt:
            text += f"; target {_pair(tgt)}"
        parts.append(text)
    return "\n".join(parts)
