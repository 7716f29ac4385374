"""W&B tracking of a finished sweep (or weight-diff, discovery, generate or compare job): one run per job,
written by the driver only.

Everything is logged from the parquet files' frames after they are on disk, so tracking can never lose
a result: if W&B fails (full disk, a broken frame) a warning says where the results are and how to
re-log them (`python launch.py --relog OUT`), and the sweep carries on. An online run that cannot start
within `wandb.init_timeout` seconds (no network, bad key) is logged offline in OUT instead, and one
warning gives the `wandb sync` command that uploads it later.

Offline runs (the default) live entirely under OUT/wandb: the W&B folders (`WANDB_DIR`, cache, data,
config, artifact staging) are pointed there for the duration of the call, and the previous environment
is restored afterwards, so nothing lands in the home folder (online mode keeps the user's
WANDB_CONFIG_DIR, which holds the host set by `wandb login`; the key is read from ~/.netrc or
WANDB_API_KEY). An offline run is uploaded later with `wandb sync`.

Keys:
  run.summary  "{model}/{condition}/{column}"          every numeric column of summary.parquet
               "{model}/target_vs_controls/{metric}/{stat}"  target effect vs random-set controls (zero; another
                                                       kind under "{model}/target_vs_controls/target@{kind}/...")
               "{model}/faithfulness/{kind}/{label}/{stat}"  the target set's faithfulness (circuit conditions)
               "weight_diff/{selection}/{column}"      numeric columns of the weight-diff selection
               "sweep/{rows_written,shards_run,...}"   job bookkeeping
  history      "tables/<name>"                         W&B Tables (summary, per_prompt, ...)
               "{model}/p_yes_norm/{group}/{label}"    histograms; group = baseline, target (target@<kind>),
                                                       <kind>_pooled (<kind>@<intervention>_pooled)
               "figures/<file stem>"                   the PNG figures as images
  artifact     "<name>-results" of type "sweep-results" (results/, summary, prompts, conditions, stats/,
               and OUT/weight_diff* when that job ran); the weight-diff-only job logs "<name>-weight-diff"
               of type "weight-diff-results"; a discovery logs "<name>-discovery" of type "discovery-results"
               (OUT/discovery's tables and target configs)
A discovery run (job_type "discover") has "{model}/discover/{objective,spearman_atp_exact,best_head_set/...}"
and "discover/{shards_run,...}" in its summary, and the tables heads, neurons (top rows by |atp|), probes
and sets.
The generate and compare jobs log their own runs (job_type generate / compare; `log_generate`,
`log_compare` say what they hold).
Tables are cut at wandb.Table.MAX_ROWS (10,000) rows and the weight-diff table at its top 5,000 rows by
1 - cos; the full frames are in the artifact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs.config import Config, config_from_dict
from jobs.errors import InputError
from jobs.runtime.storage import OutDir, read_manifest
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
LOGGED_TABLES = ("summary", "per_prompt", "target_vs_controls", "paired_change", "by_error_kind", "faithfulness")


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


def faithfulness_metrics(faith: pl.DataFrame) -> dict[str, Any]:
    """The target's faithfulness per circuit kind and label: "{model}/faithfulness/{kind}/{label}/{stat}"."""
    rows = faith.filter(pl.col("kept") == "target").iter_rows(named=True)
    return {f"{r['model']}/faithfulness/{r['intervention']}/{r['label']}/{s}": _scalar(r[s])
            for r in rows for s in ("faithfulness", "random_mean", "random_max", "p_greater")}


def to_wandb_table(df: pl.DataFrame):
    """A polars frame as a wandb.Table: nested columns (lists, structs) become strings, None stays None."""
    import wandb

    nested = {c for c, t in df.schema.items() if t.is_nested()}
    columns = [
        [None if v is None else str(v) for v in df[c].to_list()] if c in nested else df[c].to_list()
        for c in df.columns
    ]
    return wandb.Table(columns=df.columns, data=[list(r) for r in zip(*columns)] if columns else [])


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


