"""W&B tracking of a finished sweep (or weight-diff, discovery, generate or compare job): one run per job
and folder, written by the driver only, from the frames of files already on disk (a W&B failure costs
no result: `jobs.wandb_run` opens, replaces and closes the run, and falls back offline).

Run metadata, the same for every job, so W&B's run table filters, groups and compares sweeps:
  config       the whole resolved config, flattened: "model.path", "ablation.target_heads",
               "prompts.template", ... (every key of `python launch.py --config-reference`)
  group        the sweep name (`name`); job_type the job (sweep, discover, weight_diff, generate, compare)
  tags         the model names and the condition kinds (sweep) or component kinds (discover)

Keys of a sweep run (README "Reviewing on W&B" lists what to put on a panel):
  run.summary  "headline/..."                          stable names for panels over many runs
                                                       (`headline_metrics`)
               "{model}/{condition}/{column}"          every numeric column of summary.parquet
               "{model}/target_vs_controls/{metric}/{stat}"  target effect vs random-set controls (zero; another
                                                       kind under "{model}/target_vs_controls/target@{kind}/...")
               "{model}/faithfulness/{kind}/{label}/{stat}"  the target set's faithfulness (circuit conditions)
               "{model}/patching/{side}/{stat}", "{model}/patching_vs_controls/{metric}/{stat}"  the target's
                                                       recovered under resample (`patching_metrics`)
               "cross/{a}__{b}/target/{metric}/{stat}", "cross/{a}__{b}/maps/{sweep}/{metric}/{stat}"
                                                       with two or more models (`cross_model_logs`)
               "cross/{a}__{b}/cmap/target/{stat}", "cross/{a}__{b}/cmap/vs_controls/{stat}"  CMAP with
                                                       ablation.kind cross: a the source, b the receiver
                                                       (`cmap_logs`)
               "weight_diff/{selection}/{column}"      numeric columns of the weight-diff selection
               "sweep/{rows_written,shards_run,...}"   job bookkeeping
  history      "charts/..."                            native charts (`jobs.charts`): their tables are
                                                       "charts/..._table", their panels in the config
                                                       under _wandb.visualize
               "tables/<name>"                         W&B Tables (summary, condition_effects, per_prompt, ...)
               "{model}/p_yes_norm/{group}/{label}"    histograms; group = baseline, target (target@<kind>),
                                                       <kind>_pooled (<kind>@<intervention>_pooled)
               "figures/<file stem>"                   the PNG figures as images
  artifact     "<name>-results" of type "sweep-results" (results/, summary, prompts, conditions, stats/,
               and OUT/weight_diff* when that job ran); the weight-diff-only job logs "<name>-weight-diff"
               of type "weight-diff-results"; a discovery logs "<name>-discovery" of type "discovery-results"
               (OUT/discovery's tables and target configs); generate "<name>-generations"; compare
               "<name>-compare"
  inputs       the artifacts of the generate job and discovery this job's files came from (`jobs.lineage`)
A discovery run (job_type "discover") has "{model}/discover/{objective,spearman_atp_exact,best_head_set/...}"
and "discover/{shards_run,...}" in its summary, the tables heads, neurons (top rows by |atp|), probes
and sets, and the charts atp vs exact and effect vs k.
The generate and compare jobs log their own runs (job_type generate / compare; `log_generate`,
`log_compare` say what they hold).
A table above W&B's 10,000 rows logs its first 10,000 and says so (a line at the end of the job, and
"tables/<name>/n_rows" in the summary); the weight-diff table logs its top 5,000 rows by 1 - cos; the
full frames are in the artifact.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs import charts as charts_mod
from jobs import lineage
from jobs.charts import Chart, to_wandb_table
from jobs.config import Config, config_from_dict
from jobs.errors import InputError
from jobs.runtime.storage import OutDir, read_manifest
from jobs.wandb_run import Session, log_run
from verif.analysis.effects import EFFECT_METRICS, condition_effects
from verif.analysis.cross_figures import pair_figures
from verif.analysis.cross_model import pair_name
from verif.analysis.tables import per_prompt_table

ARTIFACT_TYPE = "sweep-results"
WEIGHT_DIFF_ARTIFACT_TYPE = "weight-diff-results"
DISCOVERY_ARTIFACT_TYPE = "discovery-results"
GENERATIONS_ARTIFACT_TYPE = "generations"
COMPARE_ARTIFACT_TYPE = "compare-results"
HIST_BINS = 20
WEIGHT_DIFF_MAX_ROWS = 5000
# Conditions whose p_yes_norm gets its own histogram; every other kind is pooled into one per kind.
OWN_HISTOGRAM_KINDS = ("baseline", "target")
TVC_STATS = ("target_effect", "control_mean", "control_std", "n_controls", "z", "p_empirical", "p_less",
             "p_greater", "rank")
# Tables of `tables` logged as W&B Tables (the results themselves go into the artifact).
LOGGED_TABLES = ("summary", "condition_effects", "per_prompt", "target_vs_controls", "paired_change",
                 "by_error_kind", "faithfulness", "patching", "patching_vs_controls")
TABLE_ROWS = charts_mod.CHART_ROWS  # wandb.Table.MAX_ROWS: W&B cuts a longer table with only a log line
TAG_CHARS = 64  # W&B refuses longer tags
# Summary values of the target's cross-model rows and of the effect-map rows.
CROSS_TARGET_STATS = ("effect_a", "effect_b", "diff", "diff_lo", "diff_hi", "ratio", "pearson", "spearman",
                      "diff_z", "diff_p_empirical")
CROSS_MAP_STATS = ("spearman", "spearman_lo", "spearman_hi", "pearson", "k", "overlap", "expected_overlap", "p_overlap")
CMAP_TARGET_STATS = ("gap_closed", "gap_closed_lo", "gap_closed_hi", "n_prompts", "n_left_out")


# --------------------------------------------------------------------------------------------
# keys and conversions
# --------------------------------------------------------------------------------------------


def summary_key(model: str, condition: str, column: str) -> str:
    """The run.summary key of one summary.parquet cell (readers use this too)."""
    return f"{model}/{condition}/{column}"


def tvc_key(model: str, metric: str, stat: str) -> str:
    """The run.summary key of one target-vs-controls statistic."""
    return f"{model}/target_vs_controls/{metric}/{stat}"


def _scalar(value: Any) -> Any:
    """JSON-safe summary value: non-finite floats become None (W&B cannot chart NaN anyway)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _numeric_columns(df: pl.DataFrame, skip: tuple[str, ...] = ()) -> list[str]:
    return [c for c, t in df.schema.items() if t.is_numeric() and c not in skip]


