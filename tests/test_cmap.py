"""CMAP's statistics (verif/analysis/cmap.py) on hand-made frames, and the checks that two models can
exchange activations (verif/model/compatible.py), before the engine that patches them exists."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from verif.analysis import cmap
from verif.model.arch import Arch
from verif.model.compatible import architecture_difference, tokenization_difference


def test_gap_closed_by_hand_and_small_gaps_left_out():
    # LD_a = 2, LD_b = 0: patched 1 closes half the gap, 2 all of it, 0 none, 3 overshoots
    got = cmap.gap_closed([1.0, 2.0, 0.0, 3.0, 5.0, np.nan], [2.0, 2.0, 2.0, 2.0, 0.01, 2.0], [0.0] * 6)
    assert got[:4].tolist() == [0.5, 1.0, 0.0, 1.5]  # one subtraction and one division each: exact here
    assert np.isnan(got[4]) and np.isnan(got[5])  # gap 0.01 < MIN_GAP; a patched value that is not finite
    # the sign of the gap does not matter: b above a
    assert cmap.gap_closed([1.0], [-1.0], [3.0])[0] == 0.5
    assert cmap.gap_closed([0.0], [cmap.MIN_GAP], [0.0])[0] == 0.0  # a gap of exactly MIN_GAP is kept


def frame(gaps: dict[str, float], n: int = 8) -> pl.DataFrame:
    """Source a (LD 2), receiver b (LD 0) on n prompts; each condition closes the given fraction of the gap,
    the last prompt's gap is 0.01 (left out)."""
    rows = []
    for condition, g in gaps.items():
        kind = "target" if condition == "target" else "random"
        for i in range(n):
            source = 2.0 if i < n - 1 else 0.01
            rows.append({"source": "a", "model": "b", "condition": condition, "kind": kind, "prompt_id": i,
                         "ld_patched": g * source, "ld_source": source, "ld_receiver": 0.0})
    return pl.DataFrame(rows)


def test_cmap_table_and_its_null():
    gaps = {"target": 1.0, **{f"random-{i:03d}": 0.1 * i for i in range(9)}}
    table = cmap.cmap_table(frame(gaps), n_boot=100)
    target = table.filter(pl.col("condition") == "target").row(0, named=True)
    assert (target["n_prompts"], target["n_left_out"]) == (7, 1)
    # every kept prompt closes exactly the planted fraction: the mean and both ends of its CI
    assert target["gap_closed"] == target["gap_closed_lo"] == target["gap_closed_hi"] == 1.0
    r3 = table.filter(pl.col("condition") == "random-003").row(0, named=True)
    assert r3["gap_closed"] == pytest.approx(0.3, abs=1e-15)  # (0.3 * 2 - 0) / 2, averaged: a few roundings
    vs = cmap.cmap_vs_controls(table).row(0, named=True)
    assert (vs["source"], vs["model"], vs["n_controls"]) == ("a", "b", 9)
    assert vs["p_greater"] == 1 / 10 and vs["p_empirical"] == 1 / 10  # the target carries more than every random set
    with pytest.raises(ValueError, match="lacks column"):
        cmap.cmap_table(frame(gaps).drop("ld_source"))
    with pytest.raises(ValueError, match="no CMAP rows"):
        cmap.cmap_vs_controls(table.head(0))


QWEN3B = Arch("qwen2", 36, 16, 2, 128, 2048, 11008, 151936, True)


def test_architecture_difference_names_the_field_and_every_value():
    assert architecture_difference({"base": QWEN3B, "r1": QWEN3B}) is None
    # the vocabulary is checked through the tokens, tied embeddings do not move an activation
    assert architecture_difference({"base": QWEN3B, "r1": dataclasses.replace(QWEN3B, vocab_size=152064,
                                                                             tie_word_embeddings=False)}) is None
    other = dataclasses.replace(QWEN3B, n_kv_heads=4)
    assert architecture_difference({"base": QWEN3B, "r1": QWEN3B, "x": other}) == (
        "models differ in n_kv_heads: base 2, r1 2, x 4")


def test_tokenization_difference_names_the_prompt_and_the_first_token():
    where = ["prompts.jsonl:1", "prompts.jsonl:2"]
    same = {"a": [[1, 2, 3], [4, 5]], "b": [[1, 2, 3], [4, 5]]}
    assert tokenization_difference(same, where) is None
    split = {"a": [[1, 2, 3], [4, 5]], "b": [[1, 2, 3], [4, 6, 7]]}
    assert tokenization_difference(split, where) == (
        "prompts.jsonl:2 tokenizes differently: a 2 tokens, b 3 tokens, first difference at token 1 (a 5, b 6)")
    longer = {"a": [[1, 2]], "b": [[1, 2, 9]]}
    assert tokenization_difference(longer, where) == (
        "prompts.jsonl:1 tokenizes differently: a 2 tokens, b 3 tokens, first difference at token 2 (a end, b 9)")
    with pytest.raises(ValueError, match="2 prompts tokenized by a, 1 by b"):
        tokenization_difference({"a": [[1], [2]], "b": [[1]]}, where)


def test_cmap_frame_reads_each_ld_from_its_row():
    """LD_patched from the receiver's cross row, LD_source and LD_receiver from the two models' baselines on the
    same prompt; the source has no cross rows, and rows of other kinds stay out."""
    rows = []
    for model, base in (("a", 2.0), ("b", 0.5), ("c", -1.0)):
        for pid in range(2):
            rows.append({"model": model, "prompt_id": pid, "condition": "baseline", "log_odds": base + pid})
            rows.append({"model": model, "prompt_id": pid, "condition": "target", "log_odds": 9.0})  # zero: not CMAP
            if model != "a":
                rows.append({"model": model, "prompt_id": pid, "condition": "target@cross", "log_odds": base + 10 * pid})
    conditions = pl.DataFrame({"condition": ["baseline", "target", "target@cross"], "kind": ["baseline", "target", "target"],
                               "intervention": ["none", "zero", "cross"]})
    got = cmap.cmap_frame(pl.DataFrame(rows), conditions, "a")
    assert got.columns == list(cmap.CMAP_COLUMNS)
    assert got.rows() == [("a", "b", "target@cross", "target", 0, 0.5, 2.0, 0.5), ("a", "b", "target@cross", "target", 1, 10.5, 3.0, 1.5),
                          ("a", "c", "target@cross", "target", 0, -1.0, 2.0, -1.0), ("a", "c", "target@cross", "target", 1, 9.0, 3.0, 0.0)]
    with pytest.raises(ValueError, match="source model 'r1' has no rows"):
        cmap.cmap_frame(pl.DataFrame(rows), conditions, "r1")
