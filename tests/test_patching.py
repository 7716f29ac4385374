"""The patching metric (verif.analysis.patching) on hand-made frames whose answers are known.

Log-odds are chosen as small binary fractions (gaps 4 and 2, changes in quarters), so every recovered
value below is exact in float64 and compared with ==. A second check recomputes every row of a random
frame one prompt at a time in plain Python: the same three IEEE operations in the same order, so equal
to the last bit.
"""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl
import pytest

from tests.tolerances import reorder_rel
from verif.analysis.patching import MIN_GAP, patching
from verif.analysis.stats import target_vs_controls

# Three pairs: (correct prompt, incorrect prompt). Pair 1's baseline gap (0.05) is below MIN_GAP.
PROMPTS = pl.DataFrame({"prompt_id": [0, 1, 2, 3, 4, 5], "label": [True, False] * 3, "pair_id": [0, 0, 1, 1, 2, 2]},
                       schema={"prompt_id": pl.Int64, "label": pl.Boolean, "pair_id": pl.Int64})
BASELINE = {0: 2.0, 1: -2.0, 2: 1.0, 3: 0.95, 4: 3.0, 5: 1.0}
TARGET = {0: 0.0, 1: -1.0, 2: 0.0, 3: 0.0, 4: 3.0, 5: 3.0}
# By hand, recovered = (patched - self) / (partner - self):
#   pair 0: denoising (prompt 1) (-1 + 2) / (2 + 2) = 0.25; noising (prompt 0) (0 - 2) / (-2 - 2) = 0.5
#   pair 2: denoising (prompt 5) (3 - 1) / (3 - 1) = 1.0;   noising (prompt 4) (3 - 3) / (1 - 3) = 0.0
WANT = {"denoising": [0.25, 1.0], "noising": [0.5, 0.0], "both": [0.375, 0.5]}


def _results(by_condition: dict[str, dict[int, float]], model: str = "m") -> pl.DataFrame:
    rows = [(model, pid, cond, lo) for cond, values in by_condition.items() for pid, lo in values.items()]
    return pl.DataFrame(rows, schema={"model": pl.Utf8, "prompt_id": pl.Int64, "condition": pl.Utf8,
                                      "log_odds": pl.Float64}, orient="row")


def _conditions(ids: list[str], kinds: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"condition": ids, "kind": kinds, "intervention": ["resample"] * len(ids)})


def test_recovered_per_pair_and_side_by_hand():
    got = patching(_results({"baseline": BASELINE, "target": TARGET}), PROMPTS, ["target"], n_boot=200)
    rows = {(r["pair_id"], r["side"]): r for r in got.per_pair.iter_rows(named=True)}
    assert rows[(0, "denoising")]["recovered"] == 0.25 and rows[(0, "noising")]["recovered"] == 0.5
    assert rows[(2, "denoising")]["recovered"] == 1.0 and rows[(2, "noising")]["recovered"] == 0.0
    assert rows[(0, "denoising")]["prompt_id"] == 1 and rows[(0, "denoising")]["partner_id"] == 0
    assert {rows[(1, s)]["status"] for s in ("denoising", "noising")} == {"small_gap"}
    assert rows[(1, "denoising")]["recovered"] is None  # left out, never divided by
    (s,) = got.summary.iter_rows(named=True)
    assert (s["n_pairs"], s["n_small_gap"], s["n_nonfinite"]) == (3, 1, 0)
    for side, values in WANT.items():
        assert s[f"n_{side}"] == 2 and s[f"recovered_{side}"] == sum(values) / 2, side


def test_ci_of_two_pairs_spans_them():
    """Two values: a resample's mean is one of them with probability 1/4 each, so the 2.5% and 97.5%
    quantiles of 2000 resamples are the two values themselves."""
    s = patching(_results({"baseline": BASELINE, "target": TARGET}), PROMPTS, ["target"]).summary.row(0, named=True)
    for side, (a, b) in WANT.items():
        assert (s[f"ci_low_{side}"], s[f"ci_high_{side}"]) == (min(a, b), max(a, b)), side


def test_patching_the_partner_in_recovers_one_and_itself_zero():
    partner = {0: -2.0, 1: 2.0, 2: 0.95, 3: 1.0, 4: 1.0, 5: 3.0}  # each prompt scores as its partner did
    got = patching(_results({"baseline": BASELINE, "full": partner, "none": BASELINE}), PROMPTS, ["full", "none"],
                   n_boot=0).summary
    full, none = (got.filter(pl.col("condition") == c).row(0, named=True) for c in ("full", "none"))
    for side in ("denoising", "noising", "both"):
        assert full[f"recovered_{side}"] == 1.0 and none[f"recovered_{side}"] == 0.0
        assert full[f"ci_low_{side}"] is None  # n_boot=0: no interval


def test_nonfinite_rows_are_left_out_and_counted():
    broken = {**TARGET, 5: math.nan}  # pair 2's denoising side
    s = patching(_results({"baseline": BASELINE, "t": broken}), PROMPTS, ["t"], n_boot=0).summary.row(0, named=True)
    assert (s["n_nonfinite"], s["n_denoising"], s["n_noising"], s["n_both"]) == (1, 1, 2, 1)
    assert s["recovered_denoising"] == 0.25 and s["recovered_both"] == 0.375
    base_broken = {**BASELINE, 0: math.inf}  # pair 0's baseline: both of its sides
    s = patching(_results({"baseline": base_broken, "t": TARGET}), PROMPTS, ["t"], n_boot=0).summary.row(0, named=True)
    assert (s["n_nonfinite"], s["n_denoising"], s["recovered_denoising"]) == (2, 1, 1.0)


