"""TinyZero's generation prompt and reward (verif.task.tinyzero), and how they differ from our validator."""

import random
import re

import pytest

from verif.model.generate import Sample
from verif.task.countdown import generate_problems, make_attempts
from verif.task.prompt_file import load_prompt_file
from verif.task.validator import Problem, validate
from verif.task.tinyzero import check_answer, extract_answer, generation_prompt, generations_frame, reward

# MISSION.md, "TinyZero's generation prompt", with numbers [79, 17, 60] and target 36.
SEED_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: Using the numbers [79, 17, 60], create an equation that equals 36. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n"
    "<think>"
)


def test_generation_prompt_is_tinyzero_base_template():
    assert generation_prompt((79, 17, 60), 36) == SEED_PROMPT
    assert generation_prompt([5, 100, 7, 3], 9).count("[5, 100, 7, 3]") == 1


@pytest.mark.parametrize(
    "response, answer",
    [
        (" ... </think>\n<answer> (79 - 60) + 17 </answer>", "(79 - 60) + 17"),
        ("<answer>1</answer> then <answer>2 + 3</answer>", "2 + 3"),  # the last one on the line
        ("<answer>1 + 2</answer>\nmore text", None),  # not on the last line: TinyZero finds nothing
        ("<answer>1 +\n2</answer>", None),  # tags do not match across a line break
        ("no answer", None),
    ],
)
def test_extract_answer_follows_tinyzero(response, answer):
    assert extract_answer(response) == answer


def test_reward_scores_like_tinyzero():
    nums, target = (79, 17, 60), 36
    good = reward("<answer>(79 - 60) + 17</answer>", nums, target)
    assert (good.answer, good.correct, good.score, good.reason) == ("(79 - 60) + 17", True, 1.0, "ok")
    wrong = reward("<answer>79 + 60 - 17</answer>", nums, target)
    assert (wrong.correct, wrong.score, wrong.reason) == (False, 0.1, "expression does not equal the target")
    reused = reward("<answer>79 - 60 + 17 + 0</answer>", nums, target)
    assert (reused.correct, reused.score, reused.reason) == (False, 0.1, "numbers used differ from the given numbers")
    claim = reward("<answer>79 - 60 + 17 =</answer>", nums, target)  # an "=" breaks the character rule
    assert (claim.correct, claim.score) == (False, 0.1) and claim.reason.startswith("characters outside")
    assert reward("no tags", nums, target).score == 0.0
    assert reward("<answer>79 / (60 - 60) + 17</answer>", (79, 60, 60, 17), 36).reason == "division by zero"


# TinyZero accepts these; our validator refuses them (its rules are stricter, see validator.validate).
TINYZERO_ONLY = [
    ((2, 3, 4), 12, "2 ** 3 + 4", "operator Pow is not + - * /"),
    ((7, 2, 5), 8, "7 // 2 + 5", "operator FloorDiv is not + - * /"),
    ((3, 5, 7), 14, "-(3 - 5) * 7", "unary operator in the expression"),
    ((1, 5, 2), 3, "1.5 * 2", "Constant not allowed"),  # the digits 1 and 5 count as two numbers
]


@pytest.mark.parametrize("numbers, target, expression, our_reason", TINYZERO_ONLY)
def test_tinyzero_accepts_what_our_validator_refuses(numbers, target, expression, our_reason):
    assert check_answer(expression, numbers, target) == (True, "ok")
    verdict = validate(Problem(numbers, target), f"{expression} = {target}")
    assert (verdict.correct, verdict.reason) == (False, our_reason)


def test_both_refuse_a_leading_zero():
    assert check_answer("07 + 3", (7, 3), 10) == (False, "syntax error")
    assert not validate(Problem((7, 3), 10), "07 + 3 = 10").correct


def test_every_correct_generated_attempt_passes_tinyzero():
    """Our validator is stricter: what it accepts, TinyZero accepts too (expression before '=')."""
    attempts = make_attempts(generate_problems(300, seed=11), seed=11)
    for a in attempts:
        expression = a.text.split("=")[0]
        correct, _ = check_answer(expression, a.problem.numbers, a.problem.target)
        if a.label:
            assert correct, a
        elif a.error_kind in ("number_reused", "foreign_number", "wrong_target"):
            assert not correct, a  # the expression itself is wrong for TinyZero too


