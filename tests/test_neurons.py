"""MLP neuron ablation: neuron sets (parsing, validation, random controls), `Ablation`, conditions with
neurons, sparse neuron masks and the shared trunk's branch point, and the engine with neurons on real
weights (SmolLM2): fast path == hook path, per-row masks == rows alone.

Exactness of neuron ablation against manual arithmetic at the down projection's input is in
test_families.py (every family).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from verif.design.components import canonical
from verif.design.conditions import Ablation, Condition, build_conditions
from verif.design.heads import random_head_sets
from verif.design.neurons import (
    format_neurons,
    parse_neurons,
    random_neuron_sets,
    validate_neurons,
)
from verif.model.ablation import AblationMasks
from verif.model.arch import Arch
from verif.model.engine import EngineOptions, Scorer
from verif.model.forward import plan_rows
from verif.model.score import resolve_yes_no
from tests.support.families import score_tolerance

QWEN3B = Arch("qwen2", 36, 16, 2, 128, 2048, 11008, 151936, True)  # Qwen2.5-3B's shape


# ---------------------------------------------------------------- neuron sets


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("L20 N1234, L21 N77", [(20, 1234), (21, 77)]),
        ("L20N1234", [(20, 1234)]),
        ("l20 n1234; L0 N0", [(20, 1234), (0, 0)]),
        ("L20 N1 L21 N2\nL3N4", [(20, 1), (21, 2), (3, 4)]),
        ("", []),
        ([[20, 1234], [21, 77]], [(20, 1234), (21, 77)]),
        (["L20 N1234", [21, 77]], [(20, 1234), (21, 77)]),
    ],
)
def test_parse_neurons(spec, expected):
    assert parse_neurons(spec) == expected


def test_parse_neurons_from_yaml():
    doc = yaml.safe_load("a: L20 N1234, L21 N77\nb:\n  - [20, 1234]\n  - L21 N77\n")
    assert parse_neurons(doc["a"]) == parse_neurons(doc["b"]) == [(20, 1234), (21, 77)]


@pytest.mark.parametrize("bad", ["20.1234", "L3 H1", "N5", "L2 N", [[1, 2, 3]], [["a", 1]]])
def test_parse_neurons_refuses_other_spellings(bad):
    with pytest.raises(ValueError, match="neuron"):
        parse_neurons(bad)


def test_canonical_and_format():
    assert canonical([(21, 77), (20, 1234), (21, 77)]) == ((20, 1234), (21, 77))
    assert format_neurons([(21, 77), (20, 1234)]) == "L20 N1234, L21 N77"


def test_validate_neurons_messages():
    assert validate_neurons([(3, 5), (1, 0)], 4, 64) == ((1, 0), (3, 5))
    with pytest.raises(ValueError) as err:
        validate_neurons([(4, 0), (1, 64), (2, 1), (2, 1)], 4, 64, what="ablation.target_neurons")
    msg = str(err.value)
    assert msg.startswith("ablation.target_neurons: ")
    assert "L4 N0: model has 4 layers (0-3)" in msg
    assert "L1 N64: model has 64 MLP neurons per layer (0-63)" in msg
    assert "duplicate neurons: L2 N1" in msg


def test_random_neuron_sets_reproducible_distinct_and_sized():
    a = random_neuron_sets(30, 5, 36, 11008, seed=3)
    assert a == random_neuron_sets(30, 5, 36, 11008, seed=3)
    assert a != random_neuron_sets(30, 5, 36, 11008, seed=4)
    assert len(set(a)) == 30
    assert all(len(s) == 5 and s == canonical(s) for s in a)
    assert all(0 <= layer < 36 and 0 <= i < 11008 for s in a for layer, i in s)


def test_random_neuron_sets_exclude_and_match_layers():
    target = [(20, 1234), (20, 7), (21, 77)]
    sets = random_neuron_sets(50, 3, 36, 11008, seed=1, exclude=target, match_layers_of=target)
    for s in sets:
        assert not set(s) & set(target)
        assert Counter(layer for layer, _ in s) == Counter({20: 2, 21: 1})
    # a small pool: every allowed neuron is reachable and excluded ones never appear
    small = random_neuron_sets(15, 2, 2, 4, seed=0, exclude=[(0, 0), (1, 3)])  # all C(6, 2) sets
    seen = {n for s in small for n in s}
    assert (0, 0) not in seen and (1, 3) not in seen and len(seen) == 6


def test_random_neuron_sets_impossible_requests():
    with pytest.raises(ValueError, match="only 7 neurons are allowed"):
        random_neuron_sets(1, 8, 2, 4, seed=0, exclude=[(0, 0)])
    with pytest.raises(ValueError, match="layer 1: need 2 neurons per control set, only 1 allowed"):
        random_neuron_sets(1, 2, 2, 2, seed=0, exclude=[(1, 0)], match_layers_of=[(1, 0), (1, 1)])
    with pytest.raises(ValueError, match="only 1 distinct control sets"):
        random_neuron_sets(2, 2, 1, 2, seed=0)
    # layer-matched: C(3, 2) x C(4, 1) = 12 sets; all 12 are drawn, a 13th is refused before any draw
    target = [(0, 0), (0, 1), (1, 2)]
    assert len(set(random_neuron_sets(12, 3, 2, 5, seed=0, exclude=target, match_layers_of=target))) == 12
    with pytest.raises(ValueError, match="only 12 distinct control sets of 3 neurons exist"):
        random_neuron_sets(13, 3, 2, 5, seed=0, exclude=target, match_layers_of=target)


# ---------------------------------------------------------------- Ablation and conditions


def test_ablation_is_canonical():
    a = Ablation(heads=[(5, 1), (3, 2), (5, 1)], neurons=[[9, 4], (2, 100)])
    assert a.heads == ((3, 2), (5, 1)) and a.neurons == ((2, 100), (9, 4))
    assert a == Ablation(((3, 2), (5, 1)), ((2, 100), (9, 4))) and hash(a) == hash(Ablation(a.heads, a.neurons))
    assert a.layers == (2, 3, 5, 9)
    assert a.describe() == "L3 H2, L5 H1 | L2 N100, L9 N4"
    assert not Ablation() and Ablation().describe() == "nothing" and Ablation().layers == ()
    assert Ablation.of([(1, 2)]) == Ablation(((1, 2),)) and Ablation.of(a) is a


def test_head_only_conditions_are_unchanged_by_neuron_support():
    heads = [(3, 13), (4, 5), (17, 1)]
    conds = build_conditions(36, 16, heads, 5, 7, match_layers=True)
    expected = random_head_sets(5, 3, 36, 16, 7, exclude=heads, match_layers_of=heads)
    assert [c.heads for c in conds[2:]] == expected
    assert all(c.neurons == () for c in conds)
    assert build_conditions(36, 16, Ablation(tuple(heads)), 5, 7, match_layers=True) == conds


def test_conditions_with_heads_and_neurons():
    target = Ablation(((17, 1), (17, 2), (20, 3)), ((20, 1234), (20, 7), (21, 77), (5, 9)))
    conds = build_conditions(36, 16, target, 40, 0, match_layers=True, n_neurons=11008)
    assert [c.kind for c in conds[:2]] == ["baseline", "target"]
    assert conds[1].ablation == target
    controls = conds[2:]
    assert len(controls) == 40 and len({c.ablation for c in controls}) == 40
    for c in controls:
        assert len(c.heads) == 3 and len(c.neurons) == 4
        assert Counter(lyr for lyr, _ in c.heads) == Counter({17: 2, 20: 1})
        assert Counter(lyr for lyr, _ in c.neurons) == Counter({20: 2, 21: 1, 5: 1})
        assert not set(c.neurons) & set(target.neurons) and not set(c.heads) & set(target.heads)
    # the head part of the controls is exactly what a head-only target would get
    head_only = build_conditions(36, 16, target.heads, 40, 0, match_layers=True)
    assert [c.heads for c in controls] == [c.heads for c in head_only[2:]]
    row = conds[1].row()
    assert row["neurons"] == "L5 N9, L20 N7, L20 N1234, L21 N77" and row["n_neurons"] == 4
    assert row["heads"] == "L17 H1, L17 H2, L20 H3" and row["n_heads"] == 3
    assert Condition("baseline", "baseline", ()).row()["neurons"] == ""


def test_neuron_only_target_and_its_errors():
    conds = build_conditions(4, 4, Ablation((), ((1, 3), (2, 60))), 3, 0, n_neurons=64)
    assert all(len(c.neurons) == 2 and c.heads == () for c in conds[1:])
    with pytest.raises(ValueError, match="n_neurons"):
        build_conditions(4, 4, Ablation((), ((1, 3),)), 3, 0)
    with pytest.raises(ValueError, match="target_heads or target_neurons"):
        build_conditions(4, 4, (), 3, 0)


# ---------------------------------------------------------------- masks and the row plan


def test_neuron_masks_stay_sparse_for_a_single_head_sweep():
    """A 577-condition single-head sweep on a 36 x 11008 model: no `[577, 36, 11008]` mask anywhere."""
    conds = build_conditions(36, 16, (), 0, 0, sweeps=["single_head"])
    masks = AblationMasks.build([c.ablation for c in conds], QWEN3B)
    assert masks.heads.shape == (577, 36, 16)
    assert masks.neuron_layers.shape == (577, 36) and not masks.neuron_layers.any()
    assert all(n == {} for n in masks.neurons)
    rows = np.arange(577)
    assert all(masks.neuron_keep(rows, layer) is None for layer in range(36))
    # one condition with a neuron: a mask is built for one layer only, and only its row is zeroed
    masks = AblationMasks.build([c.ablation for c in conds[:3]] + [Ablation((), ((20, 1234), (20, 5)))], QWEN3B)
    keep = masks.neuron_keep(np.array([0, 3, -1, 2]), 20)
    assert keep.shape == (4, 11008)
    assert torch.equal(keep[1, [5, 1234]], torch.zeros(2)) and int(keep[1].sum()) == 11006
    assert (keep[[0, 2, 3]] == 1).all()
    assert masks.neuron_keep(np.array([0, 3]), 21) is None


def test_trunk_branches_at_the_first_head_or_neuron_layer():
    arch = Arch("llama", 6, 4, 2, 8, 32, 64, 100, True)
    abls = [Ablation(), Ablation((), ((4, 1),)), Ablation(((5, 0),), ((2, 3),)), Ablation(((1, 0),))]
    plan = plan_rows(AblationMasks.build(abls, arch), n_prompts=2, share_trunk=True)
    enter = {c: min(layer for layer in range(6) if plan.live[layer][1] > r) for r, c in enumerate(plan.row_cond)}
    assert enter == {-1: 0, 3: 1, 2: 2, 1: 4}
    assert plan.row_neurons[plan.row_cond == 2].sum(1).tolist() == [1, 1]  # only at layer 2
    assert plan.row_ablates[plan.row_cond == 2][:, 5].all() and not plan.row_ablates[plan.row_cond == 1].any()


# ---------------------------------------------------------------- the engine on real weights


SMOL_ABLATIONS = [
    Ablation(),
    Ablation((), ((20, 100), (20, 1000), (25, 7))),
    Ablation(((17, 1), (17, 2)), ((17, 500),)),
    Ablation((), ((0, 3),)),
    Ablation((), tuple((29, i) for i in range(0, 1536, 3))),  # a third of the last layer's MLP
]


@pytest.fixture(scope="module")
def smol_tokens(smollm2, short_prompts) -> list[list[int]]:
    enc = [smollm2.tokenizer.encode(p, add_special_tokens=False) for p in short_prompts[:3]]
    return [enc[0][:24], enc[1][:24], enc[2][:30]]


def smol_tol(log_odds: np.ndarray) -> np.ndarray:
    return score_tolerance(30, 576, log_odds)  # SmolLM2: 30 layers, hidden 576


def test_smollm2_neurons_fast_equals_hook_and_rows_alone(smollm2, smol_tokens):
    ids = resolve_yes_no(smollm2.tokenizer)
    fast = Scorer(smollm2, ids).score_tokens(smol_tokens, SMOL_ABLATIONS)
    hook = Scorer(smollm2, ids, EngineOptions(path="hook")).score_tokens(smol_tokens, SMOL_ABLATIONS)
    assert (np.abs(fast.log_odds - hook.log_odds) <= smol_tol(hook.log_odds)).all(), fast.log_odds - hook.log_odds
    effect = np.abs(hook.log_odds[:, 1:] - hook.log_odds[:, :1])
    assert (effect > 4 * smol_tol(hook.log_odds[:, :1])).all(), effect  # every ablation moves every prompt
    alone = np.stack([Scorer(smollm2, ids).score_tokens(smol_tokens, [a]).log_odds[:, 0] for a in SMOL_ABLATIONS], 1)
    assert (np.abs(fast.log_odds - alone) <= smol_tol(alone)).all()