def summary_metrics(summary: pl.DataFrame) -> dict[str, Any]:
    """Every numeric summary cell under `summary_key` (None where undefined)."""
    cols = _numeric_columns(summary)
    return {
        summary_key(row["model"], row["condition"], c): _scalar(row[c])
        for row in summary.iter_rows(named=True)
        for c in cols
    }


def tvc_metrics(tvc: pl.DataFrame) -> dict[str, Any]:
    """Target-vs-controls statistics under `tvc_key`; a second target condition gets its own prefix."""
    out = {}
    for row in tvc.iter_rows(named=True):
        metric = row["metric"] if row["target_condition"] == "target" else f"{row['target_condition']}/{row['metric']}"
        out.update({tvc_key(row["model"], metric, s): _scalar(row[s]) for s in TVC_STATS if s in row})
    return out


def patching_metrics(patched: pl.DataFrame, tvc: pl.DataFrame | None) -> dict[str, Any]:
    """The target's `recovered` under resample per side, with its CI: "{model}/patching/{side}/{stat}", and
    against the random sets: "{model}/patching_vs_controls/{metric}/{stat}"."""
    found: dict[str, Any] = {}
    for r in patched.filter(pl.col("kind") == "target").iter_rows(named=True):
        for side in ("denoising", "noising", "both"):
            found.update({f"{r['model']}/patching/{side}/{stat}": _scalar(r[f"{stat}_{side}"])
                          for stat in ("recovered", "ci_low", "ci_high", "n")})
        found[f"{r['model']}/patching/n_small_gap"] = r["n_small_gap"]
    for r in ([] if tvc is None else tvc.iter_rows(named=True)):
        found.update({f"{r['model']}/patching_vs_controls/{r['metric']}/{stat}": _scalar(r[stat])
                      for stat in ("target_effect", "control_mean", "control_std", "z", "p_empirical", "n_controls")})
    return found


