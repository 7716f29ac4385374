"""Discovery without selection bias (discover.holdout): the split, the held-out columns of sets.parquet,
the overlap of two models' top-k sets, and the prompts target.yaml points the follow-up sweep at."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import pytest
import yaml

from jobs.config import ConfigError, load_config
from jobs.discover.outputs import follow_up_prompts
from jobs.prepare import build_prompts
from jobs.runtime.storage import OutDir
from verif.analysis.discovery.holdout import holdout_mask
from verif.analysis.discovery.sets import PlannedSet, SetPlan, set_overlaps, sets_table, target_yaml
from verif.design.conditions import Ablation


def test_the_split_is_stratified_seeded_and_rounds_half_up():
    labels = [True] * 7 + [False] * 5
    held = holdout_mask(labels, 0.5, seed=0)
    assert sum(held[:7]) == 4 and sum(held[7:]) == 3  # floor(3.5 + 0.5), floor(2.5 + 0.5)
    assert holdout_mask(labels, 0.5, seed=0) == held
    assert holdout_mask(labels, 0.5, seed=1) != held
    assert not any(holdout_mask(labels, 0.0, seed=0))
    # the held-out members of each label are a seeded choice, not the first ones
    assert held[:7] != [True] * 4 + [False] * 3
    with pytest.raises(ValueError, match=r"discover.holdout: 1.0 must be in \[0, 1\)"):
        holdout_mask(labels, 1.0, seed=0)
    with pytest.raises(ConfigError, match="^discover.holdout: must be at least 0 and below 1"):
        load_config(None, ["discover.holdout=1"])


def test_sets_table_judges_each_set_on_both_halves():
    plan = SetPlan([Ablation(heads=((0, i),)) for i in range(4)], [PlannedSet("atp", "head", 1, ((0, 0),), 0, (1, 2, 3))])
    chosen = np.array([-0.9, 0.1, -0.2, 0.95])
    held = np.array([0.2, 0.5, -0.1, 0.05])
    row = sets_table(plan, chosen, held).row(0, named=True)
    assert row["delta"] == -0.9 and row["heldout_delta"] == 0.2
    assert row["null_mean"] == pytest.approx(np.mean([0.1, -0.2, 0.95]), abs=1e-15)
    assert row["heldout_null_mean"] == pytest.approx(np.mean([0.5, -0.1, 0.05]), abs=1e-15)
    # (1 + #controls at least as extreme) / (n + 1): a ratio of small integers, exact
    assert row["p_empirical"] == (1 + 1) / 4 and row["heldout_p_empirical"] == (1 + 1) / 4
    no_heldout = sets_table(plan, chosen).row(0, named=True)
    assert no_heldout["heldout_delta"] is None and no_heldout["heldout_p_empirical"] is None


def test_target_yaml_carries_the_prompts_section_and_why():
    row = {"kind": "head", "k": 2, "ranking": "exact", "components": "L1 H2, L3 H0", "delta": -1.0, "null_mean": 0.1,
           "null_std": 0.2, "p_empirical": 0.05, "heldout_delta": -0.7, "heldout_null_mean": 0.0,
           "heldout_null_std": 0.3, "heldout_p_empirical": 0.1}
    text = target_yaml(row, None, "m", {"file": "/x/heldout_prompts.parquet", "template": "study"},
                       "prompts: the attempts kept out of the selection half.")
    parsed = yaml.safe_load(text)
    assert parsed == {"ablation": {"target_heads": "L1 H2, L3 H0"},
                      "prompts": {"file": "/x/heldout_prompts.parquet", "template": "study"}}
    assert "# prompts: the attempts kept out of the selection half." in text
    assert "on the held-out prompts: delta -0.7 nats" in text


def sets_frame(model: str, heads: list[str], neurons: list[str]) -> pl.DataFrame:
    rows = [{"model": model, "ranking": "atp", "kind": kind, "k": len(c.split(", ")), "components": c}
            for kind, items in (("head", heads), ("neuron", neurons)) for c in items]
    return pl.DataFrame(rows)


def test_top_k_sets_of_two_models_against_chance():
    sets = pl.concat([sets_frame("a", ["L0 H1", "L0 H1, L1 H0"], ["L2 N5"]),
                      sets_frame("b", ["L0 H2", "L0 H1, L1 H0"], ["L2 N5"]),
                      sets_frame("c", ["L0 H1", "L0 H1, L1 H0"], ["L2 N5"])])
    populations = {"a": {"head": 8, "neuron": 100}, "b": {"head": 8, "neuron": 100}, "c": {"head": 8, "neuron": 64}}
    table = set_overlaps(sets, populations, ["a", "b", "c"])
    got = {(r["pair"], r["kind"], r["k"]): r for r in table.iter_rows(named=True)}
    assert got["a__b", "head", 1]["overlap"] == 0 and got["a__b", "head", 1]["p_overlap"] == 1.0
    both = got["a__b", "head", 2]
    # two of 8 heads, the same two: P(a random pair is that pair) = 1 / C(8, 2)
    assert (both["overlap"], both["p_overlap"], both["shared"]) == (2, 1 / math.comb(8, 2), "L0 H1, L1 H0")
    assert both["expected_overlap"] == 2 * 2 / 8
    assert got["a__b", "neuron", 1]["p_overlap"] == 1 / 100
    # c has another MLP width: its neurons correspond to none of a's, its heads do
    assert ("a__c", "neuron", 1) not in got and got["a__c", "head", 2]["overlap"] == 2


def test_follow_up_prompts(tmp_path):
    out = OutDir(tmp_path / "discovery")
    cfg = load_config(None, ["prompts.n=12", "discover.holdout=0"], str(tmp_path))
    prompts, _, _ = build_prompts(cfg, {})
    fresh = follow_up_prompts(cfg, prompts.with_columns(pl.lit(False).alias("heldout")), out, {})
    seed = fresh.prompts["seed"]
    assert fresh.prompts["n"] == 12 and seed != cfg.prompts.seed and fresh.heldout is None
    other, _, _ = build_prompts(load_config(None, ["prompts.n=12", f"prompts.seed={seed}"]), {})

    def attempts(frame: pl.DataFrame) -> set[tuple]:
        return {(tuple(r["numbers"]), r["target"], r["attempt"]) for r in frame.iter_rows(named=True)}

    assert not attempts(other) & attempts(prompts) and f"generated from seed {seed}" in fresh.note
    held = holdout_mask(prompts["label"].to_list(), 0.5, 0)
    split = follow_up_prompts(load_config(None, ["prompts.n=12"], str(tmp_path)),
                              prompts.with_columns(pl.Series("heldout", held)), out, {})
    assert split.prompts == {"file": str((out.root / "heldout_prompts.parquet").resolve()), "template": "study"}
    assert split.heldout.columns == ["numbers", "target", "attempt", "error_kind"] and split.heldout.height == sum(held)
    from_file = follow_up_prompts(cfg.replace(prompts=dataclasses.replace(cfg.prompts, file="x.jsonl")),
                                  prompts.with_columns(pl.lit(False).alias("heldout")), out, {})
    assert from_file.prompts == {} and "every attempt of x.jsonl" in from_file.note
