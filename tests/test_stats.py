"""Statistics on constructed data with known answers (verif/stats.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from verif.analysis import stats

ERROR_KINDS = ("arithmetic_slip", "false_claim", "wrong_target")


def make_prompts(n: int = 40) -> pl.DataFrame:
    """Even prompt ids are correct attempts; odd ones cycle through ERROR_KINDS."""
    kinds = ["none" if i % 2 == 0 else ERROR_KINDS[(i // 2) % len(ERROR_KINDS)] for i in range(n)]
    return pl.DataFrame(
        {
            "prompt_id": pl.Series(range(n), dtype=pl.Int64),
            "numbers": [[79, 17, 60]] * n,
            "target": pl.Series([36] * n, dtype=pl.Int64),
            "attempt": ["79 - 60 + 17 = 36"] * n,
            "label": [k == "none" for k in kinds],
            "error_kind": kinds,
            "prompt": ["..."] * n,
        }
    )


def rows_for(model: str, condition: str, p_yes_norm: np.ndarray) -> list[dict]:
    """Result rows with consistent p_yes / p_no / log_odds for the given normalised P(Yes)."""
    out = []
    for i, p in enumerate(p_yes_norm):
        p = float(p)
        py, pn = 0.8 * p, 0.8 * (1 - p)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = float(np.log(py) - np.log(pn)) if np.isfinite(p) else float("nan")
        out.append(dict(model=model, prompt_id=i, condition=condition, p_yes=py, p_no=pn, p_yes_norm=p, log_odds=lo))
    return out


def make_conditions(n_random: int = 19) -> pl.DataFrame:
    names = ["baseline", "target"] + [f"random-{i:03d}" for i in range(n_random)]
    kinds = ["baseline", "target"] + ["random"] * n_random
    return pl.DataFrame(
        {
            "condition": names,
            "kind": kinds,
            "heads": ["", "L3 H13, L4 H5"] + ["L1 H1, L2 H2"] * n_random,
            "n_heads": pl.Series([0, 2] + [2] * n_random, dtype=pl.Int64),
            "layer": pl.Series([None] * len(names), dtype=pl.Int64),
            "head": pl.Series([None] * len(names), dtype=pl.Int64),
        }
    )


def make_results(
    prompts: pl.DataFrame,
    shift_correct: float = -0.2,
    shift_incorrect: float = -0.2,
    n_random: int = 19,
    control_noise: float = 0.0,
    model: str = "m",
    seed: int = 0,
) -> pl.DataFrame:
    """Baseline in (0.3, 0.7); target shifts correct/incorrect by the given amounts; random sets
    shift everything by a per-set constant drawn from N(0, control_noise)."""
    rng = np.random.default_rng(seed)
    n = prompts.height
    label = prompts["label"].to_numpy()
    base = rng.uniform(0.3, 0.7, n)
    rows = rows_for(model, "baseline", base)
    rows += rows_for(model, "target", base + np.where(label, shift_correct, shift_incorrect))
    for i in range(n_random):
        rows += rows_for(model, f"random-{i:03d}", base + rng.normal(0, control_noise) if control_noise else base.copy())
    return pl.DataFrame(rows)


@pytest.fixture()
def data():
    prompts = make_prompts(40)
    return prompts, make_results(prompts), make_conditions()


# ---------------------------------------------------------------- target vs controls


def test_planted_target_among_null_controls_gets_minimum_p(data):
    prompts, results, conditions = data
    s = stats.summarize(results, prompts, conditions)
    t = stats.target_vs_controls(s, "delta_correct")
    assert t.height == 1
    r = t.row(0, named=True)
    assert r["n_controls"] == 19
    assert r["p_empirical"] == 1 / 20  # exactly 1/(19+1)
    assert r["p_less"] == 1 / 20
    assert r["p_greater"] == 1.0
    assert r["rank"] == 1
    # float64 means of 20-40 values of size <= 1: a sum of n terms is off by <= gamma(n) * sum|terms| ~ n^2 u
    # = 1.8e-13 for n = 40 (rigorous, any order); the planted shifts (b + s) - b add <= u each.
    assert r["target_effect"] == pytest.approx(-0.2, abs=1e-12)
    assert r["control_mean"] == 0.0  # every control equals the baseline: x - x is exactly 0
    assert r["z"] is None  # controls have zero spread: no z


def test_z_with_noisy_controls():
    prompts = make_prompts(30)
    results = make_results(prompts, control_noise=0.01, seed=3)
    s = stats.summarize(results, prompts, make_conditions())
    r = stats.target_vs_controls(s, "delta_correct").row(0, named=True)
    ctrl = s.filter(pl.col("kind") == "random")["delta_correct"].to_numpy()
    assert r["p_empirical"] == 1 / 20  # one correctly rounded division of integers: exact
    # numpy's std of the same 19 values, maybe in another order: a few roundings of well-conditioned sums
    # (spread 0.01 about a mean near 0), ~gamma(19) = 2e-15 relative; z adds a subtraction and a division.
    assert r["control_std"] == pytest.approx(ctrl.std(ddof=1), rel=1e-12, abs=0)
    assert r["z"] == pytest.approx((r["target_effect"] - ctrl.mean()) / ctrl.std(ddof=1), rel=1e-12, abs=0)
    assert r["z"] < -5


def test_empirical_p_counts_controls_at_least_as_extreme():
    # 9 controls; |effect| >= 0.5 for four of them (two on each side, one tie) -> p = (1+4)/10
    controls = [0.0, 0.1, -0.2, 0.6, -0.7, 0.5, -0.55, 0.3, 0.4]
    summ = pl.DataFrame(
        {
            "model": ["m"] * 10,
            "condition": ["target"] + [f"random-{i}" for i in range(9)],
            "kind": ["target"] + ["random"] * 9,
            "delta_correct": [-0.5] + controls,
        }
    )
    r = stats.target_vs_controls(summ, "delta_correct").row(0, named=True)
    # counts over n + 1: one correctly rounded division of integers, exact
    assert r["p_empirical"] == 5 / 10
    assert r["p_less"] == (1 + 2) / 10  # -0.7, -0.55 <= -0.5
    assert r["p_greater"] == (1 + 7) / 10  # all but -0.7, -0.55 are >= -0.5
    assert r["rank"] == 1 + 3  # 0.6, -0.7, -0.55 strictly larger in |.|


def test_target_vs_controls_many_metrics_and_errors(data):
    prompts, results, conditions = data
    s = stats.summarize(results, prompts, conditions)
    long = stats.target_vs_controls(s, list(stats.DEFAULT_CONTROL_METRICS))
    assert long["metric"].to_list() == list(stats.DEFAULT_CONTROL_METRICS)
    assert set(long.columns) >= {"target_effect", "control_mean", "control_std", "n_controls", "z", "p_empirical", "rank"}
    with pytest.raises(ValueError, match="random"):
        stats.target_vs_controls(s.filter(pl.col("kind") != "random"))
    with pytest.raises(ValueError, match="target"):
        stats.target_vs_controls(s.filter(pl.col("kind") != "target"))


# ---------------------------------------------------------------- paired change and bootstrap


def test_identical_condition_gives_zero_change_and_degenerate_ci(data):
    prompts, results, _ = data
    pc = stats.paired_change(results, prompts, "random-000", n_boot=500, seed=1)
    assert pc["label"].to_list() == ["correct", "incorrect", "all"]
    assert pc["n"].to_list() == [20, 20, 40]
    for r in pc.iter_rows(named=True):
        assert r["mean_change"] == 0.0
        # every change is exactly 0 (x - x), so is every resampled mean and both quantiles
        assert r["ci_low"] == r["ci_high"] == 0.0


def test_known_shift_gives_that_mean_change():
    prompts = make_prompts(40)
    results = make_results(prompts, shift_correct=-0.25, shift_incorrect=0.1)
    pc = stats.paired_change(results, prompts, "target", n_boot=300)
    got = {r["label"]: r for r in pc.iter_rows(named=True)}
    # means of <= 40 float64 differences (b + s) - b: <= n^2 u + u = 1.8e-13 (see above)
    assert got["correct"]["mean_change"] == pytest.approx(-0.25, abs=1e-12)
    assert got["incorrect"]["mean_change"] == pytest.approx(0.1, abs=1e-12)
    assert got["all"]["mean_change"] == pytest.approx((-0.25 + 0.1) / 2, abs=1e-12)
    assert got["correct"]["ci_low"] <= -0.25 <= got["correct"]["ci_high"]
    s = stats.summarize(results, prompts, make_conditions())
    t = s.filter(pl.col("condition") == "target").row(0, named=True)
    assert t["delta_correct"] == pytest.approx(-0.25, abs=1e-12)
    assert t["delta_incorrect"] == pytest.approx(0.1, abs=1e-12)
    # p_no_norm metric is the mirror image
    pcn = stats.paired_change(results, prompts, "target", metric="p_no_norm", n_boot=100)
    assert pcn.filter(pl.col("label") == "correct")["mean_change"][0] == pytest.approx(0.25, abs=1e-12)


def test_bootstrap_ci_is_seeded_and_sensible():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)
    m1, lo1, hi1 = stats.bootstrap_mean_ci(x, n_boot=2000, seed=7)
    m2, lo2, hi2 = stats.bootstrap_mean_ci(x, n_boot=2000, seed=7)
    _, lo3, hi3 = stats.bootstrap_mean_ci(x, n_boot=2000, seed=8)
    assert (m1, lo1, hi1) == (m2, lo2, hi2)
    assert (lo1, hi1) != (lo3, hi3)
    assert lo1 < m1 < hi1
    se = x.std(ddof=1) / math.sqrt(x.size)
    # percentile CI ~ normal CI for normal data; with 2000 resamples the 2.5%/97.5% quantiles scatter by
    # ~2% of the width (sqrt(p(1-p)/B) / density), so 15% is ~7 standard deviations (and the seed is fixed).
    assert (hi1 - lo1) == pytest.approx(2 * 1.96 * se, rel=0.15)
    # large n is resampled in chunks; the result equals the one-shot computation of the same stream
    big = rng.normal(size=5000)
    _, lo, hi = stats.bootstrap_mean_ci(big, n_boot=1000, seed=3)
    idx = np.random.default_rng(3).integers(0, big.size, size=(1000, big.size))
    # the same resampled means summed in other chunks: a mean of 5000 values of size ~1 is off by
    # <= gamma(5000) * mean|x| = 4.4e-13 (rigorous, any order)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(big[idx].mean(axis=1), [0.025, 0.975])), abs=1e-12)
    nan = stats.bootstrap_mean_ci([], n_boot=10)
    assert all(math.isnan(v) for v in nan)


def test_paired_change_deterministic_from_seed():
    prompts = make_prompts(30)
    rng = np.random.default_rng(5)
    base = rng.uniform(0.2, 0.8, 30)
    results = pl.DataFrame(rows_for("m", "baseline", base) + rows_for("m", "x", np.clip(base + rng.normal(-0.1, 0.1, 30), 0, 1)))
    a = stats.paired_change(results, prompts, "x", n_boot=1000, seed=11)
    b = stats.paired_change(results, prompts, "x", n_boot=1000, seed=11)
    c = stats.paired_change(results, prompts, "x", n_boot=1000, seed=12)
    assert a.equals(b)
    assert not a.equals(c)
    assert (a["ci_low"] < a["mean_change"]).all() and (a["mean_change"] < a["ci_high"]).all()


def test_paired_change_errors(data):
    prompts, results, _ = data
    with pytest.raises(ValueError, match="nope"):
        stats.paired_change(results, prompts, "nope")
    with pytest.raises(ValueError, match="metric"):
        stats.paired_change(results, prompts, "target", metric="bogus")


# ---------------------------------------------------------------- AUROC


def brute_auroc(s, y):
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_summary_auroc_matches_bruteforce_and_edge_cases():
    prompts = make_prompts(40)
    label = prompts["label"].to_numpy()
    rng = np.random.default_rng(4)
    noisy = np.round(rng.uniform(0, 1, 40) * 4) / 4 + 0.05  # ties within and across classes
    rows = (
        rows_for("m", "baseline", np.where(label, 0.9, 0.1))  # perfectly separated
        + rows_for("m", "rev", np.where(label, 0.1, 0.9))  # reversed
        + rows_for("m", "tie", np.full(40, 0.5))  # all tied
        + rows_for("m", "noisy", np.clip(noisy, 0.01, 0.99))
    )
    s = stats.summarize(pl.DataFrame(rows), prompts, None)
    au = dict(zip(s["condition"], s["auroc"]))
    assert au["baseline"] == 1.0
    assert au["rev"] == 0.0
    assert au["tie"] == 0.5
    assert au["noisy"] == pytest.approx(brute_auroc(np.clip(noisy, 0.01, 0.99), label), abs=1e-12)
    dau = dict(zip(s["condition"], s["delta_auroc"]))
    assert dau["rev"] == -1.0 and dau["baseline"] == 0.0
    # only correct attempts: AUROC undefined -> null, not 0.5
    only = make_prompts(40).with_columns(pl.lit(True).alias("label"))
    s2 = stats.summarize(pl.DataFrame(rows), only, None)
    assert s2["auroc"].null_count() == s2.height
    assert (s2["n_incorrect"] == 0).all()


# ---------------------------------------------------------------- non-finite rows


def test_nonfinite_rows_excluded_and_counted(data):
    prompts, results, conditions = data
    # target: NaN p_yes_norm on prompts 0 (correct) and 1 (incorrect), inf log_odds on prompt 2 (correct)
    results = results.with_columns(
        pl.when((pl.col("condition") == "target") & pl.col("prompt_id").is_in([0, 1]))
        .then(float("nan"))
        .otherwise(pl.col("p_yes_norm"))
        .alias("p_yes_norm"),
        pl.when((pl.col("condition") == "target") & (pl.col("prompt_id") == 2))
        .then(float("inf"))
        .otherwise(pl.col("log_odds"))
        .alias("log_odds"),
    )
    s = stats.summarize(results, prompts, conditions)
    t = s.filter(pl.col("condition") == "target").row(0, named=True)
    assert t["n_nonfinite"] == 3
    assert t["n_correct"] == 18 and t["n_incorrect"] == 19
    for c in ("mean_p_yes_norm_correct", "delta_correct", "mean_log_odds_correct", "auroc", "delta_log_odds_correct"):
        assert math.isfinite(t[c]), c
    assert t["delta_correct"] == pytest.approx(-0.2, abs=1e-12)
    ok = results.filter((pl.col("condition") == "target") & ~pl.col("prompt_id").is_in([0, 1, 2]))
    ok = ok.join(prompts.select("prompt_id", "label"), on="prompt_id").filter(pl.col("label"))
    assert t["mean_p_yes_norm_correct"] == pytest.approx(ok["p_yes_norm"].mean(), abs=1e-12)
    assert s.filter(pl.col("condition") == "baseline")["n_nonfinite"][0] == 0
    pc = stats.paired_change(results, prompts, "target", n_boot=100)
    assert pc.filter(pl.col("label") == "all").row(0, named=True)["n"] == 37
    assert pc.filter(pl.col("label") == "all").row(0, named=True)["n_dropped"] == 3


def test_nonfinite_baseline_drops_the_pair_everywhere(data):
    prompts, results, conditions = data
    results = results.with_columns(
        pl.when((pl.col("condition") == "baseline") & (pl.col("prompt_id") == 4))
        .then(None)
        .otherwise(pl.col("p_yes"))
        .alias("p_yes")
    )
    s = stats.summarize(results, prompts, conditions)
    b = s.filter(pl.col("condition") == "baseline").row(0, named=True)
    t = s.filter(pl.col("condition") == "target").row(0, named=True)
    assert b["n_nonfinite"] == 1 and b["n_correct"] == 19
    assert t["n_nonfinite"] == 0 and t["n_correct"] == 20  # level counts its own rows
    assert t["delta_correct"] == pytest.approx(-0.2, abs=1e-12)  # the unpaired prompt is skipped


# ---------------------------------------------------------------- summary shape / by error kind / errors


def test_summary_columns_and_metadata(data):
    prompts, results, conditions = data
    s = stats.summarize(results, prompts, conditions)
    need = [
        "model", "condition", "kind", "n_heads", "n_correct", "n_incorrect", "n_nonfinite",
        "mean_p_yes_norm_correct", "mean_p_yes_norm_incorrect", "mean_p_no_norm_correct",
        "mean_p_no_norm_incorrect", "delta_correct", "delta_incorrect", "mean_log_odds_correct",
        "mean_log_odds_incorrect", "auroc", "delta_auroc",
    ]  # fmt: skip
    assert all(c in s.columns for c in need)
    assert s.height == 21
    assert s["condition"][0] == "baseline" and s["condition"][1] == "target"
    b = s.row(0, named=True)
    assert b["delta_correct"] == 0.0 and b["delta_incorrect"] == 0.0 and b["delta_auroc"] == 0.0
    t = s.row(1, named=True)
    assert t["kind"] == "target" and t["n_heads"] == 2
    # mean(1 - p) vs 1 - mean(p) over 20 values <= 1: each side off by <= gamma(20) * 20 + u = 4.6e-14
    assert t["mean_p_no_norm_correct"] == pytest.approx(1 - t["mean_p_yes_norm_correct"], abs=1e-12)
    assert s.schema["delta_correct"] == pl.Float64 and s.schema["auroc"] == pl.Float64


def test_two_models_are_kept_apart():
    prompts = make_prompts(20)
    r = pl.concat([make_results(prompts, -0.2, -0.2, model="a"), make_results(prompts, 0.1, 0.1, model="b", seed=9)])
    s = stats.summarize(r, prompts, make_conditions())
    d = {m: s.filter((pl.col("model") == m) & (pl.col("kind") == "target"))["delta_correct"][0] for m in ("a", "b")}
    assert d["a"] == pytest.approx(-0.2, abs=1e-12) and d["b"] == pytest.approx(0.1, abs=1e-12)  # as above
    assert stats.target_vs_controls(s)["model"].to_list() == ["a", "b"]


def test_by_error_kind_groups_correctly():
    prompts = make_prompts(36)
    kinds = prompts["error_kind"].to_numpy()
    shift = {"none": -0.1, "arithmetic_slip": -0.3, "false_claim": 0.05, "wrong_target": 0.0}
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.6, 36)
    results = pl.DataFrame(rows_for("m", "baseline", base) + rows_for("m", "target", base + np.array([shift[k] for k in kinds])))
    bek = stats.by_error_kind(results, prompts)
    t = bek.filter(pl.col("condition") == "target")
    assert sorted(t["error_kind"].to_list()) == sorted(shift)
    for r in t.iter_rows(named=True):
        k = r["error_kind"]
        assert r["n"] == int((kinds == k).sum())
        assert r["label"] == (k == "none")
        assert r["mean_delta_p_yes_norm"] == pytest.approx(shift[k], abs=1e-12)  # means of <= 36 values, as above
        assert r["mean_p_yes_norm"] == pytest.approx((base[kinds == k] + shift[k]).mean(), abs=1e-12)
    assert (bek.filter(pl.col("condition") == "baseline")["mean_delta_p_yes_norm"] == 0).all()
    assert bek.height == 8


def test_missing_baseline_or_unknown_prompts_are_errors(data):
    prompts, results, conditions = data
    with pytest.raises(ValueError, match="baseline"):
        stats.summarize(results.filter(pl.col("condition") != "baseline"), prompts, conditions)
    with pytest.raises(ValueError, match="absent from prompts"):
        stats.summarize(results, prompts.filter(pl.col("prompt_id") > 3), conditions)


def test_summary_roundtrips_through_parquet(data, tmp_path):
    prompts, results, conditions = data
    s = stats.summarize(results, prompts, conditions)
    s.write_parquet(tmp_path / "summary.parquet")
    assert pl.read_parquet(tmp_path / "summary.parquet").equals(s)
    assert all(dt != pl.Null for dt in s.schema.values())
