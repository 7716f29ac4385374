"""Cross-model statistics (verif/analysis/cross_model.py) on hand-made frames with known answers.

The weighted statistics are checked against the same statistic of the values written out as often as
each resample drew them (discovery's own Pearson, Spearman and a pairwise AUROC); the tables against
`stats.summarize`, hand arithmetic and a plain loop over the same resamples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from verif.analysis import cross_model as cm
from verif.analysis import stats
from verif.analysis.discovery.ranking import pearson, spearman

N_RANDOM = 19


def prompts_frame(n: int) -> pl.DataFrame:
    """Even prompt ids are correct attempts."""
    return pl.DataFrame({"prompt_id": pl.Series(range(n), dtype=pl.Int64), "label": [i % 2 == 0 for i in range(n)]})


def conditions_frame(n_random: int = N_RANDOM, heads: list[tuple[int, int]] = ()) -> pl.DataFrame:
    names = ["baseline", "target"] + [f"random-{i:03d}" for i in range(n_random)]
    names += [f"head-L{layer:02d}H{head:02d}" for layer, head in heads]
    kinds = ["baseline", "target"] + ["random"] * n_random + ["single_head"] * len(heads)
    return pl.DataFrame({
        "condition": names, "kind": kinds,
        "heads": ["", "L0 H0, L1 H1"] + ["L2 H2, L3 H3"] * n_random + [f"L{lay} H{h}" for lay, h in heads],
        "n_heads": pl.Series([0] + [2] * (1 + n_random) + [1] * len(heads), dtype=pl.Int64),
        "n_neurons": pl.Series([0] * len(names), dtype=pl.Int64),
        "layer": pl.Series([None] * (2 + n_random) + [lay for lay, _ in heads], dtype=pl.Int64),
        "head": pl.Series([None] * (2 + n_random) + [h for _, h in heads], dtype=pl.Int64),
    })


def results_frame(model: str, p: dict[str, np.ndarray]) -> pl.DataFrame:
    """Rows of one model from {condition: normalised P(Yes) per prompt}; log-odds consistent with it."""
    rows = []
    for condition, values in p.items():
        for i, v in enumerate(values):
            rows.append({"model": model, "prompt_id": i, "condition": condition, "p_yes_norm": float(v),
                         "log_odds": float(np.log(v) - np.log1p(-v))})
    return pl.DataFrame(rows)


def random_conditions(rng: np.random.Generator, n: int, conditions: pl.DataFrame, scale: float = 1.0) -> dict:
    base = rng.uniform(0.2, 0.8, n)
    p = {"baseline": base}
    for c in conditions["condition"].to_list()[1:]:
        p[c] = np.clip(base + scale * rng.normal(0, 0.05, n), 0.01, 0.99)
    return p


# ------------------------------------------------------------------ weighted statistics


def test_weighted_statistics_equal_the_values_drawn_out():
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = 0.4 * x + rng.normal(size=12)
    x[3] = x[7]  # a tie in x
    counts = cm.stratified_counts(np.array([True] * 5 + [False] * 7), 30, rng)
    assert (counts[:, :5].sum(1) == 5).all() and (counts[:, 5:].sum(1) == 7).all()
    got_p, got_s = cm.weighted_pearson(x, y, counts), cm.weighted_spearman(x, y, counts)
    for b, c in enumerate(counts.astype(int)):
        xr, yr = np.repeat(x, c), np.repeat(y, c)
        # float64 sums of 12 terms of size ~1 taken in two orders: ~1e-15 apart; 1e-12 is ample and any
        # wrong weight or rank moves a correlation of 12 values by far more.
        assert got_p[b] == pytest.approx(pearson(xr, yr), abs=1e-12)
        assert got_s[b] == pytest.approx(spearman(xr, yr), abs=1e-12)


def test_identical_values_correlate_exactly_one_and_no_spread_is_undefined():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    counts = cm.stratified_counts(np.ones(20, dtype=bool), 50, rng)
    # sxy, sxx and syy are the same sums of the same products, and sqrt(s * s) == s exactly
    assert (cm.weighted_pearson(x, x.copy(), counts) == 1.0).all()
    assert (cm.weighted_spearman(x, x.copy(), counts) == 1.0).all()
    assert np.isnan(cm.weighted_pearson(np.zeros(20), x, counts)).all()
    assert (cm.weighted_spearman(x, -x, counts) == -1.0).all()


def test_overlap_p_equals_counting_every_pair_of_sets():
    n, k_a, k_b = 9, 3, 4
    a = set(range(k_a))
    draws = [len(a & set(s)) for s in itertools.combinations(range(n), k_b)]
    for overlap in range(0, k_a + 2):
        want = sum(d >= overlap for d in draws) / len(draws)
        # one correctly rounded division of exact integers on both sides
        assert cm.overlap_p(n, k_a, k_b, overlap) == want
    row = cm.topk_overlap([0, 1, 2], [2, 1, 7, 8], n)
    assert (row["overlap"], row["expected_overlap"]) == (2, 3 * 4 / 9)
    with pytest.raises(ValueError, match="0..9"):
        cm.overlap_p(9, 10, 1, 0)


# ------------------------------------------------------------------ the cross-model table


@pytest.fixture(scope="module")
def planted():
    """Two models on 30 prompts: b's every change is a's plus 0.01 on each prompt (a planted shift)."""
    rng = np.random.default_rng(1)
    n = 30
    conditions = conditions_frame()
    pa = random_conditions(rng, n, conditions)
    pa["target"] = 0.6 * pa["baseline"]  # an effect that differs from prompt to prompt
    pb = {c: (v if c == "baseline" else v + 0.01) for c, v in pa.items()}
    results = pl.concat([results_frame("a", pa), results_frame("b", pb)])
    return results, prompts_frame(n), conditions, pa, pb


def test_effects_are_the_summary_and_hand_arithmetic(planted):
    results, prompts, conditions, pa, pb = planted
    table = cm.cross_model_table(results, prompts, conditions, ["a", "b"], n_boot=200)
    assert table.height == (len(pa) - 1) * len(cm.CROSS_METRICS)
    summary = stats.summarize(results, prompts, conditions)
    label = prompts["label"].to_numpy()
    for cond in ("target", "random-004"):
        got = {r["metric"]: r for r in table.filter(pl.col("condition") == cond).iter_rows(named=True)}
        for side, model, p in (("a", "a", pa), ("b", "b", pb)):
            s = summary.filter((pl.col("model") == model) & (pl.col("condition") == cond)).row(0, named=True)
            # means of <= 30 float64 values in another order: <= gamma(30) * sum|terms| ~ 1e-14
            for m in ("delta_correct", "delta_incorrect", "delta_auroc"):
                assert got[m][f"effect_{side}"] == pytest.approx(s[m], abs=1e-12)
            lo = np.log(p[cond]) - np.log1p(-p[cond]) - (np.log(p["baseline"]) - np.log1p(-p["baseline"]))
            assert got["delta_log_odds"][f"effect_{side}"] == pytest.approx(lo.mean(), abs=1e-12)
        # b = a + 0.01 on every prompt: a difference of 0.01 (rounding of the sums above), the per-prompt
        # effects correlate perfectly, and the counts are the prompts of each label
        for m in ("delta_correct", "delta_incorrect"):
            assert got[m]["diff"] == pytest.approx(0.01, abs=1e-12)
            assert got[m]["diff_lo"] == pytest.approx(0.01, abs=1e-12) and got[m]["diff_hi"] == pytest.approx(0.01, abs=1e-12)
            assert got[m]["pearson"] == pytest.approx(1.0, abs=1e-12) and got[m]["spearman"] == 1.0
            assert got[m]["ratio"] == pytest.approx(got[m]["effect_b"] / got[m]["effect_a"], rel=1e-15)
        assert got["delta_correct"]["n_prompts"] == label.sum() and got["delta_log_odds"]["n_prompts"] == label.size
        assert got["delta_auroc"]["pearson"] is None and got["delta_auroc"]["spearman_lo"] is None


def test_bootstrap_equals_a_plain_loop_over_the_same_resamples(planted):
    results, prompts, conditions, _, _ = planted
    n_boot, seed = 300, 5
    row = cm.cross_model_table(results, prompts, conditions, ["a", "b"], n_boot=n_boot, seed=seed).filter(
        (pl.col("condition") == "random-002") & (pl.col("metric") == "delta_auroc")).row(0, named=True)
    wide = {m: results.filter(pl.col("model") == m).pivot(on="condition", index="prompt_id", values="p_yes_norm")
            .sort("prompt_id") for m in ("a", "b")}
    label = prompts["label"].to_numpy()
    order = np.r_[np.flatnonzero(label), np.flatnonzero(~label)]  # the table's layout: correct attempts first
    # 30 prompts: the table draws all 300 resamples in one chunk, from the generator it documents
    counts = cm.stratified_counts(label[order], n_boot, np.random.default_rng(stats.group_seed(seed, "cross", "a", "b",
                                                                                             "random-002")))

    def auroc(values: np.ndarray, c: np.ndarray) -> float:
        pos, neg = np.repeat(values[label[order]], c[:15]), np.repeat(values[~label[order]], c[15:])
        return float(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))

    diffs = []
    for c in counts.astype(int):
        effect = {m: auroc(wide[m]["random-002"].to_numpy()[order], c) - auroc(wide[m]["baseline"].to_numpy()[order], c)
                  for m in ("a", "b")}
        diffs.append(effect["b"] - effect["a"])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    # AUROCs are counts of pairs over n_p * n_n: both ways give them to a few ulps
    assert row["diff_lo"] == pytest.approx(min(lo, row["diff"]), abs=1e-12)
    assert row["diff_hi"] == pytest.approx(max(hi, row["diff"]), abs=1e-12)


def test_identical_models_differ_by_exactly_nothing():
    rng = np.random.default_rng(2)
    conditions = conditions_frame(heads=[(0, 0), (0, 1), (1, 0), (1, 1)])
    p = random_conditions(rng, 24, conditions)
    results = pl.concat([results_frame("a", p), results_frame("a2", p)])
    table = cm.cross_model_table(results, prompts_frame(24), conditions, ["a", "a2"], n_boot=100)
    for c in ("diff", "diff_lo", "diff_hi"):
        assert (table[c] == 0.0).all(), c
    per_prompt = table.filter(pl.col("metric") != "delta_auroc")
    for c in ("pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo", "spearman_hi"):
        assert (per_prompt[c] == 1.0).all(), c
    maps = cm.effect_maps_table(results, prompts_frame(24), conditions, ["a", "a2"], n_boot=100)
    assert maps.height == len(cm.PER_PROMPT_METRICS) and set(maps["sweep"]) == {"single_head"}
    for c in ("spearman", "spearman_lo", "spearman_hi", "pearson"):
        assert (maps[c] == 1.0).all(), c
    # k = the target's 2 heads of 4; the same top 2: P(overlap >= 2) = 1 / C(4, 2)
    assert (maps["k"] == 2).all() and (maps["overlap"] == 2).all()
    assert (maps["p_overlap"] == 1 / math.comb(4, 2)).all()


def test_target_vs_controls_on_diff(planted):
    results, prompts, conditions, pa, pb = planted
    # b loses the target's effect entirely: its diff is the largest of all, against 19 random sets
    pb = dict(pb, target=pb["baseline"])
    results = pl.concat([results_frame("a", pa), results_frame("b", pb)])
    table = cm.cross_model_table(results, prompts, conditions, ["a", "b"], n_boot=50)
    target = table.filter(pl.col("kind") == "target")
    assert target.height == len(cm.CROSS_METRICS)
    row = target.filter(pl.col("metric") == "delta_correct").row(0, named=True)
    assert row["diff_n_controls"] == N_RANDOM and row["diff_p_empirical"] == 1 / (N_RANDOM + 1) and row["diff_rank"] == 1
    controls = table.filter(pl.col("kind") == "random").filter(pl.col("metric") == "delta_correct")
    assert row["diff_control_mean"] == pytest.approx(controls["diff"].mean(), abs=1e-15)
    assert table.filter(pl.col("kind") != "target")["diff_p_empirical"].is_null().all()


def test_non_finite_rows_leave_their_prompt_out_of_both_models(planted):
    results, prompts, conditions, _, _ = planted
    broken = results.with_columns(
        pl.when((pl.col("model") == "b") & (pl.col("prompt_id") == 4) & (pl.col("condition") == "target"))
        .then(float("nan")).otherwise(pl.col("p_yes_norm")).alias("p_yes_norm"))
    table = cm.cross_model_table(broken, prompts, conditions, ["a", "b"], n_boot=50)
    by = {(r["condition"], r["metric"]): r for r in table.iter_rows(named=True)}
    assert by["target", "delta_correct"]["n_prompts"] == 14 and by["random-000", "delta_correct"]["n_prompts"] == 15
    left = prompts.filter(pl.col("prompt_id") != 4)
    a_only = stats.summarize(results.filter(pl.col("model") == "a").join(left.select("prompt_id"), on="prompt_id"),
                             left, conditions)
    want = a_only.filter(pl.col("condition") == "target")["delta_correct"][0]
    assert by["target", "delta_correct"]["effect_a"] == pytest.approx(want, abs=1e-12)


def test_effect_maps_known_orders():
    """b's per-head effects are a's in reverse order: Spearman -1 (exact ranks), the top heads shared or not."""
    heads = [(0, h) for h in range(6)]
    conditions = conditions_frame(n_random=2, heads=heads)
    n = 10
    base = np.linspace(0.3, 0.7, n)
    shifts = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    pa = {"baseline": base, "target": base - 0.1, "random-000": base, "random-001": base}
    pb = dict(pa)
    for i, (layer, h) in enumerate(heads):
        name = f"head-L{layer:02d}H{h:02d}"
        pa[name], pb[name] = base + shifts[i], base + shifts[::-1][i]
    results = pl.concat([results_frame("a", pa), results_frame("b", pb)])
    maps = cm.effect_maps_table(results, prompts_frame(n), conditions, ["a", "b"], n_boot=40)
    row = maps.filter(pl.col("metric") == "delta_correct").row(0, named=True)
    assert row["n_components"] == 6 and row["n_prompts"] == 5
    # every resample keeps each head's effect (a constant shift per head): ranks reverse in every one
    assert row["spearman"] == row["spearman_lo"] == row["spearman_hi"] == -1.0
    # k = the target's 2 heads: a's top 2 are H5, H4, b's H0, H1
    assert (row["k"], row["overlap"], row["p_overlap"]) == (2, 0, 1.0)
    assert row["expected_overlap"] == 2 * 2 / 6


def test_errors_name_what_is_missing(planted):
    results, prompts, conditions, _, _ = planted
    with pytest.raises(ValueError, match="two or more models"):
        cm.cross_model_table(results, prompts, conditions, ["a"])
    with pytest.raises(ValueError, match="log_odds"):
        cm.cross_model_table(results.drop("log_odds"), prompts, conditions, ["a", "b"])
    assert cm.model_pairs(["x", "y", "z"]) == [("x", "y"), ("x", "z"), ("y", "z")]
    assert cm.pair_name("x", "y") == "x__y"