def faithfulness_metrics(faith: pl.DataFrame) -> dict[str, Any]:
    """The target's faithfulness per circuit kind and label: "{model}/faithfulness/{kind}/{label}/{stat}"."""
    rows = faith.filter(pl.col("kept") == "target").iter_rows(named=True)
    return {f"{r['model']}/faithfulness/{r['intervention']}/{r['label']}/{s}": _scalar(r[s])
            for r in rows for s in ("faithfulness", "random_mean", "random_max", "p_greater")}


def p_yes_norm_histograms(results: pl.DataFrame, prompts: pl.DataFrame, conditions: pl.DataFrame) -> dict[str, Any]:
    """Histograms of p_yes_norm per model, condition group and label, on fixed bins over [0, 1].

    Baseline and target get one each; other kinds (random sets, layer and single-head sweeps) are
    pooled per kind, because hundreds of near-identical histograms would bury the comparison.
    """
    import wandb

    pooled = pl.col("kind")
    if "intervention" in conditions.columns:  # pooled per intervention kind too: random_pooled, random@mean_pooled
        pooled = pl.when(pl.col("intervention").is_in(["zero", "none"])).then(pooled).otherwise(
            pooled + "@" + pl.col("intervention"))
    kinds = conditions.select("condition", "kind", pooled.alias("pooled"))
    df = (
        results.select("model", "condition", "prompt_id", "p_yes_norm")
        .join(prompts.select("prompt_id", "label"), on="prompt_id", how="left")
        .join(kinds, on="condition", how="left")
        .with_columns(
            pl.when(pl.col("kind").is_in(OWN_HISTOGRAM_KINDS) | pl.col("kind").is_null())
            .then(pl.col("condition"))
            .otherwise(pl.col("pooled") + "_pooled")
            .alias("group")
        )
        .filter(pl.col("p_yes_norm").is_finite() & pl.col("label").is_not_null())
    )
    hists = {}
    for (model, group, label), part in df.group_by(["model", "group", "label"], maintain_order=True):
        counts, edges = np.histogram(part["p_yes_norm"].to_numpy(), bins=HIST_BINS, range=(0.0, 1.0))
        name = "correct" if label else "incorrect"
        hists[f"{model}/p_yes_norm/{group}/{name}"] = wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
    return hists


def weight_diff_logs(session: Session, weight_diff: pl.DataFrame, selection: pl.DataFrame | None,
                     out: OutDir) -> tuple[dict, dict]:
    """(summary metrics, history items) of a weight diff: the selection whole, the table's top rows by
    1 - cos, and the per-(head, matrix) summary of the row view when it was computed."""
    top = weight_diff.sort("one_minus_cos", descending=True, nulls_last=True).head(WEIGHT_DIFF_MAX_ROWS)
    frames = {"weight_diff_top": top}
    if out.weight_diff_rows_summary.is_file():
        frames["weight_diff_rows_summary"] = pl.read_parquet(out.weight_diff_rows_summary)
    metrics: dict[str, Any] = {
        "weight_diff/n_rows": weight_diff.height,
        "weight_diff/max_one_minus_cos": _scalar(weight_diff["one_minus_cos"].max()),
    }
    if selection is not None and selection.height:
        frames["weight_diff_selection"] = selection
        cols = _numeric_columns(selection)
        for row in selection.iter_rows(named=True):
            metrics.update({f"weight_diff/{row['selection']}/{c}": _scalar(row[c]) for c in cols})
    history, cut = logged_tables(session, frames)
    return metrics | cut, history