def _tinyzero_reference(answer, numbers, target):
    """TinyZero's checker written out with Python's eval (test-only reference)."""
    if sorted(int(n) for n in re.findall(r"\d+", answer)) != sorted(numbers):
        return False
    if not re.match(r"^[\d+\-*/().\s]+$", answer):
        return False
    try:
        value = eval(answer, {"__builtins__": None}, {})  # noqa: S307 -- the reference being reproduced
        return abs(value - target) < 1e-5
    except Exception:
        return False


def _random_expression(rng, numbers):
    """Random TinyZero-alphabet expression over `numbers` (pow only with a one-digit literal exponent,
    so the reference eval stays fast: at most ((100 ** 9) ** 9) ** 9 = 100 ** 729)."""
    leaves = [str(x) for x in numbers]
    rng.shuffle(leaves)

    def build(items):
        if len(items) == 1:
            text = items[0]
            return f"-{text}" if rng.random() < 0.1 else text
        cut = rng.randint(1, len(items) - 1)
        op = rng.choice(["+", "-", "*", "/", "//", "**"] if int(items[-1]) < 10 else ["+", "-", "*", "/", "//"])
        if op == "**":
            cut = len(items) - 1
        left, right = build(items[:cut]), build(items[cut:])
        return f"({left} {op} {right})" if rng.random() < 0.7 else f"{left} {op} {right}"

    return build(leaves)


def test_checker_agrees_with_tinyzero_eval_on_random_expressions():
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        numbers = tuple(rng.choice([rng.randint(1, 9), rng.randint(1, 100)]) for _ in range(rng.randint(2, 4)))
        expression = _random_expression(rng, numbers)
        try:
            value = eval(expression, {"__builtins__": None}, {})  # noqa: S307
            target = round(value.real) + rng.choice([0, 0, 1]) if abs(value) < 1e6 else 1
        except Exception:
            target = 1
        if rng.random() < 0.1:  # sometimes a foreign number
            numbers = numbers[:-1] + (numbers[-1] + 1,)
        expected = _tinyzero_reference(expression, numbers, target)
        assert check_answer(expression, numbers, target)[0] == expected, (expression, numbers, target)
        seen[expected] += 1
    assert min(seen.values()) > 200, seen  # both verdicts well represented


def test_a_tower_of_powers_is_refused_not_computed():
    # TinyZero's eval would try to compute 100 ** (100 ** 100) forever; ours refuses at once.
    assert check_answer("1 ** 100 ** 100 ** 100", (1, 100, 100, 100), 1) == (False, "power larger than 100000 bits")
    assert check_answer("2 ** 100 // 2 ** 99", (2, 100, 2, 99), 2) == (True, "ok")  # big but bounded is computed


def test_generations_frame_scores_samples_and_is_a_prompt_file(tmp_path):
    problems = [Problem((79, 17, 60), 36), Problem((3, 5, 7), 22)]
    samples = [
        Sample(0, 0, " - 79 + 17 = 96 (indented: no attempt line)\n- 79 - 60 + 17 = 19 + 17 = 36 (yes)\n</think>\n<answer>79 - 60 + 17</answer>",
               "stop", 40),
        Sample(0, 1, "- 79 - 17 = 62\n<answer>79 - 17</answer>", "stop", 12),
        Sample(1, 0, "I do not know", "length", 5),
    ]
    frame = generations_frame(problems, samples)
    assert frame["problem_id"].to_list() == [0, 0, 1] and frame["sample"].to_list() == [0, 1, 0]
    assert frame["correct"].to_list() == [True, False, False]
    assert frame["reward"].to_list() == [1.0, 0.1, 0.0]
    assert frame["answer"].to_list() == ["79 - 60 + 17", "79 - 17", None]
    path = tmp_path / "generations.parquet"
    frame.write_parquet(path)
    table = load_prompt_file(path, attempts="all")
    assert table.frame["attempt"].to_list() == ["79 - 60 + 17 = 19 + 17 = 36", "79 - 17 = 62"]
    assert table.frame["source_row"].to_list() == [0, 1] and table.no_attempt_rows == (2,)