def weight_diff_logs(weight_diff: pl.DataFrame, selection: pl.DataFrame | None, out: OutDir) -> tuple[dict, dict]:
    """(summary metrics, history items) of a weight diff: the selection whole, the table's top rows, and
    the per-(head, matrix) summary of the row view when it was computed."""
    top = weight_diff.sort("one_minus_cos", descending=True, nulls_last=True).head(WEIGHT_DIFF_MAX_ROWS)
    history = {"tables/weight_diff_top": to_wandb_table(top)}
    if out.weight_diff_rows_summary.is_file():
        rows = pl.read_parquet(out.weight_diff_rows_summary)
        history["tables/weight_diff_rows_summary"] = to_wandb_table(_capped(rows))
    metrics: dict[str, Any] = {
        "weight_diff/n_rows": weight_diff.height,
        "weight_diff/max_one_minus_cos": _scalar(weight_diff["one_minus_cos"].max()),
    }
    if selection is not None and selection.height:
        history["tables/weight_diff_selection"] = to_wandb_table(selection)
        cols = _numeric_columns(selection)
        for row in selection.iter_rows(named=True):
            metrics.update({f"weight_diff/{row['selection']}/{c}": _scalar(row[c]) for c in cols})
    return metrics, history


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _wandb_env(root: Path, mode: str) -> dict[str, str]:
    """W&B's folders under OUT/wandb. Online keeps the user's config dir: it holds the login's host."""
    env = {
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB_SILENT": "true",
    }
    if mode == "offline":
        env["WANDB_CONFIG_DIR"] = str(root / "config")
    return env


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values (or absence) after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings(mode: str, init_timeout: float):
    """Keep init fast and the run folder small: no console capture, code, git, stats or machine probe."""
    import wandb

    return wandb.Settings(
        mode=mode,
        init_timeout=init_timeout,
        console="off",
        save_code=False,
        disable_code=True,
        disable_git=True,
        x_disable_stats=True,
        x_disable_machine_info=True,
        x_disable_meta=True,
        silent=True,
    )