def logged_tables(session: Session, frames: dict[str, pl.DataFrame]) -> tuple[dict[str, Any], dict[str, Any]]:
    """History items "tables/<name>" and, for a frame above W&B's row limit, its first TABLE_ROWS rows,
    its full row count as summary "tables/<name>/n_rows" and a line saying so (never cut silently)."""
    items, cut = {}, {}
    for name, frame in frames.items():
        items[f"tables/{name}"] = to_wandb_table(frame.head(TABLE_ROWS))
        if frame.height > TABLE_ROWS:
            cut[f"tables/{name}/n_rows"] = frame.height
            session.notes.append(f"W&B: tables/{name} holds the first {TABLE_ROWS} of its {frame.height} rows "
                                 "(W&B's table limit); every row is in the job's files and the run's artifact")
    return items, cut


def chart_items(charts: list[Chart]) -> dict[str, Any]:
    """The charts as history items: W&B writes each table as "<key>_table" and its panel in the config."""
    return {c.key: c.to_wandb() for c in charts}


def cross_model_logs(session: Session, tables: dict[str, pl.DataFrame | None], out: OutDir) -> tuple[dict, dict]:
    """(summary metrics, history items) of the cross-model tables, each pair under "cross/{a}__{b}/": the
    target's rows (".../target/{metric}/{stat}"), the effect maps' (".../maps/{sweep}/{metric}/{stat}"), the
    pair's tables (".../tables/cross_model", ".../tables/maps") and figures (".../figures/{figure}")."""
    import wandb

    cross, maps = tables.get("cross_model"), tables.get("cross_model_maps")
    metrics: dict[str, Any] = {}
    items: dict[str, Any] = {}
    for pair in ([] if cross is None else cross["pair"].unique(maintain_order=True).to_list()):
        rows = cross.filter(pl.col("pair") == pair)
        for r in rows.filter(pl.col("kind") == "target").iter_rows(named=True):
            metrics.update({f"cross/{pair}/target/{r['metric']}/{s}": _scalar(r[s]) for s in CROSS_TARGET_STATS})
        items[f"cross/{pair}/tables/cross_model"] = to_wandb_table(rows.head(TABLE_ROWS))
        if rows.height > TABLE_ROWS:
            session.notes.append(f"W&B: cross/{pair}/tables/cross_model holds the first {TABLE_ROWS} of its "
                                 f"{rows.height} rows (W&B's table limit); every row is in OUT/cross_model.parquet")
        pair_maps = None if maps is None else maps.filter(pl.col("pair") == pair)
        if pair_maps is not None and pair_maps.height:
            for r in pair_maps.iter_rows(named=True):
                metrics.update({f"cross/{pair}/maps/{r['sweep']}/{r['metric']}/{s}": _scalar(r[s]) for s in CROSS_MAP_STATS})
            items[f"cross/{pair}/tables/maps"] = to_wandb_table(pair_maps.head(TABLE_ROWS))
        items.update({f"cross/{pair}/figures/{name}": wandb.Image(str(p))
                      for name, p in pair_figures(out.cross_figures, pair).items()})
    cmap_metrics, cmap_items = cmap_logs(session, tables)
    return metrics | cmap_metrics, items | cmap_items


def cmap_logs(session: Session, tables: dict[str, pl.DataFrame | None]) -> tuple[dict, dict]:
    """(summary metrics, history items) of CMAP (stats/cmap.parquet, cmap_vs_controls.parquet), each (source a,
    receiver b) under "cross/{a}__{b}/cmap/": the target's gap_closed (".../target/{stat}"), its test against
    the random sets (".../vs_controls/{stat}") and the pair's table ("cross/{a}__{b}/tables/cmap")."""
    cmap, vs = tables.get("cmap"), tables.get("cmap_vs_controls")
    metrics: dict[str, Any] = {}
    items: dict[str, Any] = {}
    for (source, model), rows in ([] if cmap is None else cmap.group_by(["source", "model"], maintain_order=True)):
        pair = pair_name(source, model)
        for r in rows.filter(pl.col("kind") == "target").iter_rows(named=True):
            metrics.update({f"cross/{pair}/cmap/target/{s}": _scalar(r[s]) for s in CMAP_TARGET_STATS})
        for r in ([] if vs is None else vs.filter((pl.col("source") == source) & (pl.col("model") == model))
                  .iter_rows(named=True)):
            metrics.update({f"cross/{pair}/cmap/vs_controls/{s}": _scalar(r[s]) for s in TVC_STATS})
        items[f"cross/{pair}/tables/cmap"] = to_wandb_table(rows.head(TABLE_ROWS))
        if rows.height > TABLE_ROWS:
            session.notes.append(f"W&B: cross/{pair}/tables/cmap holds the first {TABLE_ROWS} of its {rows.height} "
                                 "rows (W&B's table limit); every row is in OUT/stats/cmap.parquet")
    return metrics, items


