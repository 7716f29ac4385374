"""Counterfactual pairs (verif.task.pairs, wired by jobs.prepare.build_prompts): generated with real
tokenizers, redraws counted, pairs from a prompts.file checked, and resample refused without pairs.

The two real tokenizers are the offline Qwen2.5 one and SmolLM2's (the `smollm2` session fixture, loaded
anyway by the engine tests in each test process). Token counts are recomputed here with each tokenizer
directly, not with jobs.prepare.token_counts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from jobs.config import ConfigError, load_config
from jobs.prepare import PrepareError, build_prompts
from jobs.sweep import prepare
from tests.support.sweeps import sweep_overrides
from verif.task.countdown import CORRUPTIONS, Problem, generate_problems, iter_problems, make_attempts
from verif.task.pairs import MAX_SKIPPED, make_pairs
from verif.task.prompts import STUDY

N_PAIRS = 40  # 10 of each corruption kind


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def _render(problem: Problem, attempt: str) -> str:
    return STUDY.render(problem.numbers, problem.target, attempt)


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer, smollm2) -> dict:
    return {"qwen2.5": qwen_tokenizer, "smollm2": smollm2.tokenizer}


@pytest.fixture(scope="module")
def generated(tokenizers):
    return build_prompts(load_config(None, ["prompts.pairs=true", f"prompts.n={N_PAIRS}"]), tokenizers)


# --------------------------------------------------------------------------------------------
# generated pairs
# --------------------------------------------------------------------------------------------


def test_every_generated_pair_has_equal_length_in_both_tokenizers(generated, tokenizers):
    frame, source, _ = generated
    assert frame["pair_id"].to_list() == [i // 2 for i in range(2 * N_PAIRS)]
    for pid in range(N_PAIRS):
        correct, incorrect = frame.filter(pl.col("pair_id") == pid).iter_rows(named=True)
        assert (correct["label"], incorrect["label"], correct["error_kind"]) == (True, False, "none")
        assert correct["prompt"] != incorrect["prompt"]
        for name, tok in tokenizers.items():
            assert _n_tokens(tok, correct["prompt"]) == _n_tokens(tok, incorrect["prompt"]), (name, pid)
    kinds = Counter(frame.filter(~pl.col("label"))["error_kind"])
    assert kinds == {CORRUPTIONS[k]: N_PAIRS // 4 for k in CORRUPTIONS}
    assert source.pairs["by_corruption"] == {k: N_PAIRS // 4 for k in CORRUPTIONS}


def test_pair_redraws_are_in_the_run_report(generated):
    record = generated[1].pairs
    assert record["redrawn"] >= max(record["redrawn_by_model"].values()) > 0  # digit counts change at times
    assert (f"counterfactual pairs: {N_PAIRS} (claim 10, intermediate 10, operand 10, target 10); "
            f"{record['redrawn']} candidates redrawn for unequal token length (differed in: qwen2.5 "
            f"{record['redrawn_by_model']['qwen2.5']}, smollm2 {record['redrawn_by_model']['smollm2']}); "
            f"{record['problems_skipped']} problems skipped") in generated[1].lines()


def test_every_candidate_of_unequal_length_is_counted_as_redrawn():
    """With length = characters: each pair has equal character counts, and the length function was
    called once per problem tried and once per candidate (accepted or redrawn)."""
    calls = []

    def chars(text: str) -> int:
        calls.append(text)
        return len(text)

    made = make_pairs(iter_problems(0), 30, 0, _render, {"chars": chars, "none": lambda text: 0})
    for pair in made.pairs:
        assert len(_render(pair.correct.problem, pair.correct.text)) == len(_render(pair.incorrect.problem,
                                                                                    pair.incorrect.text))
    assert made.redrawn > 0 and made.redrawn_by_model == {"chars": made.redrawn, "none": 0}
    assert len(calls) == (30 + made.problems_skipped) + 30 + made.redrawn


def test_a_problem_without_a_fitting_corruption_is_skipped():
    no_slip = Problem((15, 55, 11), 3, "11 * 15 / 55")  # no arithmetic slip (tests/test_countdown.py)
    rest = generate_problems(3, seed=1)
    made = make_pairs(iter([no_slip, *rest]), 2, 0, _render, {}, kinds=("intermediate",))
    assert made.problems_skipped == 1 and [p.correct.problem for p in made.pairs] == rest[:2]


def test_no_fitting_candidate_is_an_error_not_an_endless_search():
    with pytest.raises(ValueError, match=f"{MAX_SKIPPED} problems in a row have no 'claim' corruption"):
        make_pairs(iter_problems(0), 1, 0, _render, {"unique": hash}, kinds=("claim",))
    with pytest.raises(ValueError, match="the problems ran out after 1 of 2 pairs"):
        make_pairs(iter(generate_problems(1, seed=0)), 2, 0, _render, {})


def test_default_prompts_have_no_pairs_and_the_attempts_of_make_attempts():
    frame, source, _ = build_prompts(load_config(None, []), {})
    assert frame["attempt"].to_list() == [a.text for a in make_attempts(generate_problems(64, 0), seed=0)]
    assert frame["pair_id"].null_count() == 64 and source.pairs is None


@pytest.mark.parametrize("value, message", [
    ("[claim, typo]", "prompts.corruption: unknown corruption 'typo'; valid: claim, intermediate, operand, target"),
    ("[claim, claim]", "prompts.corruption: must be a non-empty list of distinct kinds among claim, intermediate"),
    ("[]", "prompts.corruption: must be a non-empty list of distinct kinds"),
])
def test_corruption_kinds_are_checked_with_the_config(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"prompts.corruption={value}"])


def test_corruption_kinds_choose_the_pairs(tokenizers):
    frame, source, _ = build_prompts(load_config(None, ["prompts.pairs=true", "prompts.n=6",
                                                        "prompts.corruption=[target, claim]"]), tokenizers)
    assert source.pairs["by_corruption"] == {"target": 3, "claim": 3}
    assert Counter(frame["error_kind"]) == {"none": 6, "wrong_target": 3, "false_claim": 3}


def test_pairs_with_another_p_correct_are_refused():
    with pytest.raises(PrepareError, match=r"prompts.p_correct 0.3: with prompts.pairs every problem gives one"):
        build_prompts(load_config(None, ["prompts.pairs=true", "prompts.p_correct=0.3"]), {})


def test_a_sweep_plan_keeps_whole_pairs_when_prompts_are_too_long(seed_model_dir, qwen_tokenizer, monkeypatch):
    """The sweep's plan holds the pairs (its tokenizers come before its prompts), and prompts.too_long=skip
    drops every prompt over prompts.max_tokens: both prompts of a pair have the same length in every
    model, so a pair is dropped whole or kept whole. The seed model's tokenizer is the session's Qwen2.5
    one (tests.support.models saves it there), given to the plan instead of loaded again (seconds)."""
    monkeypatch.setattr("jobs.prepare.check_tokens", lambda sources, cfg: [qwen_tokenizer] * len(sources))
    overrides = sweep_overrides(seed_model_dir, "prompts.pairs=true", "prompts.n=12", "prompts.too_long=skip")
    prompts, _, _ = build_prompts(load_config(None, overrides), {"seed": qwen_tokenizer})
    limit = sorted(_n_tokens(qwen_tokenizer, p) for p in prompts["prompt"])[12]
    plan = prepare(load_config(None, [*overrides, f"prompts.max_tokens={limit}"]))
    assert plan.prompt_source.pairs["n_pairs"] == 12 and plan.prompt_source.pairs["problems_skipped"] == 0
    assert list(plan.prompt_source.pairs["redrawn_by_model"]) == plan.model_names  # lengths checked in its model
    assert 0 < plan.prompts.height < 24 and len(plan.prompt_source.too_long) == 24 - plan.prompts.height
    assert set(Counter(plan.prompts["pair_id"]).values()) == {2}
    assert plan.prompts["prompt_id"].to_list() == list(range(plan.prompts.height))


# --------------------------------------------------------------------------------------------
# pairs from a prompts.file
# --------------------------------------------------------------------------------------------

RIGHT = {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 19 + 17 = 36"}
WRONG = {**RIGHT, "attempt": "79 - 60 + 17 = 19 + 17 = 37"}  # one digit changed: the same length
LONGER = {**RIGHT, "attempt": "79 - 60 + 17 = 19 + 17 = 360"}


def _file_cfg(path: str, *extra: str):
    return load_config(None, [f"prompts.file={path}", *extra])


def test_pairs_of_a_file_are_read(tmp_path, tokenizers):
    path = _jsonl(tmp_path / "pairs.jsonl", [{**RIGHT, "pair_id": 7}, {**WRONG, "pair_id": 7},
                                             {**WRONG, "pair_id": 3}, {**RIGHT, "pair_id": 3}])
    frame, source, _ = build_prompts(_file_cfg(path, "prompts.pairs=true"), tokenizers)
    assert frame["pair_id"].to_list() == [7, 7, 3, 3] and frame["label"].to_list() == [True, False, False, True]
    assert source.pairs == {"n_pairs": 2} and "counterfactual pairs: 2 (pair_id of prompts.file)" in source.lines()


@pytest.mark.parametrize("records, extra, error, message", [
    ([{**RIGHT, "pair_id": 0}, {**LONGER, "pair_id": 0}], (), PrepareError,
     r"pairs.jsonl:1 and \S*pairs.jsonl:2: the prompts of pair_id 0 have (\d+) and (?!\1)\d+ tokens in qwen2.5; a "
     r"pair's prompts must have the same token length in every model"),
    ([{**RIGHT, "pair_id": 0}, {**WRONG, "pair_id": 0}, {**WRONG, "pair_id": 0}], (), ValueError,
     r"pairs.jsonl:1, \S*pairs.jsonl:2, \S*pairs.jsonl:3: pair_id 0 has 3 rows; a pair is exactly two"),
    ([{**RIGHT, "pair_id": 0}, {**RIGHT, "pair_id": 0}], (), ValueError,
     r"pairs.jsonl:2: pair_id 0 holds two correct attempts"),
    ([{**RIGHT, "pair_id": 0}, {**WRONG, "pair_id": 0}, RIGHT], (), ValueError,
     r"pairs.jsonl:3: no pair_id, while other rows have one"),
    ([{**RIGHT, "pair_id": "a"}], (), ValueError, r"pairs.jsonl:1: 'pair_id' must be an integer or null, got 'a'"),
    ([{"nums": [1, 2], "target": 3, "output_text": "- 1 + 2 = 3", "pair_id": 0}], (), ValueError,
     r"pairs.jsonl:1: a pair_id pairs attempts, and this file holds model outputs"),
    ([RIGHT, WRONG], ("prompts.pairs=true",), PrepareError,
     r"prompts.pairs is true, but prompts.file .* has no pair_id"),
])
def test_bad_pairs_of_a_file_are_named(tmp_path, tokenizers, records, extra, error, message):
    """ValueError: the file's reader refuses it (the jobs turn it into one line before torch loads,
    tests/test_bad_input.py); PrepareError (one line too) once the tokenizers are known."""
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(error, match=message):
        build_prompts(_file_cfg(path, *extra), tokenizers)


