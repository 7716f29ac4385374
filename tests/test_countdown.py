"""Countdown generation, the independent validator, and JSONL loading."""

import itertools
import json
import os
import random
import re
from collections import Counter

import pytest

from verif.task.prompt_file import load_prompt_file
from verif.task.countdown import (
    CORRUPTIONS,
    ERROR_KINDS,
    Attempt,
    Problem,
    Verdict,
    correct_line,
    corruptions,
    find_solution,
    generate_problems,
    iter_problems,
    make_attempts,
    validate,
)

SEED_PROBLEM = Problem((79, 17, 60), 36)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# ------------------------------------------------------------------ problems


def test_generate_problems_is_deterministic_from_seed():
    a, b = generate_problems(200, seed=3), generate_problems(200, seed=3)
    assert a == b and [p.solution for p in a] == [p.solution for p in b]
    assert generate_problems(200, seed=4) != a


def test_generate_problems_shapes():
    problems = generate_problems(1000, seed=0)
    assert len(problems) == 1000
    for p in problems:
        assert len(p.numbers) in (3, 4)
        assert all(type(x) is int and 1 <= x <= 100 for x in p.numbers)
        assert type(p.target) is int and 1 <= p.target <= 1000
    sizes = Counter(len(p.numbers) for p in problems)
    assert 400 < sizes[3] < 600
    assert {len(p.numbers) for p in generate_problems(50, seed=0, sizes=(4,))} == {4}
    assert max(p.target for p in generate_problems(200, seed=0, max_target=50)) <= 50


def test_every_generated_problem_has_a_validating_solution():
    for p in generate_problems(2000, seed=1):
        assert validate(p, f"{p.solution} = {p.target}").correct, p


def test_find_solution_solves_a_problem_without_stored_solution():
    solution = find_solution(SEED_PROBLEM)
    assert solution is not None
    assert validate(SEED_PROBLEM, f"{solution} = 36").correct


def test_find_solution_returns_none_when_unreachable():
    assert find_solution(Problem((1, 1, 1), 999)) is None


# ------------------------------------------------------------------ step convention


@pytest.mark.parametrize(
    "numbers, target, solution, line",
    [
        ((79, 17, 60), 36, "79 - 60 + 17", "79 - 60 + 17 = 19 + 17 = 36"),
        ((2, 3, 4), 14, "2 + 3 * 4", "2 + 3 * 4 = 2 + 12 = 14"),
        ((1, 2, 3, 4), 21, "(1 + 2) * (3 + 4)",
         "(1 + 2) * (3 + 4) = 3 * (3 + 4) = 3 * 7 = 21"),
        ((15, 2, 4), 30, "15 / 2 * 4", "15 / 2 * 4 = 7.5 * 4 = 30"),
        ((54, 56, 73), 71, "54 - (56 - 73)", "54 - (56 - 73) = 54 - (-17) = 71"),
        ((17, 60, 79), 36, "17 - 60 + 79", "17 - 60 + 79 = -43 + 79 = 36"),
        ((1, 8, 16), 2, "1 / 8 * 16", "1 / 8 * 16 = 0.125 * 16 = 2"),
        ((20, 5, 2, 8, 4), 6, "20 - (5 + 2) * 8 / 4",
         "20 - (5 + 2) * 8 / 4 = 20 - 7 * 8 / 4 = 20 - 56 / 4 = 20 - 14 = 6"),
    ],
)
def test_correct_attempts_reduce_leftmost_innermost_operation_first(
    numbers, target, solution, line
):
    (attempt,) = make_attempts([Problem(numbers, target, solution)], seed=0, p_correct=1.0)
    assert attempt.text == line
    assert attempt.label and attempt.error_kind == "none"


# ------------------------------------------------------------------ validator edge cases


def test_seed_example_is_correct():
    assert validate(SEED_PROBLEM, "79 - 60 + 17 = 19 + 17 = 36") == validate(
        SEED_PROBLEM, "79 - 60 + 17 = 36"
    )
    assert validate(SEED_PROBLEM, "79 - 60 + 17 = 19 + 17 = 36").correct


def test_division_by_zero_is_incorrect():
    verdict = validate(Problem((5, 5, 3), 3), "3 + 5 / (5 - 5) = 3")
    assert not verdict.correct and verdict.reason == "division by zero"
    assert not validate(Problem((5, 5, 3), 0), "(5 - 5) * 3 = 0 * 3 = 3 / 0").correct


def test_fractional_intermediates_are_allowed():
    assert validate(Problem((15, 2, 4), 30), "15 / 2 * 4 = 7.5 * 4 = 30").correct
    assert validate(Problem((1, 3, 3), 1), "1 / 3 * 3 = 1").correct  # non-terminating


