"""Discovery outputs: rankings and correlations, top-k sets against random sets, tables, figures,
and the target YAML."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import yaml

from verif.analysis.discovery import figures
from verif.design.conditions import Ablation
from verif.analysis.discovery.exact import delta_sums, single_head_sets
from verif.analysis.discovery.ranking import pearson, ranked, spearman
from verif.analysis.discovery.sets import best_set, check_controls, format_components, plan_sets, sets_table, target_yaml
from verif.analysis.discovery.tables import exact_map, heads_table, neurons_table
from verif.design.heads import parse_heads
from verif.model.engine import EngineOptions, Scorer
from verif.model.score import resolve_yes_no
from tests.support.exact_models import small_seed_model

PAD = 151643


def test_ranked_orders_by_magnitude_or_value_and_skips_unscored():
    scores = np.array([[0.1, -3.0, np.nan], [2.0, -0.5, 2.0]])
    assert ranked(scores, "atp") == [(0, 1), (1, 0), (1, 2), (1, 1), (0, 0)]
    assert ranked(scores, "probe_cos") == [(1, 0), (1, 2), (0, 0), (1, 1), (0, 1)]


def test_correlations_against_hand_values():
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    y = np.array([2.0, 4.0, 5.0, 4.0, 1.0])
    # Pearson by hand: dx = (-1.5, -.5, .5, 1.5), dy = (-1.75, .25, 1.25, .25): 3.5 / sqrt(5 * 4.75).
    assert pearson(x, y) == pytest.approx(3.5 / np.sqrt(5 * 4.75), rel=1e-12)
    # Ranks of y with the tie averaged: (1, 2.5, 4, 2.5), centred (-1.5, 0, 1.5, 0): 3 / sqrt(5 * 4.5).
    assert spearman(x, y) == pytest.approx(3.0 / np.sqrt(5 * 4.5), rel=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0) and np.isnan(pearson(np.ones(3), np.arange(3.0)))


def test_plan_sets_top_k_and_shared_random_nulls():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    b[0, :] = np.nan  # an exact screen that left layer 0 out: 8 scored heads
    plan = plan_sets({"atp": a, "exact": b}, "head", ks=(1, 2, 64), n_controls=5, seed=7)
    by = {(s.ranking, s.k): s for s in plan.sets}
    assert sorted(by) == [("atp", 1), ("atp", 2), ("atp", 12), ("exact", 1), ("exact", 2), ("exact", 8)]
    assert by[("atp", 2)].members == tuple(ranked(a, "atp")[:2])
    assert plan.conditions[by[("exact", 8)].condition] == Ablation(heads=tuple(sorted(ranked(b, "exact"))))
    assert by[("atp", 2)].controls == by[("exact", 2)].controls  # one null per (kind, k)
    for s in plan.sets:
        assert len(s.controls) == 5
        assert all(len(plan.conditions[c].heads) == s.k and not plan.conditions[c].neurons for c in s.controls)
    assert len(set(plan.conditions)) == len(plan.conditions)  # duplicates scored once
    again = plan_sets({"atp": a, "exact": b}, "head", ks=(1, 2, 64), n_controls=5, seed=7)
    assert again.conditions == plan.conditions
    other = plan_sets({"atp": a}, "head", ks=(2,), n_controls=5, seed=8)
    assert {plan.conditions[c] for c in by[("atp", 2)].controls} != {other.conditions[c] for c in other.sets[0].controls}
    neurons = plan_sets({"probe_cos": rng.normal(size=(2, 50))}, "neuron", ks=(4,), n_controls=3)
    assert all(len(c.neurons) == 4 and not c.heads for c in neurons.conditions)
    for bad in ({"ks": ()}, {"ks": (0,)}, {"n_controls": 0}, {"kind": "layer"}):
        with pytest.raises(ValueError):
            plan_sets({"atp": a}, **{"kind": "head", **bad})


def test_sets_table_p_values_by_hand():
    scores = np.zeros((1, 1000))
    scores[0, 0] = 3.0
    plan = plan_sets({"atp": scores}, "head", ks=(1,), n_controls=4, seed=0)
    s = plan.sets[0]
    assert len(set(s.controls)) == 4 and s.condition not in s.controls  # 4 distinct draws of 1000 heads
    deltas = np.zeros(len(plan.conditions))
    deltas[s.condition] = -0.3
    for c, v in zip(s.controls, [0.1, -0.3, 0.05, np.nan]):  # a non-finite control is left out of the null
        deltas[c] = v
    row = sets_table(plan, deltas).row(0, named=True)
    null = np.array([0.1, -0.3, 0.05])
    assert row["components"] == "L0 H0" and row["kind"] == "head" and row["k"] == 1
    assert row["null_mean"] == pytest.approx(null.mean()) and row["null_std"] == pytest.approx(null.std(ddof=1))
    assert row["p_empirical"] == pytest.approx((1 + 1) / (3 + 1))  # |-0.3| >= |-0.3| once
    with pytest.raises(ValueError, match="one per planned condition"):
        sets_table(plan, deltas[:-1])


def test_sets_end_to_end_on_a_model(qwen_tokenizer, short_prompts):
    """Top-k sets scored in one engine call: the top-1 set by exact effect is the head with the
    largest single-head |delta|, and its effect is that delta."""
    small = small_seed_model(qwen_tokenizer, seed=2)
    ids = resolve_yes_no(qwen_tokenizer)
    tokens = [qwen_tokenizer.encode(p, add_special_tokens=False) for p in short_prompts]
    scorer = Scorer(small, ids, EngineOptions(pad_id=PAD))
    heads = [(layer, h) for layer in range(small.arch.n_layers) for h in range(small.arch.n_heads)]
    exact = exact_map((small.arch.n_layers, small.arch.n_heads), heads,
                      delta_sums(scorer, tokens, single_head_sets(heads)).mean("delta"))
    plan = plan_sets({"exact": exact}, "head", ks=(1, 2, 4, 64), n_controls=6, seed=0)
    table = sets_table(plan, delta_sums(scorer, tokens, plan.conditions).mean("delta"))
    assert table["k"].to_list() == [1, 2, 4, 16]
    top = table.row(0, named=True)
    layer, head = np.unravel_index(np.abs(exact).argmax(), exact.shape)
    assert top["components"] == f"L{layer} H{head}"
    # Same float64 engine, one condition among others vs among single heads: equal to rounding.
    assert top["delta"] == pytest.approx(exact[layer, head], rel=1e-9)
    assert ((table["p_empirical"] >= 1 / 7) & (table["p_empirical"] <= 1)).all()
    best = best_set(table, "head")
    assert best is not None and best["p_empirical"] == table["p_empirical"].min()
    text = target_yaml(best, None, small.name)
    parsed = yaml.safe_load(text)
    assert set(parsed) == {"ablation"} and set(parsed["ablation"]) == {"target_heads"}
    assert sorted(parse_heads(parsed["ablation"]["target_heads"])) == sorted(parse_heads(best["components"]))


def test_best_set_ties_and_yaml_with_neurons():
    table = pl.DataFrame({
        "ranking": ["atp", "atp", "exact", "probe_cos"], "kind": ["head", "head", "head", "neuron"],
        "k": [1, 4, 2, 3], "components": ["L1 H2", "L1 H2, L3 H0, L4 H1, L5 H5", "L1 H2, L3 H0", "L2 N7, L2 N9, L5 N100"],
        "delta": [-0.5, -2.0, -1.9, 0.4], "null_mean": [0.0, -0.1, -0.05, 0.0],
        "null_std": [0.1, 0.2, 0.1, 0.1], "p_empirical": [0.05, 0.05, 0.05, 0.3],
    })
    # Equal p: the set most null sds beyond the null mean wins (exact k=2: 18.5 sd; atp k=4: 9.5 sd).
    assert best_set(table, "head")["ranking"] == "exact"
    assert best_set(table, "layer") is None
    parsed = yaml.safe_load(target_yaml(best_set(table, "head"), best_set(table, "neuron"), "m"))
    assert parsed == {"ablation": {"target_heads": "L1 H2, L3 H0", "target_neurons": "L2 N7, L2 N9, L5 N100"}}
    assert format_components("neuron", [(5, 100), (2, 9), (2, 7), (2, 9)]) == "L2 N7, L2 N9, L5 N100"
    with pytest.raises(ValueError, match="no set to write"):
        target_yaml(None, None, "m")


def test_tables_keep_unscored_as_null():
    atp = np.arange(6.0).reshape(2, 3)
    exact = exact_map((2, 3), [(1, 2), (0, 0)], np.array([0.5, -0.25]))
    heads = heads_table("m", atp, exact, np.full((2, 3), 0.1))
    assert heads.columns == ["model", "layer", "head", "atp", "exact", "attn_to_target"]
    assert heads.filter(pl.col("exact").is_not_null()).select("layer", "head", "exact").rows() == [(0, 0, -0.25), (1, 2, 0.5)]
    neurons = neurons_table("m", np.zeros((2, 4)), np.ones((2, 4)), np.full((2, 4), np.nan))
    assert neurons.columns == ["model", "layer", "neuron", "atp", "logit_yes_no", "probe_cos"]
    assert neurons.height == 8 and neurons["probe_cos"].null_count() == 8
    with pytest.raises(ValueError, match="one shape"):
        heads_table("m", atp, np.zeros((3, 3)), atp)


def test_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    atp, exact = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    exact[0] = np.nan
    paths = [
        figures.plot_head_scores(atp, "atp", "m", 8, tmp_path / "atp.png", highlight=[(1, 2)]),
        figures.plot_head_scores(np.abs(atp), "attn_to_target", "m", 8, tmp_path / "attn.png"),
        figures.plot_top_neurons(rng.normal(size=(6, 40)), "logit_yes_no", "m", 8, tmp_path / "neurons.png", top=20),
        figures.plot_atp_vs_exact(atp, exact, "m", 8, tmp_path / "scatter.png"),
    ]
    plan = plan_sets({"atp": atp, "exact": exact}, "head", ks=(1, 2, 4), n_controls=3)
    table = sets_table(plan, rng.normal(size=len(plan.conditions)))
    paths.append(figures.plot_effect_vs_k(table, "head", "m", 8, tmp_path / "k.png"))
    for p in paths:
        assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures.plot_atp_vs_exact(atp, np.full((6, 4), np.nan), "m", 8, tmp_path / "none.png") is None
    assert figures.plot_effect_vs_k(table, "neuron", "m", 8, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_controls_are_bounded_by_the_distinct_sets_of_each_size():
    """discover.controls against C(n, k) for every size plan_sets draws: each k capped at the components
    (16 heads: k 16 and 64 are both the one set of all 16) and at what a ranking scored (the exact screen)."""
    check_controls(16, [1, 2], 16, "head")  # 16 sets of 1 head exist
    with pytest.raises(ValueError, match=r"^discover.controls 17: only 16 distinct random sets of 1 heads exist"):
        check_controls(17, [1, 2], 16, "head")
    with pytest.raises(ValueError, match=r"only 1 distinct random sets of 16 heads exist"):
        check_controls(2, [1, 64], 16, "head")
    check_controls(120, [3], 16, "head", scored=(2,))  # C(16, 3) = 560 and C(16, 2) = 120
    with pytest.raises(ValueError, match=r"only 120 distinct random sets of 2 heads"):
        check_controls(121, [3], 16, "head", scored=(2,))
