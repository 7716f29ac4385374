"""Cross-model activation patching (`ablation.kind: cross`) end to end, in one in-process sweep of three models.

A 4-layer x 4-head seed-shaped model with the plumbing tokenizer (`a`, the source), an identical copy
(`a_copy`) and a copy whose target heads have their W_Q rows scaled (`b`, a planted difference: only those
query heads compute differently). Each receiver's cross rows are checked against what they must be: the
copy's equal its baseline bit for bit, b's target patched from a gives a's log-odds, and every cross row
equals an independent reference (hooks on the models' own o_proj, one prompt at a time, copying a's o_proj
input slices into b's forward). Then the CMAP tables, the cache and its resume, the report and W&B.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from transformers import AutoTokenizer

from jobs.config import load_config
from jobs.cross import cache_path
from jobs.runtime.storage import OutDir
from jobs.sweep import run_sweep
from jobs.tracking import cmap_logs
from tests.support.interventions import reference_table
from tests.support.models import build_seed_shaped_model, copy_with_scaled_queries
from tests.support.tokenizer import PLUMBING_RANKS
from tests.tolerances import ScoreTol
from verif.analysis.cmap import MIN_GAP
from verif.design.conditions import Ablation
from verif.design.heads import parse_heads
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no

TARGET = [(1, 2), (2, 0), (3, 1)]
SCALE = 10.0  # as tests/test_cross_model_sweep.py: the planted pair's verdicts differ by more than their spread
N_PROMPTS, PER_SHARD, N_RANDOM = 10, 5, 3
HEAD_DIM = 8


def _settings(root) -> list[str]:
    heads = ", ".join(f"L{layer} H{head}" for layer, head in TARGET)
    return [f"model.path=[{root / 'a'}, {root / 'a_copy'}, {root / 'b'}]", "model.device=cpu", "model.dtype=float32",
            f"prompts.n={N_PROMPTS}", f"ablation.target_heads={heads}", f"ablation.random_controls={N_RANDOM}",
            "ablation.kind=[zero, cross]", "ablation.source_model=a", "ray.workers=0", "stats.n_boot=100",
            f"shards.prompts_per_shard={PER_SHARD}"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmap")
    a = build_seed_shaped_model(root / "a", n_layers=4, n_heads=4, n_kv_heads=2, head_dim=HEAD_DIM,
                                n_ranks=PLUMBING_RANKS)
    shutil.copytree(a, root / "a_copy")
    copy_with_scaled_queries(a, root / "b", TARGET, SCALE)
    report = run_sweep(load_config(None, [*_settings(root), "wandb.mode=disabled"], str(root / "OUT")))
    out = OutDir(root / "OUT")
    return root, report, out, out.read_results()


def _ld(results: pl.DataFrame, model: str, condition: str) -> np.ndarray:
    rows = results.filter((pl.col("model") == model) & (pl.col("condition") == condition)).sort("prompt_id")
    assert rows.height == N_PROMPTS, (model, condition)
    return rows["log_odds"].to_numpy()


def _cross_conditions(out: OutDir) -> pl.DataFrame:
    return pl.read_parquet(out.conditions).filter(pl.col("intervention") == "cross")


def test_identical_models_cmap_changes_nothing(swept):
    """a_copy has a's weights: a's activations are its own, copied bit for bit, so every cross row is its
    baseline exactly; the source scores no cross row."""
    _, _, out, results = swept
    cross = _cross_conditions(out)["condition"].to_list()
    assert cross == ["target@cross"] + [f"random-{i:03d}@cross" for i in range(N_RANDOM)]
    base = _ld(results, "a_copy", "baseline")
    assert np.array_equal(base, _ld(results, "a", "baseline"))
    for c in cross:
        assert np.array_equal(_ld(results, "a_copy", c), base), c
    assert results.filter((pl.col("model") == "a") & pl.col("condition").str.ends_with("@cross")).height == 0
    cmap = pl.read_parquet(out.stats / "cmap.parquet").filter(pl.col("model") == "a_copy")
    assert (cmap["n_prompts"] == 0).all() and (cmap["n_left_out"] == N_PROMPTS).all()  # no gap to close


@pytest.fixture(scope="module")
def loaded(swept):
    root = swept[0]
    return {m: load_model(str(root / m), dtype="float32", device="cpu") for m in ("a", "b")}


def test_planted_pair_target_gives_the_source_log_odds(swept, loaded, rounding):
    """b's target patched from a: every head of b then computes what a's does (the non-target heads read
    the same residual with the same weights, the target's slices are a's), so b's forward is a's to float32
    rounding; gap_closed is 1 within that rounding over the gap, and random sets disjoint from the target
    close measurably less. Every cross row equals hooks copying a's o_proj input slices into b's forward."""
    _, _, out, results = swept
    tol = ScoreTol.between_forwards(max(rounding(loaded["a"]), rounding(loaded["b"])))
    ld_a, ld_b = _ld(results, "a", "baseline"), _ld(results, "b", "baseline")
    # the issue's figure (1e-4 of log-odds) and the bound derived from these models' rounding (6 x their
    # measured logit error, ~4e-4 here: their weights are drawn wide so that heads matter)
    np.testing.assert_allclose(_ld(results, "b", "target@cross"), ld_a, rtol=0, atol=min(1e-4, tol.log))
    assert (np.abs(ld_a - ld_b) > 100 * tol.log).all()  # the planted difference is far above the rounding

    cross = _cross_conditions(out)
    abls = [Ablation(tuple(parse_heads(h)), (), "cross") for h in cross["heads"]]
    prompts = pl.read_parquet(out.prompts)["prompt"].to_list()
    tok = loaded["b"].tokenizer
    toks = [tok.encode(p, add_special_tokens=False) for p in prompts]
    want = reference_table(loaded["b"], resolve_yes_no(tok), toks, abls, source_model=loaded["a"].model)
    for j, c in enumerate(cross["condition"]):
        np.testing.assert_allclose(_ld(results, "b", c), want.log_odds[:, j], rtol=0, atol=tol.log, err_msg=c)

    cmap = {r["condition"]: r for r in pl.read_parquet(out.stats / "cmap.parquet")
            .filter((pl.col("source") == "a") & (pl.col("model") == "b")).iter_rows(named=True)}
    target = cmap["target@cross"]
    kept = int((np.abs(ld_a - ld_b) >= MIN_GAP).sum())
    assert (target["n_prompts"], target["n_left_out"]) == (kept, N_PROMPTS - kept) and kept >= 5
    # |gap_closed - 1| = |LD_patched - LD_a| / |gap| <= tol.log / MIN_GAP on every kept prompt
    bound = tol.log / MIN_GAP
    assert abs(target["gap_closed"] - 1) <= bound and target["gap_closed_lo"] >= 1 - bound
    randoms = [r["gap_closed"] for c, r in cmap.items() if c.startswith("random-")]
    assert len(randoms) == N_RANDOM and max(randoms) < 1 - 0.1, randoms
    vs = pl.read_parquet(out.stats / "cmap_vs_controls.parquet").filter(pl.col("model") == "b").row(0, named=True)
    assert (vs["source"], vs["intervention"], vs["target_condition"]) == ("a", "cross", "target@cross")
    assert vs["n_controls"] == N_RANDOM and vs["p_greater"] == 1 / (N_RANDOM + 1)  # above every random set


def test_cache_size_report_and_wandb_keys(swept):
    """The cache holds positions x touched columns x 4 bytes (float32); the report says where and how much; the
    W&B keys of CMAP are under cross/<source>__<receiver>/cmap/ (`jobs.tracking.cmap_logs`, which log_sweep
    calls; the run itself is tested in test_cross_model_sweep.py) and the same-mechanism figure has its panel."""
    _, report, out, _ = swept
    manifest = json.loads(out.manifest.read_text())
    entry = manifest["cross"]["a"]
    touched = {h for c in _cross_conditions(out)["heads"] for h in parse_heads(c)}
    t = AutoTokenizer.from_pretrained(str(swept[0] / "a"))
    positions = sum(len(t.encode(p, add_special_tokens=False)) for p in pl.read_parquet(out.prompts)["prompt"])
    assert entry["bytes"] == positions * len(touched) * HEAD_DIM * 4
    assert cache_path(out, "a").is_file() and entry["receivers"] == ["a_copy", "b"]
    lines = "\n".join(report.lines())
    assert f"cache:    {out.cross_cache}/ (the cross source's activations on every prompt: " in lines
    assert "  a__b: CMAP of the target from a into b: gap_closed +1.000" in lines
    assert f"cmap:     {out.stats / 'cmap.parquet'}, {out.stats / 'cmap_vs_controls.parquet'}" in lines
    assert report.bookkeeping()["cross_cache_bytes"] == entry["bytes"]  # W&B: sweep/cross_cache_bytes
    tables = {name: pl.read_parquet(out.stats / f"{name}.parquet") for name in ("cmap", "cmap_vs_controls")}
    metrics, items = cmap_logs(SimpleNamespace(notes=[]), tables)
    target = tables["cmap"].filter((pl.col("model") == "b") & (pl.col("kind") == "target")).row(0, named=True)
    assert metrics["cross/a__b/cmap/target/gap_closed"] == target["gap_closed"]
    assert metrics["cross/a__b/cmap/vs_controls/p_greater"] == 1 / (N_RANDOM + 1)
    assert metrics["cross/a__a_copy/cmap/target/n_left_out"] == N_PROMPTS
    assert set(items) == {"cross/a__a_copy/tables/cmap", "cross/a__b/tables/cmap"}
    assert (out.cross_figures / "a__b__same_mechanism.png").is_file()


def test_resume_recomputes_a_cache_that_does_not_verify(swept, tmp_path):
    """A damaged cache file fails its SHA-256: --resume recomputes it from the source (the same bytes) before the
    receiver's missing shard, whose rows come back the same."""
    root, _, out, results = swept
    copy = OutDir(tmp_path / "OUT")
    shutil.copytree(out.root, copy.root)
    path = cache_path(copy, "a")
    path.write_bytes(b"\0" * path.stat().st_size)
    shard = next(s for s, e in json.loads(copy.manifest.read_text())["shards"].items() if e["model"] == "b")
    next(copy.results.glob(f"{shard}*")).unlink()
    report = run_sweep(load_config(None, [*_settings(root), "wandb.mode=disabled"], str(copy.root)), resume=True)
    assert report.shards_run == 1
    assert json.loads(copy.manifest.read_text())["cross"]["a"]["sha256"] == \
        json.loads(out.manifest.read_text())["cross"]["a"]["sha256"]
    key = ["model", "prompt_id", "condition"]
    assert copy.read_results().sort(key).equals(results.sort(key))