def test_decimal_step_within_tolerance_is_accepted_and_beyond_is_not():
    assert validate(Problem((1, 3, 3), 1), "1 / 3 * 3 = 0.333333 * 3 = 1").correct
    assert not validate(Problem((1, 3, 3), 1), "1 / 3 * 3 = 0.33 * 3 = 1").correct


def test_leading_zero_number_is_incorrect():
    verdict = validate(Problem((7, 3, 2), 12), "07 + 3 + 2 = 12")
    assert not verdict.correct and "leading zero" in verdict.reason
    assert not validate(Problem((7, 3, 2), 12), "7 + 3 + 2 = 010 + 2 = 12").correct
    assert validate(Problem((1, 2, 30), 15), "1 / 2 * 30 = 0.5 * 30 = 15").correct


def test_power_and_floor_division_are_incorrect_stricter_than_tinyzero():
    assert not validate(Problem((2, 3, 1), 8), "2 ** 3 * 1 = 8").correct
    assert not validate(Problem((7, 2, 1), 3), "7 // 2 * 1 = 3").correct


def test_unary_minus_in_expression_is_incorrect():
    verdict = validate(Problem((3, 5, 2), 7), "-3 + 5 * 2 = 7")
    assert not verdict.correct and "unary" in verdict.reason
    assert not validate(Problem((3, 5, 2), 13), "5 * 2 - -3 = 13").correct
    assert not validate(Problem((3, 5, 2), 13), "+3 + 5 * 2 = 13").correct


def test_unary_minus_in_steps_is_allowed():
    assert validate(Problem((17, 60, 79), 36), "17 - 60 + 79 = -43 + 79 = 36").correct
    assert not validate(Problem((17, 60, 79), 36), "17 - 60 + 79 = +19 + 17 = 36").correct


def test_extra_number_is_incorrect():
    verdict = validate(SEED_PROBLEM, "79 - 60 + 17 + 1 - 1 = 36")
    assert not verdict.correct and "numbers" in verdict.reason


def test_missing_reused_and_foreign_numbers_are_incorrect():
    assert not validate(Problem((79, 17, 60, 2), 36), "79 - 60 + 17 = 36").correct
    assert not validate(SEED_PROBLEM, "79 - 60 + 17 + 17 - 17 = 36").correct
    assert not validate(SEED_PROBLEM, "79 - 60 + 17 * 1 = 36").correct
    assert not validate(SEED_PROBLEM, "79 - 43 = 36").correct


def test_repeated_given_numbers_must_be_used_as_often_as_given():
    assert validate(Problem((9, 9, 62), 477), "9 * (62 - 9) = 9 * 53 = 477").correct
    assert not validate(Problem((9, 9, 62), 71), "9 + 62 = 71").correct


def test_decimal_literal_in_expression_is_incorrect():
    assert not validate(SEED_PROBLEM, "79.0 - 60 + 17 = 36").correct


def test_parenthesised_numbers_are_fine():
    assert validate(SEED_PROBLEM, "(79) - (60) + 17 = 36").correct


def test_wrong_intermediate_step_is_incorrect():
    verdict = validate(SEED_PROBLEM, "79 - 60 + 17 = 29 + 17 = 36")
    assert not verdict.correct and verdict.reason == "step 1 differs from the expression"


def test_false_claim_and_honest_wrong_value_are_incorrect():
    assert not validate(SEED_PROBLEM, "79 - 60 + 17 = 19 + 17 = 37").correct
    verdict = validate(Problem((79, 17, 60), 37), "79 - 60 + 17 = 19 + 17 = 36")
    assert not verdict.correct and verdict.reason == "expression does not equal the target"


def test_attempt_without_claimed_result_is_incorrect():
    assert validate(SEED_PROBLEM, "79 - 60 + 17").reason == "no claimed result (no '=')"


@pytest.mark.parametrize(
    "text",
    ["abs(79) - 60 + 17 = 36", "79 - 60 + 17 = x", "__import__('os') = 36",
     "79 - 60 + 17 = = 36", "79 60 17 = 36", "79 - 60 + 17 =", "79 -* 60 + 17 = 36"],
)
def test_malformed_text_is_incorrect_never_evaluated(text):
    assert not validate(SEED_PROBLEM, text).correct


def test_absurdly_long_expression_is_incorrect_not_an_error():
    verdict = validate(Problem((1,), 5001), "1" + " + 1" * 5000 + " = 5001")
    assert verdict == Verdict(False, "expression too long to evaluate")


# ------------------------------------------------------------------ attempts

