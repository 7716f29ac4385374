"""Head sets: every accepted spelling, canonical form and id, validation messages, random controls."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import yaml

from verif.design.components import count_sets
from verif.design.heads import (
    STUDY_HEADS_TEXT,
    canonical,
    format_heads,
    parse_heads,
    random_head_sets,
    validate_heads,
)

# SmolLM2-135M's shape and the study's (Qwen2.5-3B) shape.
SMOL_LAYERS, SMOL_HEADS = 30, 9
SEED_LAYERS, SEED_HEADS = 36, 16


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("L3 H13", [(3, 13)]),
        ("L3H13", [(3, 13)]),
        ("l3 h13", [(3, 13)]),
        ("L3  H13", [(3, 13)]),
        ("3.13", [(3, 13)]),
        ("  3.13  ", [(3, 13)]),
        ("L3 H13, L4 H5", [(3, 13), (4, 5)]),
        ("L3 H13,L4 H5", [(3, 13), (4, 5)]),
        ("L3 H13; L4 H5", [(3, 13), (4, 5)]),
        ("L3 H13 L4 H5", [(3, 13), (4, 5)]),
        ("L3H13 L4H5", [(3, 13), (4, 5)]),
        ("3.13 4.5", [(3, 13), (4, 5)]),
        ("3.13, 4.5", [(3, 13), (4, 5)]),
        ("3.13\n4.5\n", [(3, 13), (4, 5)]),
        ("L3 H13\nL4 H5", [(3, 13), (4, 5)]),
        ("L3 H13, 4.5 L10H0\n25.11", [(3, 13), (4, 5), (10, 0), (25, 11)]),
        ("L0 H0", [(0, 0)]),
        ("L35 H15", [(35, 15)]),
        ("", []),
    ],
)
def test_parse_text_spellings(spec, expected):
    assert parse_heads(spec) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ([[3, 13], [4, 5]], [(3, 13), (4, 5)]),
        ([(3, 13), (4, 5)], [(3, 13), (4, 5)]),
        (["L3 H13", [4, 5], "5.9"], [(3, 13), (4, 5), (5, 9)]),
        (["L3 H13, L4 H5", "10.0"], [(3, 13), (4, 5), (10, 0)]),
        ([], []),
    ],
)
def test_parse_lists(spec, expected):
    assert parse_heads(spec) == expected


def test_parse_yaml_like_lists():
    doc = yaml.safe_load(
        """
heads_flow: [[3, 13], [4, 5]]
heads_block:
  - [3, 13]
  - [4, 5]
heads_mixed:
  - L3 H13
  - [4, 5]
  - 5.9
