"""TinyZero's generation prompt and reward: what the R1 model was trained on and scored by.

The reward reproduces TinyZero's Countdown checker rule for rule, on top of the project's one safe
walker (`validator.walk_arithmetic`, never `eval`):

1. the answer is the last ``<answer> ... </answer>`` on the *last line* of the response (TinyZero
   splits off the prompt at "Assistant:" and keeps only the final line; the tags do not match
   across a line break), stripped; none found scores 0;
2. the integers in it (``re.findall(r"\\d+")``, so ``1.5`` counts as 1 and 5) must be exactly the
   given multiset;
3. it must match ``^[\\d+\\-*/().\\s]+$`` and evaluate without error, with Python's own arithmetic
   (the operators this alphabet spells: ``+ - * / // **``, unary ``+ -``, int and float literals);
4. correct when ``abs(value - target) < 1e-5``: score 1, else (2 or 3 failed, or off target) 0.1.

Where this differs from our attempt validator (`validator.validate`), on purpose, since R1 was
rewarded by these rules and our labels answer "is this attempt right" (see `validate`):
TinyZero accepts ``**``, ``//``, unary minus/plus (``-(3 - 5) * 7``), and decimal literals whose
digit groups are the given numbers (``1.5`` for 1 and 5); it checks a bare expression (an ``=``
fails its character rule) and evaluates in floats, not exact fractions. One deliberate departure
from TinyZero: an integer power whose result would exceed MAX_POW_BITS bits is refused as
incorrect, where TinyZero's ``eval`` would try to compute it (``100 ** 100 ** 100`` never
finishes).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import polars as pl

from verif.task.validator import ALLOWED_CHARS, TOLERANCE, Problem, Rejected, walk_arithmetic

if TYPE_CHECKING:  # the model layer's sample type; the task layer never imports the model layer
    from verif.model.generate import Sample

PROMPT_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.\n"
    "User: Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n"
    "<think>"
)
"""TinyZero's "base" template; the model continues right after ``<think>`` (no line break)."""

STOP = "</answer>"
CORRECT_SCORE, FORMAT_SCORE = 1.0, 0.1
MAX_POW_BITS = 100_000
"""Largest integer power computed (in bits, ~30,000 digits, microseconds); beyond it TinyZero's eval
would stall, and with Countdown's 3-4 numbers nothing left could bring such a value back to a target."""

_ANSWER = re.compile(r"<answer>(.*?)</answer>")
_PY_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_PY_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def generation_prompt(numbers: Sequence[int], target: int) -> str:
    """TinyZero's prompt for one problem, numbers printed as a Python list (``[79, 17, 60]``)."""
    return PROMPT_TEXT.format(numbers=str([int(x) for x in numbers]), target=int(target))


def extract_answer(response: str) -> str | None:
    """The last ``<answer>`` of the response's last line, stripped (TinyZero's extraction)."""
    found = _ANSWER.findall(response.split("\n")[-1])
    return found[-1].strip() if found else None


def _pow(base: Any, exponent: Any) -> Any:
    if type(base) is int and type(exponent) is int and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_POW_BITS:
            raise Rejected(f"power larger than {MAX_POW_BITS} bits")
    return base**exponent


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    if isinstance(op, ast.Pow):
        return _pow(left, right)
    apply = _PY_BINOPS.get(type(op))
    if apply is None:  # not reachable through the character rule; kept so the walker stays closed
        raise Rejected(f"operator {type(op).__name__} not allowed")
    return apply(left, right)


def _unary(op: ast.unaryop, value: Any) -> Any:
    apply = _PY_UNARY.get(type(op))
    if apply is None:
        raise Rejected(f"operator {type(op).__name__} not allowed")
    return apply(value)


def _literal(node: ast.Constant) -> Any:
    if type(node.value) in (int, float):
        return node.value
    raise Rejected(f"constant {node.value!r} not allowed")


def evaluate(expression: str) -> Any:
    """Value of `expression` as TinyZero's restricted ``eval`` computes it; raises Rejected when
    TinyZero's evaluation fails (bad characters, syntax, division by zero, overflow, an operation
    Python refuses). Values are Python's: int, float, or complex (``(-8) ** 0.5``), as eval gives."""
    if not ALLOWED_CHARS.match(expression):
        raise Rejected("characters outside digits, + - * / ( ) . and spaces")
    try:
        return walk_arithmetic(expression, _binop, _unary, _literal)
    except ZeroDivisionError:
        raise Rejected("division by zero") from None
    except OverflowError:
        raise Rejected("overflow") from None
    except TypeError as e:  # e.g. floor division of the complex value of (-8) ** 0.5
        raise Rejected(f"invalid operation ({e})") from None
    except RecursionError:
        raise Rejected("expression too long to evaluate") from None


@dataclass(frozen=True)
class Reward:
    """TinyZero's verdict on one response: the extracted answer, whether it is correct, the score
    TinyZero's reward gives (1, 0.1 or 0) and the first rule broken ("ok" if none)."""

    answer: str | None
    correct: bool
    score: float
    reason: str


def check_answer(answer: str, numbers: Sequence[int], target: int) -> tuple[bool, str]:
    """TinyZero's checker on an extracted answer: (correct, reason)."""
    if sorted(int(n) for n in re.findall(r"\d+", answer)) != sorted(numbers):
        return False, "numbers used differ from the given numbers"
    try:
        value = evaluate(answer)
    except Rejected as reject:
        return False, str(reject)
    if not abs(value - target) < TOLERANCE:
        return False, "expression does not equal the target"
    return True, "ok"


def reward(response: str, numbers: Sequence[int], target: int) -> Reward:
    """TinyZero's reward for a generated continuation (the text after the prompt's ``<think>``)."""
    answer = extract_answer(response)
    if answer is None:
        return Reward(None, False, 0.0, "no <answer> on the last line")
    correct, reason = check_answer(answer, numbers, target)
    return Reward(answer, correct, CORRECT_SCORE if correct else FORMAT_SCORE, reason)


GENERATION_SCHEMA = {
    "problem_id": pl.Int64,
    "sample": pl.Int64,
    "nums": pl.List(pl.Int64),
    "target": pl.Int64,
    "output_text": pl.String,
    "finish": pl.String,
    "n_new_tokens": pl.Int64,
    "answer": pl.String,
    "correct": pl.Boolean,
    "reward": pl.Float64,
    "reason": pl.String,
}
"""One row per generated sample, scored by TinyZero's reward. `nums`, `target` and `output_text`
make the frame, written as parquet, a valid `prompts.file` of model outputs."""


def generations_frame(problems: Sequence[Problem], samples: Iterable["Sample"]) -> pl.DataFrame:
    """The samples of `verif.model.generate.generate` run on `generation_prompt`s of `problems`
    (sample.prompt_index indexes `problems`), each scored by TinyZero's reward."""
    rows = []
    for s in samples:
        problem = problems[s.prompt_index]
        r = reward(s.text, problem.numbers, problem.target)
        rows.append((s.prompt_index, s.sample, list(problem.numbers), problem.target, s.text, s.finish,
                     s.n_new_tokens, r.answer, r.correct, r.score, r.reason))
    return pl.DataFrame(rows, schema=GENERATION_SCHEMA, orient="row")