EXPECTED_REASON = {
    "arithmetic_slip": r"step \d+ differs from the expression",
    "false_claim": r"claimed result differs from the expression",
    "wrong_target": r"expression does not equal the target",
    "number_reused": r"numbers used differ from the given numbers",
    "foreign_number": r"numbers used differ from the given numbers",
}


@pytest.fixture(scope="module")
def attempts() -> list[Attempt]:
    return make_attempts(generate_problems(2000, seed=11), seed=12)


def test_generator_intent_agrees_with_validator_on_every_attempt(attempts):
    for a in attempts:
        verdict = validate(a.problem, a.text)
        assert a.label == verdict.correct == (a.error_kind == "none"), a
        if a.error_kind != "none":
            assert re.fullmatch(EXPECTED_REASON[a.error_kind], verdict.reason), (a, verdict)


def test_incorrect_kinds_have_their_defining_features(attempts):
    for a in attempts:
        claim = a.text.rsplit("=", 1)[1].strip()
        used = Counter(_ints(a.text.split("=")[0]))
        given = Counter(a.problem.numbers)
        if a.error_kind == "wrong_target":
            assert claim != str(a.problem.target)
        else:
            assert claim == str(a.problem.target), a
        if a.error_kind == "number_reused":
            assert used != given and set(used) <= set(given), a
        if a.error_kind == "foreign_number":
            assert set(used) - set(given), a
        if a.error_kind in ("none", "arithmetic_slip", "false_claim", "wrong_target"):
            assert used == given, a


def test_p_correct_and_balanced_kinds(attempts):
    counts = Counter(a.error_kind for a in attempts)
    assert counts["none"] == 1000
    kind_counts = [counts[k] for k in ERROR_KINDS]
    assert sum(kind_counts) == 1000 and max(kind_counts) - min(kind_counts) <= 3


def test_make_attempts_is_deterministic_from_seed():
    problems = generate_problems(100, seed=5)
    assert make_attempts(problems, seed=1) == make_attempts(problems, seed=1)
    assert make_attempts(problems, seed=1) != make_attempts(problems, seed=2)


def test_p_correct_extremes_and_kind_subset():
    problems = generate_problems(100, seed=6)
    assert all(a.label for a in make_attempts(problems, seed=0, p_correct=1.0))
    only = make_attempts(problems, seed=0, kinds=("wrong_target",), p_correct=0.0)
    assert {a.error_kind for a in only} == {"wrong_target"} and not any(a.label for a in only)


@pytest.mark.parametrize("kwargs", [{"p_correct": 1.5}, {"kinds": ("typo",)}, {"kinds": ()}])
def test_make_attempts_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_attempts(generate_problems(5, seed=0), seed=0, **kwargs)


def test_make_attempts_finds_a_solution_when_none_is_stored():
    (attempt,) = make_attempts([SEED_PROBLEM], seed=0, p_correct=1.0)
    assert attempt.label and validate(SEED_PROBLEM, attempt.text).correct


def test_make_attempts_refuses_a_wrong_stored_solution():
    with pytest.raises(ValueError, match="does not solve"):
        make_attempts([Problem((79, 17, 60), 36, "79 + 60 - 17")], seed=0, p_correct=1.0)


# ------------------------------------------------------------------ corruptions (counterfactual pairs)


def test_iter_problems_starts_with_generate_problems():
    assert list(itertools.islice(iter_problems(seed=3), 50)) == generate_problems(50, seed=3)


@pytest.fixture(scope="module")
def corrupted() -> list[tuple[Problem, str, str, Problem, str]]:
    """(problem, correct line, kind, corrupted problem, corrupted line): the first 5 candidates of
    every kind on 200 problems."""
    rng = random.Random(0)
    out = []
    for p in generate_problems(200, seed=21):
        correct = correct_line(p)
        for kind in CORRUPTIONS:
            out += [(p, correct, kind, q, text) for q, text in itertools.islice(corruptions(rng, p, kind), 5)]
    return out


NO_SLIP = Problem((15, 55, 11), 3, "11 * 15 / 55")
"""11 * 15 / 55 = 165 / 55 = 3: no literal in 155..175 but 165 divides by 55 to at most three decimals,
so it has no arithmetic slip (make_attempts gives it another kind, make_pairs skips it)."""


def test_almost_every_problem_carries_every_corruption(corrupted):
    carried = Counter(kind for kind, _ in {(kind, id(p)) for p, _, kind, _, _ in corrupted})
    assert carried == {"claim": 200, "operand": 200, "target": 200, "intermediate": 199}
    assert NO_SLIP in generate_problems(200, seed=21)
    assert not list(corruptions(random.Random(0), NO_SLIP, "intermediate"))