heads_text: "L3 H13, L4 H5"
"""
    )
    assert parse_heads(doc["heads_flow"]) == [(3, 13), (4, 5)]
    assert parse_heads(doc["heads_block"]) == [(3, 13), (4, 5)]
    assert parse_heads(doc["heads_text"]) == [(3, 13), (4, 5)]
    # YAML reads a bare `5.9` as a float: it must not be accepted silently as something else.
    with pytest.raises(ValueError, match="5.9"):
        parse_heads(doc["heads_mixed"])
    assert parse_heads(["L3 H13", [4, 5], "5.9"]) == [(3, 13), (4, 5), (5, 9)]


def test_parse_keeps_order_and_duplicates():
    assert parse_heads("L4 H5, L3 H13, L4 H5") == [(4, 5), (3, 13), (4, 5)]


@pytest.mark.parametrize("bad", ["L3", "H13", "3-13", "L3 X13", "H13 L3", "3.13.1", "L3 H13 x", "abc", "3"])
def test_parse_refuses_bad_text_naming_token(bad):
    with pytest.raises(ValueError, match="cannot parse head") as err:
        parse_heads(bad)
    assert "L3 H13" in str(err.value)  # the message shows the accepted spellings


@pytest.mark.parametrize("bad", [[[3]], [[3, 13, 1]], [[3, "13"]], [[3.0, 13]], [None], [{"layer": 3}]])
def test_parse_refuses_bad_items(bad):
    with pytest.raises(ValueError, match="cannot parse head"):
        parse_heads(bad)


# ---------------------------------------------------------------- canonical form and id


def test_canonical_sorts_and_dedupes():
    assert canonical([(4, 5), (3, 13), (4, 0), (3, 13)]) == ((3, 13), (4, 0), (4, 5))
    assert canonical([]) == ()


def test_format_heads_is_canonical_text():
    assert format_heads([(4, 5), (3, 13), (4, 0)]) == "L3 H13, L4 H0, L4 H5"
    assert parse_heads(format_heads([(4, 5), (3, 13)])) == [(3, 13), (4, 5)]
    # numeric (not lexicographic) order: L10 after L4
    assert format_heads([(10, 0), (4, 1), (4, 12), (4, 2)]) == "L4 H1, L4 H2, L4 H12, L10 H0"


def test_study_heads():
    heads = parse_heads(STUDY_HEADS_TEXT)
    assert len(heads) == 29
    assert len(set(heads)) == 29
    assert heads[0] == (3, 13) and heads[-1] == (25, 11)
    hs = validate_heads(heads, SEED_LAYERS, SEED_HEADS, "study")
    assert hs == canonical(heads) and len(hs) == 29
    per_layer = Counter(layer for layer, _ in heads)
    assert per_layer[17] == 7
    assert sorted(per_layer) == [3, 4, 5, 10, 11, 12, 13, 15, 17, 19, 21, 22, 25]


# ---------------------------------------------------------------- validation


def test_validate_head_out_of_range_names_head_and_range():
    with pytest.raises(ValueError) as err:
        validate_heads(parse_heads("L17 H14"), SMOL_LAYERS, SMOL_HEADS)
    assert "L17 H14: model has 9 heads per layer (0-8)" in str(err.value)


def test_validate_layer_out_of_range_names_head_and_range():
    with pytest.raises(ValueError) as err:
        validate_heads(parse_heads("L30 H0, L2 H1"), SMOL_LAYERS, SMOL_HEADS, what="targets")
    msg = str(err.value)
    assert msg.startswith("targets: ")
    assert "L30 H0: model has 30 layers (0-29)" in msg
    assert "L2 H1" not in msg


def test_validate_negative_indices():
    with pytest.raises(ValueError, match=r"L-1 H0: model has 30 layers \(0-29\)"):
        validate_heads([(-1, 0)], SMOL_LAYERS, SMOL_HEADS)
    with pytest.raises(ValueError, match=r"L0 H-1: model has 9 heads per layer \(0-8\)"):
        validate_heads([(0, -1)], SMOL_LAYERS, SMOL_HEADS)


def test_validate_study_heads_on_smollm2_lists_every_bad_head():
    heads = parse_heads(STUDY_HEADS_TEXT)
    with pytest.raises(ValueError) as err:
        validate_heads(heads, SMOL_LAYERS, SMOL_HEADS)
    msg = str(err.value)
    bad = [(layer, head) for layer, head in heads if head >= SMOL_HEADS]
    assert bad  # the study uses heads 9-15
    for layer, head in bad:
        assert f"L{layer} H{head}: model has 9 heads per layer (0-8)" in msg
    for layer, head in heads:
        if head < SMOL_HEADS:
            assert f"L{layer} H{head}:" not in msg


def test_validate_refuses_duplicates():
    with pytest.raises(ValueError, match=r"duplicate heads: L3 H13"):
        validate_heads(parse_heads("L3 H13, L4 H5, 3.13"), SEED_LAYERS, SEED_HEADS)


def test_validate_returns_canonical():
    assert validate_heads([(4, 5), (3, 13)], SEED_LAYERS, SEED_HEADS) == ((3, 13), (4, 5))
    assert validate_heads([], SEED_LAYERS, SEED_HEADS) == ()


# ---------------------------------------------------------------- random control sets


def test_random_sets_reproducible_distinct_right_size():
    a = random_head_sets(50, 29, SEED_LAYERS, SEED_HEADS, seed=7)
    b = random_head_sets(50, 29, SEED_LAYERS, SEED_HEADS, seed=7)
    c = random_head_sets(50, 29, SEED_LAYERS, SEED_HEADS, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 50
    assert len(set(a)) == 50
    for hs in a:
        assert len(hs) == 29
        assert hs == canonical(hs)  # sorted, no duplicate heads
        assert validate_heads(hs, SEED_LAYERS, SEED_HEADS) == hs


def test_random_sets_prefix_stable():
    # Asking for more sets with the same seed keeps the first ones (a sweep can be extended).
    small = random_head_sets(5, 4, SMOL_LAYERS, SMOL_HEADS, seed=3)
    big = random_head_sets(20, 4, SMOL_LAYERS, SMOL_HEADS, seed=3)
    assert big[:5] == small


def test_random_sets_cover_the_model():
    sets = random_head_sets(200, 29, SEED_LAYERS, SEED_HEADS, seed=0)
    used = {h for hs in sets for h in hs}
    # 200 draws of 29 out of 576: every head is almost surely used; all layers certainly are.
    assert {layer for layer, _ in used} == set(range(SEED_LAYERS))
    assert len(used) > 550


def test_random_sets_exclude():
    study = parse_heads(STUDY_HEADS_TEXT)
    sets = random_head_sets(100, 29, SEED_LAYERS, SEED_HEADS, seed=1, exclude=study)
    for hs in sets:
        assert not set(hs) & set(study)
        assert len(hs) == 29


def test_random_sets_match_layers():
    study = parse_heads(STUDY_HEADS_TEXT)
    target_hist = Counter(layer for layer, _ in study)
    sets = random_head_sets(40, 29, SEED_LAYERS, SEED_HEADS, seed=2, exclude=study, match_layers_of=study)
    assert len(set(sets)) == 40
    for hs in sets:
        assert Counter(layer for layer, _ in hs) == target_hist
        assert not set(hs) & set(study)
        assert len(hs) == 29
    again = random_head_sets(40, 29, SEED_LAYERS, SEED_HEADS, seed=2, exclude=study, match_layers_of=study)
    assert again == sets


def test_random_sets_match_layers_overrides_size():
    target = [(1, 0), (1, 1), (5, 3)]
    sets = random_head_sets(10, 99, SMOL_LAYERS, SMOL_HEADS, seed=0, match_layers_of=target)
    for hs in sets:
        assert len(hs) == 3
        assert Counter(layer for layer, _ in hs) == {1: 2, 5: 1}


def test_random_sets_too_large():
    with pytest.raises(ValueError, match=r"control sets of 577 heads: only 576 heads are allowed"):
        random_head_sets(1, 577, SEED_LAYERS, SEED_HEADS, seed=0)
    study = parse_heads(STUDY_HEADS_TEXT)
    with pytest.raises(ValueError, match=r"only 547 heads are allowed"):
        random_head_sets(1, 560, SEED_LAYERS, SEED_HEADS, seed=0, exclude=study)


def test_random_sets_match_layers_impossible():
    study = parse_heads(STUDY_HEADS_TEXT)
    # Layer 17 has 7 study heads; excluding them leaves 9, so a 10-head histogram there is impossible.
    target = [(17, h) for h in range(10)]
    with pytest.raises(ValueError, match=r"layer 17: need 10 heads per control set, only 9 allowed"):
        random_head_sets(1, 10, SEED_LAYERS, SEED_HEADS, seed=0, exclude=study, match_layers_of=target)
    # A layer the model does not have.
    with pytest.raises(ValueError, match=r"layer 40: need 1 heads per control set, only 0 allowed"):
        random_head_sets(1, 1, SEED_LAYERS, SEED_HEADS, seed=0, match_layers_of=[(40, 0)])


def test_random_sets_not_enough_distinct():
    # 3 heads in all, sets of 2: only 3 distinct sets exist.
    with pytest.raises(ValueError, match=r"only 3 distinct control sets of 2 heads exist"):
        random_head_sets(4, 2, 1, 3, seed=0)
    assert len(random_head_sets(3, 2, 1, 3, seed=0)) == 3


@pytest.mark.parametrize("size, n_layers, per_layer, exclude, match", [
    (2, 3, 3, [], None),
    (3, 2, 4, [(0, 0), (1, 3)], None),
    (2, 2, 2, [(5, 5), (0, 9)], None),  # exclusions outside the model take nothing away
    (3, 3, 3, [(0, 0), (1, 1)], [(0, 1), (0, 2), (2, 0)]),
    (1, 2, 4, [(1, 3)], [(1, 0)]),
    (2, 2, 3, [], [(0, 0), (7, 1)]),  # a layer the model lacks: no set at all
])
def test_distinct_sets_are_counted_exactly(size, n_layers, per_layer, exclude, match):
    """count_sets against enumerating every set a draw could give (itertools), with exclude and match_layers."""
    pool = [(layer, i) for layer in range(n_layers) for i in range(per_layer) if (layer, i) not in set(exclude)]
    want = Counter(layer for layer, _ in match) if match is not None else None
    k = size if match is None else len(match)
    every = [c for c in itertools.combinations(pool, k) if want is None or Counter(layer for layer, _ in c) == want]
    assert count_sets(size, n_layers, per_layer, exclude, match) == len(every)


def test_draws_reach_every_distinct_set_and_no_more():
    """Asked for exactly as many sets as exist, the draws return all of them; one more is refused before any
    draw (it would otherwise redraw forever: the issue's 100000 controls of 8 possible sets)."""
    target = [(0, 1), (2, 2)]
    n = count_sets(2, 3, 4, target, target)  # 3 heads left in layer 0 x 3 in layer 2
    assert n == 9
    sets = random_head_sets(n, 2, 3, 4, seed=1, exclude=target, match_layers_of=target)
    assert len(set(sets)) == n
    with pytest.raises(ValueError, match=r"^only 9 distinct control sets of 2 heads exist under these constraints$"):
        random_head_sets(100_000, 2, 3, 4, seed=1, exclude=target, match_layers_of=target)
