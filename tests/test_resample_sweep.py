"""A resample sweep end to end: generated counterfactual pairs, partners scored in other shards, the resample
rows against hooks one prompt at a time, and the patching metric (`recovered`) in OUT/stats and W&B.

One in-process sweep on the plumbing model (`sweep_model`): 3 generated pairs (6 prompts), the small sweep's
3-head target and 2 random sets under zero and resample, one prompt per shard (so no prompt's partner is in
its shard).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from jobs.finalize import RECOVERED_METRICS
from jobs.runtime.storage import OutDir
from jobs.sweep import run_sweep
from jobs.tracking import patching_metrics
from tests.support.interventions import reference_table
from tests.support.sweeps import sweep_cfg
from tests.tolerances import ScoreTol
from verif.analysis.patching import MIN_GAP
from verif.design.conditions import Ablation
from verif.design.heads import parse_heads
from verif.model.score import resolve_yes_no

SETTINGS = ("ray.workers=0", "prompts.pairs=true", "prompts.n=3", "ablation.kind=[zero, resample]")


@pytest.fixture(scope="module")
def resample_sweep(sweep_model_dir, tmp_path_factory):
    """(results, OUT, tables read back) of the sweep."""
    out = OutDir(tmp_path_factory.mktemp("resample") / "OUT")
    report = run_sweep(sweep_cfg(sweep_model_dir, out.root, *SETTINGS))
    assert report.shards_run == 6  # one prompt each: every partner is scored in another shard
    tables = {name: pl.read_parquet(out.stats / f"{name}.parquet")
              for name in ("patching", "patching_pairs", "patching_vs_controls")}
    return out.read_results(), out, tables


def test_resample_rows_equal_hooks_one_prompt_at_a_time(resample_sweep, sweep_model, rounding):
    """Each resample condition's rows: the set's activations of the partner's unablated forward, copied in by
    hooks on the model's own modules (tests.support.interventions), one prompt and condition per forward."""
    results, out, _ = resample_sweep
    prompts = pl.read_parquet(out.prompts)
    conditions = pl.read_parquet(out.conditions)
    rows = {p: i for i, p in enumerate(prompts["prompt_id"])}
    pair = {}
    for pid, members in prompts.group_by("pair_id", maintain_order=True):
        a, b = members["prompt_id"].to_list()
        pair[a], pair[b] = b, a
    partners = [rows[pair[p]] for p in prompts["prompt_id"]]
    resample = conditions.filter(pl.col("intervention") == "resample")
    assert resample["condition"].to_list() == ["target@resample", "random-000@resample", "random-001@resample"]
    abls = [Ablation(tuple(parse_heads(h)), (), "resample") for h in resample["heads"]]
    tok = sweep_model.tokenizer
    toks = [tok.encode(p, add_special_tokens=False) for p in prompts["prompt"]]
    want = reference_table(sweep_model, resolve_yes_no(tok), toks, abls, partners=partners)
    tol = ScoreTol.between_forwards(rounding(sweep_model))
    base = results.filter(pl.col("condition") == "baseline").sort("prompt_id")["log_odds"].to_numpy()
    for j, cond in enumerate(resample["condition"]):
        got = results.filter(pl.col("condition") == cond).sort("prompt_id")["log_odds"].to_numpy()
        np.testing.assert_allclose(got, want.log_odds[:, j], rtol=0, atol=tol.log, err_msg=cond)
    assert (np.abs(want.log_odds[:, 0] - base) > 4 * tol.log).any()  # the target's resample moves an answer


def test_recovered_is_the_formula_on_the_results(resample_sweep):
    """stats/patching_pairs: (LD_patched - LD_self) / (LD_partner - LD_self), each LD read from results by hand;
    stats/patching: its means per side, n counted."""
    results, out, tables = resample_sweep
    prompts = pl.read_parquet(out.prompts)
    ld = {(r["prompt_id"], r["condition"]): r["log_odds"] for r in results.iter_rows(named=True)}
    partner = {}
    for _, members in prompts.group_by("pair_id"):
        a, b = members["prompt_id"].to_list()
        partner[a], partner[b] = b, a
    pairs = tables["patching_pairs"].filter(pl.col("condition") == "target@resample")
    assert pairs.height == 6 and set(pairs["side"]) == {"denoising", "noising"}
    for r in pairs.iter_rows(named=True):
        self_, other = ld[r["prompt_id"], "baseline"], ld[partner[r["prompt_id"]], "baseline"]
        assert r["partner_id"] == partner[r["prompt_id"]]
        if abs(other - self_) < MIN_GAP:
            assert r["status"] == "small_gap" and r["recovered"] is None
            continue
        want = (ld[r["prompt_id"], "target@resample"] - self_) / (other - self_)
        assert r["status"] == "ok" and r["recovered"] == pytest.approx(want, rel=1e-12)
        assert r["side"] == ("noising" if r["label"] else "denoising")
    target = tables["patching"].filter(pl.col("condition") == "target@resample").row(0, named=True)
    ok = pairs.filter(pl.col("status") == "ok")
    for side in ("denoising", "noising"):
        values = ok.filter(pl.col("side") == side)["recovered"]
        assert target[f"n_{side}"] == values.len()
        if values.len():
            assert target[f"recovered_{side}"] == pytest.approx(values.mean(), rel=1e-12)


def test_recovered_is_judged_against_random_sets_and_logged(resample_sweep):
    _, _, tables = resample_sweep
    tvc = tables["patching_vs_controls"]
    assert tvc["metric"].to_list() == list(RECOVERED_METRICS)
    assert set(tvc["intervention"]) == {"resample"} and set(tvc["target_condition"]) == {"target@resample"}
    assert set(tvc["n_controls"]) <= {0, 1, 2}  # a random set whose pairs all have small gaps has no value
    keys = patching_metrics(tables["patching"], tvc)
    model = tables["patching"]["model"][0]
    assert {f"{model}/patching/denoising/recovered", f"{model}/patching/noising/ci_low", f"{model}/patching/n_small_gap",
            f"{model}/patching_vs_controls/recovered_both/p_empirical"} <= set(keys)