def test_correct_line_is_the_correct_attempt_make_attempts_writes():
    for p in generate_problems(30, seed=4):
        (a,) = make_attempts([p], seed=0, p_correct=1.0)
        assert correct_line(p) == a.text and validate(p, a.text).correct


def test_corruptions_are_the_error_kinds_they_map_to(corrupted):
    for p, correct, kind, q, text in corrupted:
        verdict = validate(q, text)
        assert not verdict.correct and re.fullmatch(EXPECTED_REASON[CORRUPTIONS[kind]], verdict.reason), (kind, text)


def test_a_corruption_changes_one_number(corrupted):
    """The target kind changes only the target (by 1..10); every other kind one contiguous run of number characters
    of the line (a sign and its brackets included: a slip from 3 to -2 writes (-2))."""
    for p, correct, kind, q, text in corrupted:
        if kind == "target":
            assert text == correct and q.numbers == p.numbers and 1 <= abs(q.target - p.target) <= 10
            continue
        assert q == p
        head = len(os.path.commonprefix([correct, text]))
        tail = len(os.path.commonprefix([correct[head:][::-1], text[head:][::-1]]))
        was, now = correct[head:len(correct) - tail], text[head:len(text) - tail]
        assert was != now and re.fullmatch(r"[\d.()-]*", was) and re.fullmatch(r"[\d.()-]*", now), (correct, text)
        if kind == "operand":
            used = Counter(_ints(text.split("=")[0]))
            assert sum((used - Counter(p.numbers)).values()) == 1 and set(used) - set(p.numbers), text


def test_unknown_corruption_is_refused():
    with pytest.raises(ValueError, match="unknown corruption 'typo'; known: claim, intermediate"):
        next(corruptions(random.Random(0), SEED_PROBLEM, "typo"))


# ------------------------------------------------------------------ JSONL


def _write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "attempts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_attempts_labels_with_validator(tmp_path):
    rows = [
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 19 + 17 = 36"},
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 29 + 17 = 36",
         "error_kind": "arithmetic_slip"},
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 + 17 = 96"},
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 + 17 = 96", "error_kind": "none"},
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 36",
         "error_kind": "false_claim"},
    ]
    path = _write_lines(tmp_path, [json.dumps(rows[0]), "", "   "]
                        + [json.dumps(r) for r in rows[1:]])
    loaded = load_prompt_file(path).attempts
    assert [(a.label, a.error_kind) for a in loaded] == [
        (True, "none"), (False, "arithmetic_slip"), (False, "unknown"), (False, "unknown"),
        (True, "none"),
    ]
    assert loaded[0].problem == SEED_PROBLEM and loaded[0].text == rows[0]["attempt"]


def test_prompt_file_attempts_round_trips_generated_attempts(tmp_path, attempts):
    sample = attempts[:200]
    path = _write_lines(tmp_path, [
        json.dumps({"numbers": list(a.problem.numbers), "target": a.problem.target,
                    "attempt": a.text, "error_kind": a.error_kind}) for a in sample
    ])
    assert load_prompt_file(path).attempts == sample


GOOD = '{"numbers": [1, 2, 3], "target": 6, "attempt": "1 + 2 + 3 = 6"}'


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"numbers": [1, 2, 3], "target": 6', "invalid JSON"),
        ('[1, 2, 3]', "expected a JSON object"),
        ('{"numbers": [1, 2, 3], "attempt": "1 + 2 + 3 = 6"}', "missing field 'target'"),
        ('{"target": 6, "attempt": "1 + 2 + 3 = 6"}', "missing field 'numbers'"),
        ('{"numbers": [1, 2, 3], "target": 6}', "missing field 'attempt'"),
        ('{"numbers": "1 2 3", "target": 6, "attempt": "x"}', "'numbers' must be"),
        ('{"numbers": [1, 2.5, 3], "target": 6, "attempt": "x"}', "'numbers' must be"),
        ('{"numbers": [], "target": 6, "attempt": "x"}', "'numbers' must be"),
        ('{"numbers": [1, 2, 3], "target": 6.0, "attempt": "x"}', "'target' must be"),
        ('{"numbers": [1, 2, 3], "target": true, "attempt": "x"}', "'target' must be"),
        ('{"numbers": [1, 2, 3], "target": 6, "attempt": 6}', "'attempt' must be"),
        ('{"numbers": [1, 2, 3], "target": 6, "attempt": "x", "error_kind": 1}',
         "'error_kind' must be"),
    ],
)
def test_prompt_file_attempts_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = _write_lines(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError) as err:
        load_prompt_file(path).attempts
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