# --------------------------------------------------------------------------------------------
# run metadata: config, tags, headline numbers
# --------------------------------------------------------------------------------------------


def run_config(cfg: Config) -> dict[str, Any]:
    """Every resolved key of the config under its dotted name (the sections' fields; a dict-valued key such
    as ray.resources_per_worker stays one value)."""

    def flat(section: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                out.update(flat(value, f"{prefix}{f.name}."))
            else:
                out[f"{prefix}{f.name}"] = value
        return out

    return flat(cfg, "")


def model_tag(spec: str) -> str:
    """A model.path entry as the name its rows carry: packaged:<name>, a folder's or file's name, a hub id."""
    if spec.startswith("packaged:"):
        return spec.split(":", 1)[1]
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


def run_tags(*groups: Any) -> list[str]:
    """Distinct non-empty tags in order, each cut to W&B's 64 characters (the end kept: it names the model)."""
    tags = [str(t) for group in groups for t in group if t is not None and str(t)]
    return list(dict.fromkeys(t if len(t) <= TAG_CHARS else "..." + t[-(TAG_CHARS - 3):] for t in tags))


def model_order(cfg: Config, models: list[str]) -> list[str]:
    """`models` (names as the rows carry them) in model.path order; names it does not give go last."""
    order = [model_tag(p) for p in cfg.model.paths]
    return sorted(models, key=lambda m: order.index(m) if m in order else len(order))


def headline_metrics(summary: pl.DataFrame, effects: pl.DataFrame, tvc: pl.DataFrame | None,
                     n_prompts: int, models: list[str]) -> dict[str, Any]:
    """Summary keys with the same names in every sweep, for panels over many runs: the first of `models`
    (model.path order) under "headline/", the k-th (k >= 1) under "headline_k/"; with several groups
    (charts.GROUP_COLUMNS, e.g. intervention kinds) each group's under its value ("headline/mean/...").

      headline/model                                  the model's name
      headline/n_prompts
      headline/baseline/{auroc,mean_p_yes_norm_correct,mean_p_yes_norm_incorrect}
      headline/<target>/{delta_correct,delta_incorrect,delta_auroc}[_lo|_hi]   95% CI bounds
      headline/<target>/{metric}/{p_empirical,z,n_controls}                    against the random sets
    """
    out: dict[str, Any] = {"headline/n_prompts": n_prompts}
    for k, model in enumerate(models):
        prefix = "headline" if k == 0 else f"headline_{k}"
        out[f"{prefix}/model"] = model
        base = summary.filter((pl.col("model") == model) & (pl.col("kind") == "baseline"))
        if base.height:
            row = base.row(0, named=True)
            for col in ("auroc", "mean_p_yes_norm_correct", "mean_p_yes_norm_incorrect"):
                out[f"{prefix}/baseline/{col}"] = _scalar(row[col])
        for suffix, rows in charts_mod.groups(effects.filter(pl.col("model") == model)):
            for t in rows.filter(pl.col("kind") == "target").iter_rows(named=True):
                where = f"{prefix}{suffix}/{t['condition']}"
                for metric in EFFECT_METRICS:
                    out.update({f"{where}/{c}": _scalar(t[c]) for c in (metric, f"{metric}_lo", f"{metric}_hi")})
                    stats = charts_mod.tvc_row(tvc, model, metric, t["condition"])
                    if stats:
                        out.update({f"{where}/{metric}/{s}": _scalar(stats[s]) for s in ("p_empirical", "z",
                                                                                           "n_controls")})
    return out


# --------------------------------------------------------------------------------------------
# the jobs' runs
# --------------------------------------------------------------------------------------------


def log_sweep(
    cfg: Config,
    out: OutDir,
    tables: dict[str, pl.DataFrame | None],
    figures: list[Path],
    weight_diff: pl.DataFrame | None,
    bookkeeping: dict[str, float] | None,
    config_file: str | None = None,
) -> str | None:
    """Log a finished sweep as one W&B run (job_type "sweep"); see the module docstring for the keys.

    `tables` are the frames of `jobs.finalize.compute_tables` (optionally `weight_diff_selection`),
    `bookkeeping` the sweep's own numbers (rows written, shards run, ...; None on a re-log), `config_file`
    the --config it was started with (an input when it is a discovery's target.yaml). Returns the
    offline run folder, the online URL, or None when disabled or W&B failed (reported, never raised).
    """

    def fill(session: Session) -> None:
        import wandb

        summary, effects = tables["summary"], tables["condition_effects"]
        metrics = summary_metrics(summary)
        if tables.get("target_vs_controls") is not None:
            metrics.update(tvc_metrics(tables["target_vs_controls"]))
        models = model_order(cfg, summary["model"].unique(maintain_order=True).to_list())
        metrics.update(headline_metrics(summary, effects, tables.get("target_vs_controls"), tables["prompts"].height,
                                        models))
        if tables.get("faithfulness") is not None:
            metrics.update(faithfulness_metrics(tables["faithfulness"]))
        if tables.get("patching") is not None:
            metrics.update(patching_metrics(tables["patching"], tables.get("patching_vs_controls")))
        metrics["sweep/n_prompts"] = tables["prompts"].height
        metrics["sweep/n_conditions"] = tables["conditions"].height
        metrics.update({f"sweep/{name}": value for name, value in (bookkeeping or {}).items()})
        items, cut = logged_tables(session, {n: tables[n] for n in LOGGED_TABLES if tables.get(n) is not None})
        metrics.update(cut)
        items.update(p_yes_norm_histograms(tables["results"], tables["prompts"], tables["conditions"]))
        items.update(chart_items(charts_mod.sweep_charts(tables)))
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        if weight_diff is not None:
            wd_metrics, wd_items = weight_diff_logs(session, weight_diff, tables.get("weight_diff_selection"), out)
            metrics.update(wd_metrics)
            items.update(wd_items)
        cross_metrics, cross_items = cross_model_logs(session, tables, out)
        metrics.update(cross_metrics)
        items.update(cross_items)
        session.run.summary.update(metrics)
        session.run.log(items)
        session.log_artifact(f"{cfg.name}-results", ARTIFACT_TYPE, out.root, _results_files(out))

    def tags() -> list[str]:
        conditions = tables["conditions"]
        groups = [conditions[c].unique(maintain_order=True).to_list() for c in charts_mod.GROUP_COLUMNS
                  if c in conditions.columns]
        return run_tags(model_order(cfg, tables["summary"]["model"].unique(maintain_order=True).to_list()),
                        conditions["kind"].unique(maintain_order=True).to_list(), *groups)

    return log_run(cfg, out, "sweep", fill, run_config(cfg), tags,
                   lambda: lineage.find_inputs(prompts_file=cfg.prompts.file, config_file=config_file))


def _model_tags(cfg: Config) -> list[str]:
    return [model_tag(p) for p in cfg.model.paths]


def log_weight_diff(cfg: Config, out: OutDir, weight_diff: pl.DataFrame, selection: pl.DataFrame | None,
                    config_file: str | None = None) -> str | None:
    """Log a weight-diff-only job as one W&B run (job_type "weight_diff").

    Logs the selection table and its numbers, the top rows by 1 - cos, and the OUT/weight_diff*
    files as one artifact; a `config_file` that is a discovery's target.yaml is its input. Same return
    value and failure handling as `log_sweep`.
    """

    def fill(session: Session) -> None:
        metrics, items = weight_diff_logs(session, weight_diff, selection, out)
        session.run.summary.update(metrics)
        session.run.log(items)
        session.log_artifact(f"{cfg.name}-weight-diff", WEIGHT_DIFF_ARTIFACT_TYPE, out.root, list(out.weight_diff_files))

    wd = cfg.weight_diff
    return log_run(cfg, out, "weight_diff", fill, run_config(cfg),
                   lambda: run_tags([model_tag(p) for p in (wd.base, wd.tuned) if p]),
                   lambda: lineage.find_inputs(config_file=config_file))


def log_discovery(cfg: Config, out: OutDir, tables: dict[str, pl.DataFrame], figures: list[Path], files: list[Path],
                  metrics: dict[str, Any]) -> str | None:
    """Log a finished discovery as one W&B run (job_type "discover").

    `metrics` become summary values, `tables` W&B Tables (the neurons' sorted by |atp| first, so the
    cut at the row limit keeps the largest), the charts atp vs exact and effect vs k (`jobs.charts`),
    `figures` images, and `files` one artifact (with target.yaml: what a sweep's --config names as its
    input). A `prompts.file` from a generate job is its input. Same return value and failure handling
    as `log_sweep`.
    """

    def fill(session: Session) -> None:
        import wandb

        frames = dict(tables)
        if "neurons" in frames:
            frames["neurons"] = frames["neurons"].sort(pl.col("atp").abs(), descending=True, nulls_last=True)
        items, cut = logged_tables(session, frames)
        session.run.summary.update({k: _scalar(v) for k, v in metrics.items()} | cut)
        if "heads" in tables and "sets" in tables:
            items.update(chart_items(charts_mod.discovery_charts(tables["heads"], tables["sets"])))
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        session.run.log(items)
        session.log_artifact(f"{cfg.name}-discovery", DISCOVERY_ARTIFACT_TYPE, out.root, list(files))

    def tags() -> list[str]:
        models = tables["heads"]["model"].unique(maintain_order=True).to_list() if "heads" in tables else _model_tags(cfg)
        return run_tags(models, tables["sets"]["kind"].unique(maintain_order=True).to_list() if "sets" in tables else [])

    return log_run(cfg, out, "discover", fill, run_config(cfg), tags,
                   lambda: lineage.find_inputs(prompts_file=cfg.prompts.file))


def log_generate(cfg: Config, out: OutDir, generations: pl.DataFrame, attempts: pl.DataFrame,
                 numbers: dict[str, Any]) -> str | None:
    """Log a generate job as one W&B run (job_type "generate").

    Summary "generate/<number>" (samples, fraction correct by TinyZero's reward, tokens/s, attempts, ...),
    the tables "tables/generations" and "tables/attempts", and both parquet files as the artifact
    "<name>-generations" of type "generations": the input a sweep with `prompts.file` on either file
    names. Same return value and failure handling as `log_sweep`.
    """

    def fill(session: Session) -> None:
        items, cut = logged_tables(session, {"generations": generations, "attempts": attempts})
        session.run.summary.update({f"generate/{k}": _scalar(v) for k, v in numbers.items()} | cut)
        session.run.log(items)
        session.log_artifact(f"{cfg.name}-generations", GENERATIONS_ARTIFACT_TYPE, out.root,
                             [out.generations, out.attempts])

    return log_run(cfg, out, "generate", fill, run_config(cfg), lambda: run_tags(_model_tags(cfg)))


def log_compare(cfg: Config, out: OutDir, per_layer: pl.DataFrame, tables: dict[str, pl.DataFrame],
                figures: list[Path], numbers: dict[str, Any], config_file: str | None = None) -> str | None:
    """Log a compare job as one W&B run (job_type "compare").

    `per_layer` (one row per layer) becomes the history, one step per layer, so every column is a
    curve over the depth ("compare/<column>" against "layer"); `tables` become "tables/compare_<name>",
    the figures "figures/<stem>", `numbers` the summary "compare/<number>"; the files of OUT/compare
    are the artifact "<name>-compare" of type "compare-results". Its inputs: a `prompts.file` from a
    generate job, and a discovery's target.yaml as `compare.neurons_from` or `config_file`. Same return
    value and failure handling as `log_sweep`.
    """

    def fill(session: Session) -> None:
        import wandb

        run = session.run
        run.define_metric("layer")
        run.define_metric("compare/*", step_metric="layer")
        for row in per_layer.iter_rows(named=True):
            run.log({"layer": row["layer"], **{f"compare/{k}": _scalar(v) for k, v in row.items() if k != "layer"}})
        items, cut = logged_tables(session, {f"compare_{name}": t for name, t in tables.items()})
        run.summary.update({f"compare/{k}": _scalar(v) for k, v in numbers.items()} | cut)
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        run.log(items)
        files = [p for p in sorted(out.compare.rglob("*")) if p.suffix in (".parquet", ".json", ".png")]
        session.log_artifact(f"{cfg.name}-compare", COMPARE_ARTIFACT_TYPE, out.root, files)

    return log_run(cfg, out, "compare", fill, run_config(cfg), lambda: run_tags(_model_tags(cfg)),
                   lambda: lineage.find_inputs(prompts_file=cfg.prompts.file, config_file=config_file,
                                               neurons_from=cfg.compare.neurons_from))


def _results_files(out: OutDir) -> list[Path]:
    """The sweep's parquet outputs (and OUT/weight_diff* when that job ran) for its results artifact."""
    files = [out.summary, out.prompts, out.conditions] + [p for p in (out.cross_model, out.cross_model_maps) if p.is_file()]
    for folder in (out.results, out.stats):
        files += sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    return files + list(out.weight_diff_files)


# --------------------------------------------------------------------------------------------
# re-logging an existing output folder
# --------------------------------------------------------------------------------------------


def relog(out_root: str | Path, mode: str | None = None) -> str | None:
    """Log a finished sweep folder again from its files (after a W&B failure, or to go online), into the
    same W&B run (its id is in OUT/wandb/sweep.json), with the --config it was started with as input.

    Other jobs' folders and unfinished sweeps are refused with what to do instead."""
    out = OutDir(out_root)
    if not out.manifest.is_file():
        raise InputError(f"--relog {out.root}: no {out.manifest.name} there; give the --out folder of a finished sweep")
    manifest = read_manifest(out)
    job = manifest.get("job", "sweep")
    if job != "sweep":
        raise InputError(f"--relog {out.root}: it holds a {job} job's output and --relog re-logs sweeps; run the "
                         f"{job} job again with --resume and the same --out (its shards are on disk, so only its "
                         "outputs and W&B run are made again)")
    if "finished" not in manifest:
        raise InputError(f"--relog {out.root}: the sweep there has not finished; continue it with --sweep --resume "
                         f"--out {out.root}")
    cfg = config_from_dict(manifest["config"])
    if mode:
        cfg = cfg.replace(wandb=dataclasses.replace(cfg.wandb, mode=mode))
    elif cfg.wandb.mode == "disabled":
        raise InputError(f"--relog {out.root}: the sweep there ran with wandb.mode=disabled, so there is no run to "
                         "log again; choose one with --mode offline or --mode online")
    results, prompts, conditions = out.read_results(), pl.read_parquet(out.prompts), pl.read_parquet(out.conditions)
    tables: dict[str, pl.DataFrame | None] = {
        "results": results, "prompts": prompts, "conditions": conditions,
        "summary": pl.read_parquet(out.summary), "per_prompt": per_prompt_table(results, prompts),
    }
    for path in sorted(out.stats.glob("*.parquet")) + [p for p in (out.cross_model, out.cross_model_maps) if p.is_file()]:
        tables[path.stem] = pl.read_parquet(path)
    if tables.get("condition_effects") is None:  # a folder finished before the sweep wrote it
        tables["condition_effects"] = condition_effects(results, prompts, conditions, cfg.stats.n_boot, cfg.stats.seed)
    weight_diff = pl.read_parquet(out.weight_diff) if out.weight_diff.is_file() else None
    sel = out.weight_diff_selection
    tables["weight_diff_selection"] = pl.read_parquet(sel) if sel.is_file() else None
    return log_sweep(cfg, out, tables, sorted(out.figures.glob("*.png")), weight_diff, None,
                     manifest.get("config_file"))
