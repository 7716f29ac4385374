"""The independent validator of Countdown attempts, and the one safe arithmetic walker.

An attempt line is ``expression = step = ... = claimed value`` (R1's style, see
``verif.task.countdown``). :func:`validate` parses the text itself and decides whether it is a
correct attempt for the problem. It shares no evaluation code with the attempt generator in
``countdown`` (which computes with its own expression trees), so a generator bug shows up as a
disagreement between an attempt's ``error_kind`` and its ``label`` (tested). The tree walker
under it, :func:`walk_arithmetic`, also evaluates TinyZero's answers (``verif.task.tinyzero``)
with other rules for operators and literals.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

TOLERANCE = 1e-5
"""TinyZero's acceptance threshold, applied to every comparison below."""

ALLOWED_CHARS = re.compile(r"^[\d+\-*/().\s]+$")  # TinyZero's expression regex
_LEADING_ZERO = re.compile(r"(?<![\d.])0\d")


@dataclass(frozen=True)
class Problem:
    """A Countdown problem. ``solution`` is a known expression, kept so correct
    attempts can be written without a search; it is not part of equality."""

    numbers: tuple[int, ...]
    target: int
    solution: str = field(default="", compare=False)


@dataclass(frozen=True)
class Verdict:
    """Validator outcome; ``reason`` names the first rule broken (``"ok"`` if none)."""

    correct: bool
    reason: str


class Rejected(Exception):
    """An expression broke a rule of the evaluator; the message is the reason."""


def walk_arithmetic(
    source: str,
    binop: Callable[[ast.operator, Any, Any], Any],
    unary: Callable[[ast.unaryop, Any], Any],
    literal: Callable[[ast.Constant], Any],
) -> Any:
    """Evaluate ``source`` by walking its syntax tree -- never ``eval``.

    Only binary operations, unary operations and constants are walked; any other
    node (names, calls, tuples, comparisons) raises :class:`Rejected`, as does a
    syntax error. What an operator or a literal means is up to the callbacks,
    so one safe walker serves both our validator (exact fractions, ``+ - * /``
    only) and TinyZero's checker (Python's own arithmetic, see
    ``verif.task.tinyzero``). The callbacks raise :class:`Rejected` to refuse.
    """
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        raise Rejected("syntax error") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.BinOp):
            return binop(node.op, walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp):
            return unary(node.op, walk(node.operand))
        if isinstance(node, ast.Constant):
            return literal(node)
        raise Rejected(f"{type(node).__name__} not allowed")

    return walk(tree.body)


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate(source: str, *, is_expression: bool) -> tuple[Fraction, list[int]]:
    """Exact value of one segment and the integer literals it contains.

    Only ``+ - * /`` on non-negative literals are allowed; anything else
    (``**``, ``//``, names, calls) is rejected. In the expression literals must
    be integers and unary minus/plus is rejected; in later segments decimal
    literals and unary minus (negative intermediates, ``-43 + 79``) are allowed.
    """
    if not ALLOWED_CHARS.match(source):
        raise Rejected("characters outside digits, + - * / ( ) . and spaces")
    if _LEADING_ZERO.search(source):
        raise Rejected("number written with a leading zero")
    literals: list[int] = []

    def binop(op: ast.operator, left: Fraction, right: Fraction) -> Fraction:
        apply = _BINOPS.get(type(op))
        if apply is None:
            raise Rejected(f"operator {type(op).__name__} is not + - * /")
        if isinstance(op, ast.Div) and right == 0:
            raise Rejected("division by zero")
        return apply(left, right)

    def unary(op: ast.unaryop, value: Fraction) -> Fraction:
        if is_expression or not isinstance(op, ast.USub):
            raise Rejected("unary operator in the expression" if is_expression else "unary plus")
        return -value

    def literal(node: ast.Constant) -> Fraction:
        if type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if type(node.value) is float and not is_expression:
            return Fraction(ast.get_source_segment(source.strip(), node))
        raise Rejected("Constant not allowed")

    return walk_arithmetic(source, binop, unary, literal), literals


def validate(problem: Problem, text: str) -> Verdict:
    """Decide whether an R1-style attempt line is correct for ``problem``.

    TinyZero's rules on the expression (text before the first ``=``): it must
    match ``^[\\d+\\-*/().\\s]+$``, its integers must be exactly the given
    multiset (extra, missing or foreign numbers fail), it must parse and
    evaluate without division by zero, and its value must be within 1e-5 of the
    target. Stricter than TinyZero: ``**`` and ``//`` fail (not basic
    operations), unary minus/plus in the expression fails (it would negate a
    given number), a leading zero (``07``) fails (TinyZero's ``eval`` raises a
    SyntaxError on it too), decimal literals in the expression fail. Added for
    R1-style lines: there must be at least one ``=``; every later segment must
    evaluate (exactly, decimals and negative intermediates allowed) to within
    1e-5 of the expression's value, and the last one to within 1e-5 of the
    target. Fractional intermediates are fine. Text too long to parse
    (thousands of chained operations) is incorrect rather than an error.
    """
    segments = text.strip().split("=")
    if len(segments) < 2:
        return Verdict(False, "no claimed result (no '=')")
    try:
        value, literals = _evaluate(segments[0], is_expression=True)
        if Counter(literals) != Counter(problem.numbers):
            return Verdict(False, "numbers used differ from the given numbers")
        steps = [_evaluate(s, is_expression=False)[0] for s in segments[1:]]
    except Rejected as reject:
        return Verdict(False, str(reject))
    except RecursionError:  # thousands of chained operations: no real attempt
        return Verdict(False, "expression too long to evaluate")
    for i, step in enumerate(steps, start=1):
        if abs(float(step - value)) >= TOLERANCE:
            last = i == len(steps)
            return Verdict(False, "claimed result differs from the expression" if last
                           else f"step {i} differs from the expression")
    if abs(float(value - problem.target)) >= TOLERANCE:
        return Verdict(False, "expression does not equal the target")
    return Verdict(True, "ok")