def _safe_name(name: str) -> str:
    """Artifact names allow letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^\w.-]", "-", name)


def _relog_hint(out: OutDir) -> str:
    return f"python launch.py --relog {out.root} [--mode offline|online]"


class _InitFailed(Exception):
    """wandb.init itself failed (no network, bad key, server down): nothing was logged yet."""


def _run_once(cfg: Config, root: Path, mode: str, job_type: str, fill: Callable[[Any], None]) -> str:
    """Open one run in `mode`, let `fill` log into it, close it; returns the run folder or URL."""
    w = cfg.wandb
    run = None
    with _environment(_wandb_env(root, mode)):
        import wandb

        try:
            root.mkdir(parents=True, exist_ok=True)
            try:
                run = wandb.init(
                    project=w.project, entity=w.entity, group=cfg.name, job_type=job_type,
                    name=f"{cfg.name}-{job_type}", config=cfg.to_dict(), dir=str(root), reinit="create_new",
                    settings=_settings(mode, w.init_timeout),
                )
            except Exception as e:  # noqa: BLE001 - any init failure means the same: try offline
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # W&B's advice lines name its API
                raise _InitFailed(f"{type(e).__name__}: {first}") from e
            fill(run)
            where = run.url if mode == "online" else str(Path(run.settings.sync_dir))
            run.finish()
            run = None
            return where
        finally:
            if run is not None:
                run.finish(exit_code=1)
            # Stop the W&B service: it keeps the environment it started with, and the next run
            # (another OUT, or the offline fallback) must not inherit this one's folders.
            wandb.teardown()


def _log_run(cfg: Config, out: OutDir, job_type: str, fill: Callable[[Any], None]) -> str | None:
    """Open one run (group = sweep name), let `fill` log into it, close it; never raises.

    Online mode waits at most `wandb.init_timeout` seconds for the server; if it cannot start the run
    (no network, bad key) the run is logged offline in OUT instead, with one warning that gives the
    `wandb sync` command. Returns the offline run folder, the online URL, or None (disabled, or failed).
    """
    mode = cfg.wandb.mode
    if mode == "disabled":
        return None
    root = out.wandb.resolve()
    try:
        if mode == "online":
            started = time.perf_counter()
            try:
                where = _run_once(cfg, root, "online", job_type, fill)
            except _InitFailed as e:
                waited = time.perf_counter() - started
                where = _run_once(cfg, root, "offline", job_type, fill)
                print(
                    f"WARNING: W&B online run could not start after {waited:.0f} s (wandb.init_timeout = "
                    f"{cfg.wandb.init_timeout:g} s; {e}). Logged it offline instead; upload it with: wandb sync {where}",
                    file=sys.stderr,
                )
                return where
        else:
            where = _run_once(cfg, root, mode, job_type, fill)
    except Exception as e:  # noqa: BLE001 - tracking must never cost the computed results
        print(
            f"WARNING: W&B logging failed ({type(e).__name__}: {e}). Nothing is lost: every result is on disk "
            f"in {out.root} (summary.parquet, results/, stats/, figures/). Re-log it with: {_relog_hint(out)}",
            file=sys.stderr,
        )
        return None
    hint = f" (upload with: wandb sync {where})" if mode == "offline" else ""
    print(f"W&B {job_type} run ({mode}): {where}{hint}")
    return where


def log_sweep(
    cfg: Config,
    out: OutDir,
    tables: dict[str, pl.DataFrame | None],
    figures: list[Path],
    weight_diff: pl.DataFrame | None,
    bookkeeping: dict[str, float] | None,
) -> str | None:
    """Log a finished sweep as one W&B run (job_type "sweep"); see the module docstring for the keys.

    `tables` are the frames of `jobs.finalize.compute_tables` (optionally `weight_diff_selection`),
    `bookkeeping` the sweep's own numbers (rows written, shards run, ...; None on a re-log). Returns the
    offline run folder, the online URL, or None when disabled or W&B failed (reported, never raised).
    """

    def fill(run) -> None:
        import wandb

        metrics = summary_metrics(tables["summary"])
        if tables.get("target_vs_controls") is not None:
            metrics.update(tvc_metrics(tables["target_vs_controls"]))
        if tables.get("faithfulness") is not None:
            metrics.update(faithfulness_metrics(tables["faithfulness"]))
        metrics["sweep/n_prompts"] = tables["prompts"].height
        metrics["sweep/n_conditions"] = tables["conditions"].height
        metrics.update({f"sweep/{name}": value for name, value in (bookkeeping or {}).items()})
        items: dict[str, Any] = {
            f"tables/{name}": to_wandb_table(_capped(tables[name]))
            for name in LOGGED_TABLES if tables.get(name) is not None
        }
        items.update(p_yes_norm_histograms(tables["results"], tables["prompts"], tables["conditions"]))
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        if weight_diff is not None:
            wd_metrics, wd_items = weight_diff_logs(weight_diff, tables.get("weight_diff_selection"), out)
            metrics.update(wd_metrics)
            items.update(wd_items)
        run.summary.update(metrics)
        run.log(items)
        run.log_artifact(_results_artifact(cfg.name, out))

    return _log_run(cfg, out, "sweep", fill)


def log_weight_diff(cfg: Config, out: OutDir, weight_diff: pl.DataFrame, selection: pl.DataFrame | None) -> str | None:
    """Log a weight-diff-only job as one W&B run (job_type "weight_diff").

    Logs the selection table and its numbers, the top rows by 1 - cos, and the OUT/weight_diff*
    files as one artifact. Same return value and failure handling as `log_sweep`.
    """

    def fill(run) -> None:
        import wandb

        metrics, items = weight_diff_logs(weight_diff, selection, out)
        run.summary.update(metrics)
        run.log(items)
        art = wandb.Artifact(f"{_safe_name(cfg.name)}-weight-diff", type=WEIGHT_DIFF_ARTIFACT_TYPE)
        for path in out.weight_diff_files:
            if path.is_file():
                art.add_file(str(path), name=path.name)
        run.log_artifact(art)

    return _log_run(cfg, out, "weight_diff", fill)


def log_discovery(cfg: Config, out: OutDir, tables: dict[str, pl.DataFrame], figures: list[Path], files: list[Path],
                  metrics: dict[str, Any]) -> str | None:
    """Log a finished discovery as one W&B run (job_type "discover").

    `metrics` become summary values, `tables` W&B Tables (the neurons' sorted by |atp| first, so the
    cut at Table.MAX_ROWS keeps the largest), `figures` images, and `files` one artifact. Same return
    value and failure handling as `log_sweep`.
    """

    def fill(run) -> None:
        import wandb

        run.summary.update({k: _scalar(v) for k, v in metrics.items()})
        items: dict[str, Any] = {}
        for name, frame in tables.items():
            if name == "neurons":
                frame = frame.sort(pl.col("atp").abs(), descending=True, nulls_last=True)
            items[f"tables/{name}"] = to_wandb_table(_capped(frame))
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        run.log(items)
        art = wandb.Artifact(f"{_safe_name(cfg.name)}-discovery", type=DISCOVERY_ARTIFACT_TYPE)
        for path in files:
            art.add_file(str(path), name=path.name)
        run.log_artifact(art)

    return _log_run(cfg, out, "discover", fill)


def log_generate(cfg: Config, out: OutDir, generations: pl.DataFrame, attempts: pl.DataFrame,
                 numbers: dict[str, Any]) -> str | None:
    """Log a generate job as one W&B run (job_type "generate").

    Summary "generate/<number>" (samples, fraction correct by TinyZero's reward, tokens/s, attempts, ...),
    the tables "tables/generations" and "tables/attempts", and both parquet files as the artifact
    "<name>-generations" of type "generations". Same return value and failure handling as `log_sweep`.
    """

    def fill(run) -> None:
        import wandb

        run.summary.update({f"generate/{k}": _scalar(v) for k, v in numbers.items()})
        run.log({"tables/generations": to_wandb_table(_capped(generations)),
                 "tables/attempts": to_wandb_table(_capped(attempts))})
        art = wandb.Artifact(f"{_safe_name(cfg.name)}-generations", type=GENERATIONS_ARTIFACT_TYPE)
        for path in (out.generations, out.attempts):
            art.add_file(str(path), name=path.name)
        run.log_artifact(art)

    return _log_run(cfg, out, "generate", fill)


def log_compare(cfg: Config, out: OutDir, per_layer: pl.DataFrame, tables: dict[str, pl.DataFrame],
                figures: list[Path], numbers: dict[str, Any]) -> str | None:
    """Log a compare job as one W&B run (job_type "compare").

    `per_layer` (one row per layer) becomes the history, one step per layer, so every column is a
    curve over the depth ("compare/<column>" against "layer"); `tables` become "tables/compare_<name>",
    the figures "figures/<stem>", `numbers` the summary "compare/<number>"; the files of OUT/compare
    are the artifact "<name>-compare" of type "compare-results". Same return value and failure handling
    as `log_sweep`.
    """

    def fill(run) -> None:
        import wandb

        run.define_metric("layer")
        run.define_metric("compare/*", step_metric="layer")
        for row in per_layer.iter_rows(named=True):
            run.log({"layer": row["layer"], **{f"compare/{k}": _scalar(v) for k, v in row.items() if k != "layer"}})
        run.summary.update({f"compare/{k}": _scalar(v) for k, v in numbers.items()})
        items: dict[str, Any] = {f"tables/compare_{name}": to_wandb_table(_capped(t)) for name, t in tables.items()}
        items.update({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
        run.log(items)
        art = wandb.Artifact(f"{_safe_name(cfg.name)}-compare", type=COMPARE_ARTIFACT_TYPE)
        for path in sorted(out.compare.rglob("*")):
            if path.suffix in (".parquet", ".json", ".png"):
                art.add_file(str(path), name=str(path.relative_to(out.root)))
        run.log_artifact(art)

    return _log_run(cfg, out, "compare", fill)


def _capped(df: pl.DataFrame) -> pl.DataFrame:
    """W&B truncates tables above Table.MAX_ROWS with only a log line; cut explicitly instead."""
    import wandb

    return df.head(wandb.Table.MAX_ROWS)


def _results_artifact(name: str, out: OutDir):
    """The parquet outputs as one artifact (copied to staging now, so later rewrites cannot corrupt it)."""
    import wandb

    art = wandb.Artifact(f"{_safe_name(name)}-results", type=ARTIFACT_TYPE)
    for path in (out.summary, out.prompts, out.conditions):
        if path.is_file():
            art.add_file(str(path), name=path.name)
    for folder in (out.results, out.stats):
        if folder.is_dir():
            art.add_dir(str(folder), name=folder.name)
    for path in out.weight_diff_files:
        if path.is_file():
            art.add_file(str(path), name=path.name)
    return art


# --------------------------------------------------------------------------------------------
# re-logging an existing output folder
# --------------------------------------------------------------------------------------------


def relog(out_root: str | Path, mode: str | None = None) -> str | None:
    """Log a finished sweep folder again from its files (after a W&B failure, or to go online).

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
    results, prompts = out.read_results(), pl.read_parquet(out.prompts)
    tables: dict[str, pl.DataFrame | None] = {
        "results": results, "prompts": prompts, "conditions": pl.read_parquet(out.conditions),
        "summary": pl.read_parquet(out.summary), "per_prompt": per_prompt_table(results, prompts),
    }
    for path in sorted(out.stats.glob("*.parquet")):
        tables[path.stem] = pl.read_parquet(path)
    weight_diff = pl.read_parquet(out.weight_diff) if out.weight_diff.is_file() else None
    sel = out.weight_diff_selection
    tables["weight_diff_selection"] = pl.read_parquet(sel) if sel.is_file() else None
    return log_sweep(cfg, out, tables, sorted(out.figures.glob("*.png")), weight_diff, None)