def test_min_gap_is_the_threshold():
    gap = 0.05  # pair 1's
    assert gap < MIN_GAP
    s = patching(_results({"baseline": BASELINE, "t": TARGET}), PROMPTS, ["t"], min_gap=gap, n_boot=0).summary
    assert s["n_small_gap"].item() == 0 and s["n_denoising"].item() == 3


def test_matches_one_prompt_at_a_time_on_random_frames():
    """Every row against plain arithmetic on dicts; means to float64 summation order."""
    rng = random.Random(5)
    n_pairs, conds = 40, ["baseline", "r0", "r1"]
    prompts = pl.DataFrame({"prompt_id": list(range(2 * n_pairs)), "label": [i % 2 == 1 for i in range(2 * n_pairs)],
                            "pair_id": [i // 2 for i in range(2 * n_pairs)]})
    lo = {(m, c, p): rng.uniform(-4, 4) for m in ("a", "b") for c in conds for p in range(2 * n_pairs)}
    results = pl.DataFrame([(m, p, c, v) for (m, c, p), v in lo.items()],
                           schema=["model", "prompt_id", "condition", "log_odds"], orient="row")
    got = patching(results, prompts, _conditions(["r0", "r1"], ["target", "random"]), n_boot=0)
    for r in got.per_pair.iter_rows(named=True):
        m, c, p = r["model"], r["condition"], r["prompt_id"]
        q = p + 1 if p % 2 == 0 else p - 1
        self_, partner = lo[(m, "baseline", p)], lo[(m, "baseline", q)]
        want = None if abs(partner - self_) < MIN_GAP else (lo[(m, c, p)] - self_) / (partner - self_)
        assert r["partner_id"] == q and r["recovered"] == want, r
    for s in got.summary.iter_rows(named=True):
        rows = got.per_pair.filter((pl.col("model") == s["model"]) & (pl.col("condition") == s["condition"]))
        noising = [v for v, lab in zip(rows["recovered"], rows["label"]) if lab and v is not None]
        assert s["kind"] == {"r0": "target", "r1": "random"}[s["condition"]]
        assert s["n_noising"] == len(noising)
        assert s["recovered_noising"] == pytest.approx(np.mean(noising), rel=reorder_rel(len(noising)))


def test_resample_from_a_conditions_frame_equals_a_list():
    results = _results({"baseline": BASELINE, "target": TARGET, "zeroed": TARGET})
    conds = pl.DataFrame({"condition": ["baseline", "target", "zeroed"], "kind": ["baseline", "target", "target"],
                          "intervention": [None, "resample", "zero"]})
    by_frame = patching(results, PROMPTS, conds, n_boot=100)
    by_list = patching(results, PROMPTS, ["target"], conds, n_boot=100)
    assert by_frame.summary.equals(by_list.summary) and by_frame.per_pair.equals(by_list.per_pair)
    assert by_frame.summary["condition"].to_list() == ["target"]  # zero-ablation is no patching


def test_target_recovered_is_judged_against_random_sets():
    """The summary is what stats.target_vs_controls takes: the target recovers the whole gap, 19 random
    sets recover 0.05 * k of it, so the target is the most extreme and p = 1/20."""
    partner = {0: -2.0, 1: 2.0, 2: 0.95, 3: 1.0, 4: 1.0, 5: 3.0}
    by_cond = {"baseline": BASELINE, "target": partner}
    for k in range(19):  # a set that moves each prompt a fraction 0.05 * k of the way to its partner
        by_cond[f"random-{k:03d}"] = {p: BASELINE[p] + 0.05 * k * (partner[p] - BASELINE[p]) for p in BASELINE}
    ids = list(by_cond)[1:]
    summary = patching(_results(by_cond), PROMPTS, _conditions(ids, ["target"] + ["random"] * 19), n_boot=0).summary
    verdict = target_vs_controls(summary, ["recovered_denoising", "recovered_noising", "recovered_both"])
    assert verdict.height == 3 and verdict["n_controls"].to_list() == [19] * 3
    assert verdict["p_empirical"].to_list() == [1 / 20] * 3 and verdict["rank"].to_list() == [1] * 3
    assert verdict["target_effect"].to_list() == [1.0] * 3


@pytest.mark.parametrize("prompts, results, message", [
    (PROMPTS.with_columns(pl.lit(None, pl.Int64).alias("pair_id")), None, "no pair_id"),
    (PROMPTS.with_columns(pl.Series("pair_id", [0, 0, 0, 1, 2, 2])), None, "pair_id 0 has 3 rows"),
    (PROMPTS.with_columns(pl.Series("label", [True, True, True, False, True, False])), None, "two correct attempts"),
    (PROMPTS, _results({"t": TARGET}), "no baseline condition 'baseline'"),
    (PROMPTS, _results({"baseline": BASELINE}), r"resample condition\(s\) \['t'\] not in results"),
])
def test_bad_inputs_are_named(prompts, results, message):
    results = _results({"baseline": BASELINE, "t": TARGET}) if results is None else results
    with pytest.raises(ValueError, match=message):
        patching(results, prompts, ["t"])
