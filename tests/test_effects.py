"""Per-condition effects with bootstrap intervals (verif/analysis/effects.py).

Point estimates are checked against `stats.summarize` (a different computation: polars group-bys and
rank-based AUROC); the intervals against a brute-force reference written here: the same resamples as
explicit index arrays, means of the drawn pairs, and AUROC by comparing every drawn (correct, incorrect)
pair one by one.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tests.tolerances import U64, gamma
from verif.analysis import stats
from verif.analysis.effects import EFFECT_METRICS, condition_effects
from verif.analysis.stats import group_seed

N_PROMPTS, N_BOOT = 11, 40
CONDITIONS = ("baseline", "target", "random-000", "head-L00H01")


def _frames(seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Two models; ties in p_yes_norm (rounded to 0.1), a NaN row and an infinite log-odds row."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("a", "b/c"):
        for cond in CONDITIONS:
            for i in range(N_PROMPTS):
                p = float(np.round(rng.uniform(0.05, 0.95), 1))
                rows.append((model, i, cond, p, float(np.log(p / (1 - p)))))
    results = pl.DataFrame(rows, schema=["model", "prompt_id", "condition", "p_yes_norm", "log_odds"], orient="row")
    results = results.with_columns(
        pl.when((pl.col("model") == "a") & (pl.col("condition") == "target") & (pl.col("prompt_id") == 2))
        .then(float("nan")).otherwise(pl.col("p_yes_norm")).alias("p_yes_norm"),
        pl.when((pl.col("model") == "b/c") & (pl.col("condition") == "baseline") & (pl.col("prompt_id") == 0))
        .then(float("inf")).otherwise(pl.col("log_odds")).alias("log_odds"),
    )
    prompts = pl.DataFrame({"prompt_id": list(range(N_PROMPTS)), "label": [i % 3 != 0 for i in range(N_PROMPTS)]})
    conditions = pl.DataFrame({"condition": list(CONDITIONS), "kind": ["baseline", "target", "random", "single_head"],
                               "layer": [None, None, None, 0], "head": [None, None, None, 1],
                               "intervention": ["zero"] * len(CONDITIONS)},
                              schema_overrides={"layer": pl.Int64, "head": pl.Int64})
    return results, prompts, conditions


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not pos.size or not neg.size:
        return float("nan")
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]))


def _reference(results, prompts, model: str, n_boot: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{condition: {metric: resampled values}}, drawing the resamples the way the module documents."""
    lab = stats.labelled(results, prompts).filter(pl.col("model") == model).sort("prompt_id")
    label = prompts.sort("prompt_id")["label"].to_numpy()
    pos, neg = np.flatnonzero(label), np.flatnonzero(~label)

    def arrays(cond):
        part = lab.filter(pl.col("condition") == cond).sort("prompt_id")
        return part["p_yes_norm"].to_numpy(), part["_finite"].to_numpy()

    base_s, base_f = arrays("baseline")
    rng = np.random.default_rng(group_seed(seed, model, "condition_effects"))  # all resamples in one chunk
    picks_pos = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    picks_neg = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    out = {}
    for cond in CONDITIONS:
        s, f = arrays(cond)
        got = {k: np.empty(n_boot) for k in EFFECT_METRICS}
        for b in range(n_boot):
            drawn = np.concatenate([picks_pos[b], picks_neg[b]])
            for name, side in (("delta_correct", picks_pos[b]), ("delta_incorrect", picks_neg[b])):
                ok = [i for i in side if f[i] and base_f[i]]
                got[name][b] = np.mean([s[i] - base_s[i] for i in ok]) if ok else np.nan

            def au(score, fin):
                return _auroc(np.array([score[i] for i in drawn if label[i] and fin[i]]),
                              np.array([score[i] for i in drawn if not label[i] and fin[i]]))

            got["delta_auroc"][b] = au(s, f) - au(base_s, base_f)
        out[cond] = got
    return out


def test_points_equal_the_summary_and_intervals_the_brute_force_reference():
    results, prompts, conditions = _frames()
    effects = condition_effects(results, prompts, conditions, n_boot=N_BOOT, seed=3)
    summary = stats.summarize(results, prompts, conditions)
    assert effects.height == summary.height == 2 * len(CONDITIONS)
    assert effects["intervention"].to_list() == ["zero"] * effects.height  # conditions' columns come along
    joined = effects.join(summary, on=["model", "condition"], suffix="_summary")
    # Sums of at most N_PROMPTS^2 terms of size <= 1 (pairs of AUROC), in another order than the reference's.
    tol = 4 * gamma(N_PROMPTS**2, U64)
    for metric in EFFECT_METRICS:
        got, want = joined[metric].to_numpy(), joined[f"{metric}_summary"].to_numpy()
        assert np.allclose(got, want, rtol=0, atol=tol), metric
    for model in ("a", "b/c"):
        reference = _reference(results, prompts, model, N_BOOT, 3)
        for cond in CONDITIONS:
            row = effects.filter((pl.col("model") == model) & (pl.col("condition") == cond)).row(0, named=True)
            for metric in EFFECT_METRICS:
                lo, hi = np.nanquantile(reference[cond][metric], [0.025, 0.975])
                assert row[f"{metric}_lo"] == pytest.approx(lo, abs=tol), (model, cond, metric)
                assert row[f"{metric}_hi"] == pytest.approx(hi, abs=tol), (model, cond, metric)
    base = effects.filter(pl.col("condition") == "baseline")
    assert (base["delta_correct"] == 0).all() and (base["delta_auroc_hi"] == 0).all()  # baseline vs itself


def test_finite_pairs_are_counted():
    results, prompts, conditions = _frames()
    effects = condition_effects(results, prompts, conditions, n_boot=10)
    n_pos = int(prompts["label"].sum())
    row = effects.filter((pl.col("model") == "a") & (pl.col("condition") == "target")).row(0, named=True)
    assert (row["n_pairs_correct"], row["n_pairs_incorrect"]) == (n_pos - 1, N_PROMPTS - n_pos)  # prompt 2: NaN
    lost = effects.filter(pl.col("model") == "b/c")  # its baseline row of prompt 0 (incorrect) is infinite
    assert lost["n_pairs_incorrect"].to_list() == [N_PROMPTS - n_pos - 1] * len(CONDITIONS)


def test_a_condition_s_interval_does_not_depend_on_the_others():
    results, prompts, conditions = _frames()
    full = condition_effects(results, prompts, conditions, n_boot=N_BOOT)
    fewer = condition_effects(results.filter(pl.col("condition") != "random-000"), prompts, conditions, n_boot=N_BOOT)
    key = ["model", "condition"]
    assert full.join(fewer.select(key), on=key).equals(fewer)


def test_one_label_missing_gives_null_auroc():
    results, prompts, conditions = _frames()
    prompts = prompts.with_columns(pl.lit(True).alias("label"))
    effects = condition_effects(results, prompts, conditions, n_boot=10)
    assert effects["delta_auroc"].null_count() == effects.height
    assert effects["delta_incorrect_lo"].null_count() == effects.height
    assert effects["delta_correct"].null_count() == 0


def test_no_baseline_is_an_error():
    results, prompts, conditions = _frames()
    with pytest.raises(ValueError, match="no baseline condition"):
        condition_effects(results.filter(pl.col("condition") != "baseline"), prompts, conditions)
