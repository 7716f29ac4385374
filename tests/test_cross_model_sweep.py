"""A sweep of three models on a 4-layer x 4-head seed-shaped model with the plumbing tokenizer (the first
10,000 Qwen2.5 ranks: the study's Yes/No ids, a 15x smaller embedding and a tokenizer that loads at once), in
this process: the model, a copy of it (identical), and a copy whose target heads have their W_Q rows scaled (a
planted difference). It writes the cross-model tables and figures, logs them to W&B under cross/<a>__<b>/, and
its numbers are the known ones."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from jobs.config import load_config
from jobs.runtime.storage import OutDir
from jobs.sweep import run_sweep
from jobs.tracking import relog
from tests.support.models import build_seed_shaped_model, copy_with_scaled_queries
from tests.support.tokenizer import PLUMBING_RANKS
from tests.support.wandb_records import read_run
from verif.analysis.cross_model import PER_PROMPT_METRICS

TARGET = [(1, 2), (2, 0), (3, 1)]
# 10x sharper attention in the three target heads: the planted pair differs on the prompts' verdicts
# by more than their spread (a smaller factor, 3, left the log-odds difference's CI across 0 here).
SCALE = 10.0
# The weights' seed. Like SCALE, it decides whether 12 prompts are enough for the planted difference to show
# in both metrics' intervals: with this tokenizer seeds 0 and 1 leave delta_log_odds' CI across 0, seed 2 does
# not (delta_log_odds -0.40 [-0.76, -0.06], delta_correct -0.15 [-0.26, -0.05]).
SEED = 2
N_PROMPTS = 12
MODELS = ("a", "a_copy", "b")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    a = build_seed_shaped_model(root / "a", seed=SEED, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                                n_ranks=PLUMBING_RANKS)
    shutil.copytree(a, root / "a_copy")
    copy_with_scaled_queries(a, root / "b", TARGET, SCALE)
    heads = ", ".join(f"L{layer} H{head}" for layer, head in TARGET)
    cfg = load_config(None, [f"model.path=[{a}, {root / 'a_copy'}, {root / 'b'}]", "model.device=cpu",
                             "model.dtype=float32", f"prompts.n={N_PROMPTS}", f"ablation.target_heads={heads}",
                             "ablation.random_controls=5", "ablation.sweeps=[single_head]", "ray.workers=0",
                             "wandb.mode=disabled", "stats.n_boot=200", f"shards.prompts_per_shard={N_PROMPTS}"],
                      str(root / "OUT"))
    report = run_sweep(cfg)
    return report, OutDir(root / "OUT")


def table(out: OutDir, pair: str) -> pl.DataFrame:
    return pl.read_parquet(out.cross_model).filter(pl.col("pair") == pair)


def test_identical_models_differ_by_nothing(swept):
    _, out = swept
    rows = table(out, "a__a_copy")
    assert rows.height == 4 * (1 + 5 + 16)  # 4 metrics x (target, 5 random sets, 16 single heads)
    for c in ("diff", "diff_lo", "diff_hi"):
        assert (rows[c] == 0.0).all(), c
    correlations = rows.filter(pl.col("metric").is_in(PER_PROMPT_METRICS))
    for c in ("pearson", "spearman", "pearson_lo", "spearman_hi"):
        defined = correlations[c].drop_nulls()
        assert defined.len() == correlations.height and (defined == 1.0).all(), c
    maps = pl.read_parquet(out.cross_model_maps).filter(pl.col("pair") == "a__a_copy")
    assert maps.height == len(PER_PROMPT_METRICS)
    assert (maps["spearman"] == 1.0).all() and (maps["spearman_lo"] == 1.0).all()
    assert (maps["k"] == len(TARGET)).all() and (maps["overlap"] == maps["k"]).all()


def test_planted_queries_move_the_target_and_nothing_it_ablates(swept):
    _, out = swept
    results = out.read_results()
    wide = {m: results.filter(pl.col("model") == m).sort(["condition", "prompt_id"]) for m in MODELS}
    # With the target zeroed the scaled query heads contribute nothing: a and b score the same forward,
    # the same batches and kernels (one thread), so the same bits.
    target = {m: wide[m].filter(pl.col("condition") == "target")["log_odds"].to_numpy() for m in MODELS}
    assert np.array_equal(target["a"], target["b"])
    base = {m: wide[m].filter(pl.col("condition") == "baseline")["log_odds"].to_numpy() for m in MODELS}
    assert not np.array_equal(base["a"], base["b"])
    rows = {r["metric"]: r for r in table(out, "a__b").filter(pl.col("kind") == "target").iter_rows(named=True)}
    # so the difference of the effects is the difference of the baselines, prompt by prompt (float64
    # means of 12 differences of the same float64 numbers: a few ulps of ~1)
    assert rows["delta_log_odds"]["diff"] == pytest.approx(float(np.mean(base["a"] - base["b"])), abs=1e-12)
    for metric in ("delta_log_odds", "delta_correct"):
        r = rows[metric]
        assert r["diff_lo"] <= r["diff"] <= r["diff_hi"] and (r["diff_hi"] < 0 or r["diff_lo"] > 0), r
    # a copy of a against b gives a's numbers (its intervals come from another seed: the pair's names)
    copy = {r["metric"]: r for r in table(out, "a_copy__b").filter(pl.col("kind") == "target").iter_rows(named=True)}
    assert copy["delta_log_odds"]["diff"] == rows["delta_log_odds"]["diff"]


def test_files_report_and_wandb_keys(swept):
    report, out = swept
    pairs = ["a__a_copy", "a__b", "a_copy__b"]
    figures = sorted(p.name for p in out.cross_figures.glob("*.png"))
    assert figures == sorted(f"{p}__{f}.png" for p in pairs for f in ("same_mechanism", "scatter_single_head"))
    lines = "\n".join(report.lines())
    assert f"cross:    {out.cross_model}, {out.cross_model_maps}" in lines
    assert all(f"  {p}: target delta_log_odds" in lines for p in pairs)
    assert relog(out.root, mode="offline") is not None
    (run_dir,) = (out.wandb / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    cross = table(out, "a__b").filter((pl.col("kind") == "target") & (pl.col("metric") == "delta_log_odds")).row(0, named=True)
    assert run["summary"]["cross/a__b/target/delta_log_odds/diff"] == cross["diff"]
    assert run["summary"]["cross/a__b/maps/single_head/delta_log_odds/spearman"] == pytest.approx(
        pl.read_parquet(out.cross_model_maps).filter((pl.col("pair") == "a__b") & (pl.col("metric") == "delta_log_odds"))
        ["spearman"][0], rel=1e-15)
    summary = pl.read_parquet(out.summary)
    # the per-model keys are what they were: "<model>/<condition>/<column>"
    assert run["summary"]["b/target/delta_correct"] == summary.filter(
        (pl.col("model") == "b") & (pl.col("condition") == "target"))["delta_correct"][0]
    logged = {k for step in run["history"] for k in step}
    for p in pairs:
        assert {f"cross/{p}/tables/cross_model", f"cross/{p}/tables/maps", f"cross/{p}/figures/same_mechanism",
                f"cross/{p}/figures/scatter_single_head"} <= logged
    assert not any(k.startswith("figures/") and "same_mechanism" in k for k in logged)
    (art,) = [a for a in run["artifacts"] if a["type"] == "sweep-results"]
    assert {"cross_model.parquet", "cross_model_maps.parquet"} <= set(art["files"])
