"""Countdown problems and R1-style attempts (correct, and wrong in known ways).

An attempt is written the way TinyZero R1 writes it in its chain of thought::

    79 - 60 + 17 = 19 + 17 = 36

Segment 0 (before the first ``=``) is the expression. Each following segment
reduces exactly one operation: the leftmost-innermost one, i.e. the first
operation Python's parser would evaluate (post-order, left operand first), so
``2 + 3 * 4 = 2 + 12 = 14`` and ``(1 + 2) * (3 + 4) = 3 * (3 + 4) = 3 * 7 = 21``.
The last segment is the claimed value. Parentheses are written only where the
parse would otherwise differ (a right operand of equal precedence is always
bracketed: ``a - (b + c)``, ``a + (b + c)``), so the text parses back into the
tree the steps were computed from. Fractional intermediates are written as exact
decimals (``7.5``, ``0.125``); the generator only produces expressions whose
intermediates have at most three decimal places, so every step it writes is
exact. A negative intermediate is written ``-43`` at the start of a segment and
``(-43)`` elsewhere.

The label of every attempt comes from ``verif.task.validator.validate``, which
parses the text itself; this module imports its verdict but none of its
evaluation code, so generator bugs show up as disagreements between
``error_kind`` and ``label`` (tested).
"""

from __future__ import annotations

import ast
import itertools
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Sequence, Union

# Verdict is re-exported: callers that import validate from here get its result type too.
from verif.task.validator import Problem, Verdict, validate  # noqa: F401

ERROR_KINDS: tuple[str, ...] = (
    "arithmetic_slip",
    "false_claim",
    "wrong_target",
    "number_reused",
    "foreign_number",
)
"""Kinds of incorrect attempts; a correct attempt has ``error_kind == "none"``."""

MAX_DECIMALS = 3
"""Generated intermediates have denominators dividing 10**MAX_DECIMALS, so steps are exact."""


@dataclass(frozen=True)
class Attempt:
    """One attempt line for a problem; ``label`` is the validator's verdict and
    ``error_kind`` the way it was made wrong (``"none"`` when correct)."""

    problem: Problem
    text: str
    label: bool
    error_kind: str


# ------------------------------------------------------------------ expression trees
# A tree is a Fraction leaf or (op, left, right) with op in "+-*/".

Tree = Union[Fraction, tuple]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_DECIMAL_SCALE = 10**MAX_DECIMALS


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    """Exact result of ``a op b``; None for division by zero or a value that
    cannot be written exactly with MAX_DECIMALS decimals."""
    if op == "/" and b == 0:
        return None
    r = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    return r if _DECIMAL_SCALE % r.denominator == 0 else None


def _value(tree: Tree) -> Fraction | None:
    """Exact value, None when any intermediate is not writable (see _apply)."""
    if isinstance(tree, Fraction):
        return tree
    op, left, right = tree
    a, b = _value(left), _value(right)
    return None if a is None or b is None else _apply(op, a, b)


def _format_number(v: Fraction) -> str:
    """``36``, ``-43``, ``7.5``: exact decimal, no trailing zeros."""
    if v.denominator == 1:
        return str(v.numerator)
    whole, frac = divmod(int(abs(v) * _DECIMAL_SCALE), _DECIMAL_SCALE)
    return f"{'-' if v < 0 else ''}{whole}.{frac:0{MAX_DECIMALS}d}".rstrip("0")


def _render(tree: Tree, leftmost: bool = True) -> str:
    """Infix text with the minimal parentheses that parse back to ``tree``."""
    if isinstance(tree, Fraction):
        text = _format_number(tree)
        return text if tree >= 0 or leftmost else f"({text})"
    op, left, right = tree
    parts = []
    for child, is_left in ((left, True), (right, False)):
        if isinstance(child, tuple) and (
            _PRECEDENCE[child[0]] < _PRECEDENCE[op]
            or (not is_left and _PRECEDENCE[child[0]] == _PRECEDENCE[op])
        ):
            parts.append(f"({_render(child)})")
        else:
            parts.append(_render(child, leftmost and is_left))
    return f"{parts[0]} {op} {parts[1]}"


def _reduce_once(tree: tuple) -> tuple[Tree, tuple[int, ...]]:
    """Reduce the leftmost-innermost operation; return the new tree and the
    path (1 = left, 2 = right) of the literal that replaced it."""
    op, left, right = tree
    if isinstance(left, tuple):
        new, path = _reduce_once(left)
        return (op, new, right), (1, *path)
    if isinstance(right, tuple):
        new, path = _reduce_once(right)
        return (op, left, new), (2, *path)
    return _apply(op, left, right), ()


def _steps(tree: Tree) -> list[tuple[Tree, tuple[int, ...]]]:
    """The expression and each reduction, with the path of the new literal."""
    out: list[tuple[Tree, tuple[int, ...]]] = [(tree, ())]
    while isinstance(tree, tuple):
        tree, path = _reduce_once(tree)
        out.append((tree, path))
    return out


def _replace(tree: Tree, path: tuple[int, ...], leaf: Fraction) -> Tree:
    """``tree`` with the node at ``path`` replaced by ``leaf``."""
    if not path:
        return leaf
    op, left, right = tree
    if path[0] == 1:
        return (op, _replace(left, path[1:], leaf), right)
    return (op, left, _replace(right, path[1:], leaf))


def _leaf_at(tree: Tree, path: tuple[int, ...]) -> Fraction:
    """The node of ``tree`` at ``path``."""
    for step in path:
        tree = tree[step]
    return tree


def _line(segments: Iterable[Tree]) -> str:
    """Segments joined R1-style: ``a - b + c = 19 + c = 36``."""
    return " = ".join(_render(s) for s in segments)


def _random_tree(rng: random.Random, leaves: Sequence[int]) -> Tree:
    """Random binary tree over ``leaves`` in random order with random operators."""
    order = [Fraction(x) for x in leaves]
    rng.shuffle(order)

    def build(items: list[Fraction]) -> Tree:
        if len(items) == 1:
            return items[0]
        cut = rng.randint(1, len(items) - 1)
        return (rng.choice("+-*/"), build(items[:cut]), build(items[cut:]))

    return build(order)


def _parse_tree(expression: str) -> Tree:
    """Tree of a generator-written expression (used for stored solutions)."""

    def conv(node: ast.AST) -> Tree:
        if isinstance(node, ast.BinOp):
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
            return (op, conv(node.left), conv(node.right))
        return Fraction(node.value)

    return conv(ast.parse(expression, mode="eval").body)


def _apply_scaled(op: str, a: int, b: int) -> int | None:
    """_apply on values stored as integer multiples of 1/_DECIMAL_SCALE: the
    same results (None where _apply gives None) at integer speed."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        q, r = divmod(a * b, _DECIMAL_SCALE)
        return None if r else q
    if b == 0:
        return None
    q, r = divmod(a * _DECIMAL_SCALE, b)
    return None if r else q


@lru_cache(maxsize=1024)  # reuse is within a problem; bounds memory
def _reachable_scaled(leaves: tuple[int, ...]) -> dict[int, Tree]:
    """One tree per value (scaled by _DECIMAL_SCALE) reachable from the sorted
    multiset ``leaves`` using every leaf once, intermediates writable."""
    if len(leaves) == 1:
        return {leaves[0] * _DECIMAL_SCALE: Fraction(leaves[0])}
    out: dict[int, Tree] = {}
    seen = set()
    idx = range(len(leaves))
    for r in range(1, len(leaves)):
        for chosen in itertools.combinations(idx, r):
            left = tuple(leaves[i] for i in chosen)
            right = tuple(leaves[i] for i in idx if i not in chosen)
            if (left, right) in seen:
                continue
            seen.add((left, right))
            for (a, ta), (b, tb) in itertools.product(
                _reachable_scaled(left).items(), _reachable_scaled(right).items()
            ):
                for op in "+-*/":
                    v = _apply_scaled(op, a, b)
                    if v is not None and v not in out:
                        out[v] = (op, ta, tb)
    return out


@lru_cache(maxsize=1024)  # reuse is within a problem; bounds memory
def _reachable(leaves: tuple[int, ...]) -> dict[Fraction, Tree]:
    """Exact values -> trees for the sorted multiset ``leaves``; memoised
    because attempt construction queries the same sub-multisets repeatedly."""
    return {Fraction(v, _DECIMAL_SCALE): t for v, t in _reachable_scaled(leaves).items()}


def find_solution(problem: Problem) -> str | None:
    """An expression reaching the target, or None. Exhaustive over trees whose
    intermediates have at most MAX_DECIMALS decimals, so None does not prove a
    problem unsolvable when only e.g. thirds would work."""
    tree = _reachable(tuple(sorted(problem.numbers))).get(Fraction(problem.target))
    return None if tree is None else _render(tree)


# ------------------------------------------------------------------ problems


def generate_problems(
    n: int, seed: int, sizes: Sequence[int] = (3, 4), max_target: int = 1000
) -> list[Problem]:
    """``n`` solvable problems, deterministic from ``seed``.

    Numbers are drawn from 1..100 (repeats allowed, as in TinyZero); the target
    is the value of a random expression over them, kept only when it is an
    integer in 1..max_target and every intermediate is writable, so a solution
    exists by construction and is stored in ``Problem.solution``.
    """
    return list(itertools.islice(iter_problems(seed, sizes, max_target), n))


def iter_problems(seed: int, sizes: Sequence[int] = (3, 4), max_target: int = 1000) -> Iterator[Problem]:
    """The endless stream :func:`generate_problems` takes its first ``n`` from (so the first ``n`` of
    a stream are the ``n`` problems of that seed), for callers that skip some problems."""
    rng = random.Random(seed)
    while True:
        size = rng.choice(sizes)  # drawn before rejection so sizes stay balanced
        while True:
            numbers = tuple(rng.randint(1, 100) for _ in range(size))
            tree = _random_tree(rng, numbers)
            value = _value(tree)
            if value is not None and value.denominator == 1 and 1 <= value <= max_target:
                yield Problem(numbers, int(value), _render(tree))
                break


# ------------------------------------------------------------------ attempts


def _solution_tree(problem: Problem) -> Tree:
    """Tree of the stored (or found) solution; a stored one must validate and
    have writable intermediates, or the steps written from it would be wrong."""
    solution = problem.solution or find_solution(problem)
    if solution is None:
        raise ValueError(f"no solution known or found for {problem}")
    if not validate(problem, f"{solution} = {problem.target}").correct:
        raise ValueError(f"stored solution does not solve {problem}")
    tree = _parse_tree(solution)
    if _value(tree) is None:
        raise ValueError(f"solution of {problem} has intermediates with over "
                         f"{MAX_DECIMALS} decimals")
    return tree


def _other_value_tree(rng: random.Random, problem: Problem) -> Tree | None:
    """A tree over the given numbers whose value is not the target, preferring
    positive integers (what R1 usually reaches)."""
    target = Fraction(problem.target)
    for _ in range(50):
        tree = _random_tree(rng, problem.numbers)
        v = _value(tree)
        if v is not None and v != target and v.denominator == 1 and v > 0:
            return tree
    others = [t for v, t in _reachable(tuple(sorted(problem.numbers))).items() if v != target]
    return rng.choice(others) if others else None


# (op, x written first, x solved from E's value v, v solved from x), for E op x = t.
_TOP_FORMS = (
    ("+", False, lambda v, t: t - v, lambda x, t: t - x),
    ("+", True, lambda v, t: t - v, lambda x, t: t - x),
    ("-", False, lambda v, t: v - t, lambda x, t: t + x),
    ("-", True, lambda v, t: t + v, lambda x, t: x - t),
    ("*", False, lambda v, t: t / v, lambda x, t: t / x),
    ("*", True, lambda v, t: t / v, lambda x, t: t / x),
    ("/", False, lambda v, t: v / t, lambda x, t: t * x),
    ("/", True, lambda v, t: t * v, lambda x, t: x / t),
)


def _combine_to_target(
    rng: random.Random, base: tuple[int, ...], extras: Iterable[int], target: Fraction
) -> Tree | None:
    """A tree ``E op x`` or ``x op E`` equal to ``target``, where E uses the
    multiset ``base`` and x is one of ``extras``; random choice among all.
    Solves for the unknown on the smaller side (E's values or the extras)."""
    values = _reachable(tuple(sorted(base)))
    extras = {Fraction(x) for x in extras}

    def solve(f: Callable, known: Fraction) -> Fraction | None:
        try:
            return f(known, target)
        except ZeroDivisionError:
            return None

    found = []
    for op, x_first, solve_x, solve_v in _TOP_FORMS:
        if len(extras) < len(values):
            pairs = [(solve(solve_v, x), x) for x in extras]
        else:
            pairs = [(v, solve(solve_x, v)) for v in values]
        for v, x in pairs:
            if v in values and x in extras:
                tree = (op, x, values[v]) if x_first else (op, values[v], x)
                if _value(tree) == target:
                    found.append(tree)
    return rng.choice(found) if found else None


def _first_stage(rng: random.Random, stages: Iterable[Callable[[], list]]) -> Tree | None:
    """Random pick among the trees of the first stage (a thunk returning
    candidate trees) that yields any; stages are ordered cheapest first."""
    for stage in stages:
        found = [t for t in stage() if t is not None]
        if found:
            return rng.choice(found)
    return None


def _hit(leaves: Iterable[int], target: Fraction) -> Tree | None:
    """A tree using the multiset ``leaves`` equal to ``target``, if any."""
    return _reachable(tuple(sorted(leaves))).get(target)


def _number_reused(rng: random.Random, problem: Problem) -> Tree | None:
    """Honest arithmetic reaching the target, but one number left out, or
    replaced by a second copy of another given number, or one number used an
    extra time. Variants with the copy at the top of the tree are tried first
    (cheap); 3-number problems, where those rarely reach the target, then try
    every tree shape of the swapped multisets."""
    nums, target = list(problem.numbers), Fraction(problem.target)
    dropped = [(nums[i], tuple(nums[:i] + nums[i + 1:])) for i in range(len(nums))]
    swaps = [(rest, {c for c in rest if c != out}) for out, rest in dropped]
    altered = [rest + (c,) for rest, copies in swaps for c in copies]
    return _first_stage(rng, [
        lambda: [_hit(rest, target) for _, rest in dropped]
        + [_combine_to_target(rng, rest, copies, target) for rest, copies in swaps]
        + [_combine_to_target(rng, tuple(nums), set(nums), target)],
        lambda: [_hit(leaves, target) for leaves in altered] if len(nums) <= 3 else [],
    ])


def _foreign_number(rng: random.Random, problem: Problem) -> Tree | None:
    """Honest arithmetic reaching the target with one given number replaced by
    (or, failing that, joined by) a number in 1..100 not among the given ones."""
    nums, target = list(problem.numbers), Fraction(problem.target)
    foreign = [x for x in range(1, 101) if x not in nums]
    return _first_stage(rng, [
        lambda: [_combine_to_target(rng, tuple(nums[:i] + nums[i + 1:]), foreign, target)
                 for i in range(len(nums))],
        lambda: [_combine_to_target(rng, tuple(nums), foreign, target)],
    ])


def _deltas(rng: random.Random) -> list[int]:
    """-10..10 without 0, in random order: how far a corrupted number moves."""
    return rng.sample([d for d in range(-10, 11) if d], 20)


def _slips(rng: random.Random, steps: list[tuple[Tree, tuple[int, ...]]]) -> Iterator[list[Tree]]:
    """Every arithmetic slip of the solution's ``steps``, in random order: one intermediate segment's
    new literal off by 1..10 (writable, a different value); later segments and the claim stay true."""
    inner = range(1, len(steps) - 1)
    for k in rng.sample(inner, len(inner)):
        seg, path = steps[k]
        true = _value(seg)
        for delta in _deltas(rng):
            wrong = _replace(seg, path, _leaf_at(seg, path) + delta)
            if _value(wrong) is not None and _value(wrong) != true:
                segments = [t for t, _ in steps]
                segments[k] = wrong
                yield segments


def _leaf_paths(tree: Tree, path: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Paths of the literals of ``tree``, left to right."""
    if isinstance(tree, Fraction):
        yield path
        return
    yield from _leaf_paths(tree[1], (*path, 1))
    yield from _leaf_paths(tree[2], (*path, 2))


CORRUPTIONS: dict[str, str] = {
    "claim": "false_claim",
    "intermediate": "arithmetic_slip",
    "operand": "foreign_number",
    "target": "wrong_target",
}
"""The one number a counterfactual's incorrect attempt changes, and the error kind it then is (the
validator's reason for it is that kind's, tested)."""


def correct_line(problem: Problem) -> str:
    """The correct attempt line of ``problem``: its solution's steps, as ``make_attempts`` writes it."""
    return _line(t for t, _ in _steps(_solution_tree(problem)))


def corruptions(rng: random.Random, problem: Problem, kind: str) -> Iterator[tuple[Problem, str]]:
    """Every minimal corruption of ``kind`` (a key of CORRUPTIONS) of the correct attempt
    (:func:`correct_line`), in random order: the problem (changed only by ``target``) and the
    incorrect attempt line. Each changes one number by 1..10, everything else stays as written:

    - ``claim``: the claimed value (last segment; kept positive);
    - ``intermediate``: the new literal of one intermediate segment (an arithmetic slip);
    - ``operand``: one number of the expression, to one in 1..100 not among the given ones (later
      segments unchanged; no division by zero);
    - ``target``: the problem's target (kept positive); the attempt is the correct one's.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    steps = _steps(_solution_tree(problem))
    segments = [t for t, _ in steps]
    target = problem.target
    if kind == "intermediate":
        yield from ((problem, _line(s)) for s in _slips(rng, steps))
    elif kind == "claim":
        for delta in _deltas(rng):
            if target + delta > 0:
                yield problem, _line([*segments[:-1], Fraction(target + delta)])
    elif kind == "target":
        text = _line(segments)
        for delta in _deltas(rng):
            if target + delta > 0:
                yield Problem(problem.numbers, target + delta), text
    else:
        expression = segments[0]
        paths = list(_leaf_paths(expression))
        for path in rng.sample(paths, len(paths)):
            for delta in _deltas(rng):
                x = _leaf_at(expression, path) + delta
                if 1 <= x <= 100 and x not in problem.numbers:
                    changed = _replace(expression, path, x)
                    if _value(changed) is not None:
                        yield problem, _line([changed, *segments[1:]])


def _write(rng: random.Random, problem: Problem, kind: str) -> str | None:
    """The attempt line for ``kind``, or None when this problem cannot carry it."""
    if kind == "none":
        return correct_line(problem)
    if kind == "arithmetic_slip":
        return next((_line(segments) for segments in _slips(rng, _steps(_solution_tree(problem)))), None)
    if kind in ("false_claim", "wrong_target"):
        tree = _other_value_tree(rng, problem)
        if tree is None:
            return None
        segments = [t for t, _ in _steps(tree)]
        if kind == "false_claim":
            segments[-1] = Fraction(problem.target)
        return _line(segments)
    maker = {"number_reused": _number_reused, "foreign_number": _foreign_number}.get(kind)
    if maker is None:
        raise ValueError(f"unknown error kind {kind!r}; known: none, {', '.join(ERROR_KINDS)}")
    tree = maker(rng, problem)
    return None if tree is None else _line(t for t, _ in _steps(tree))


def make_attempts(
    problems: Sequence[Problem],
    seed: int,
    kinds: Sequence[str] = ERROR_KINDS,
    p_correct: float = 0.5,
) -> list[Attempt]:
    """One attempt per problem, in order, deterministic from ``seed``.

    ``round(len(problems) * p_correct)`` attempts are correct; the rest cycle
    through ``kinds`` (balanced to within one, in shuffled order), assigned to
    problems at random. Kinds:

    - ``arithmetic_slip``: true expression, one intermediate segment off by
      1..10, later segments and the claim (= target) true;
    - ``false_claim``: honest steps of an expression not equal to the target,
      but the last segment states the target;
    - ``wrong_target``: honest steps reaching a value other than the target;
    - ``number_reused``: honest steps reaching the target, with one number left
      out, replaced by a copy of another given number, or used an extra time;
    - ``foreign_number``: honest steps reaching the target, with one number
      replaced by one from 1..100 not among the given ones.

    When a problem cannot carry its kind (no variant reaches the target)
    another kind takes its place and the displaced kind is owed a slot, given
    to it on the next problem that can carry it; counts stay balanced as far as
    the problems allow, but ``number_reused`` lands more often on 4-number
    problems (few 3-number problems admit it). Labels come from
    :func:`validate`.
    """
    if not 0.0 <= p_correct <= 1.0:
        raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
    unknown = [k for k in kinds if k not in ERROR_KINDS]
    if unknown or (not kinds and p_correct < 1.0):
        raise ValueError(f"kinds must be a non-empty subset of {ERROR_KINDS}, got {list(kinds)}")
    rng = random.Random(seed)
    n_correct = round(len(problems) * p_correct)
    order = list(kinds)
    rng.shuffle(order)
    schedule = ["none"] * n_correct + [
        order[i % len(order)] for i in range(len(problems) - n_correct)
    ]
    rng.shuffle(schedule)
    debt: Counter[str] = Counter()  # > 0: kind owed a slot; < 0: kind over quota
    attempts = []
    for problem, kind in zip(problems, schedule):
        if kind == "none":
            candidates = ["none"]
        else:
            owed = sorted((k for k in kinds if debt[k] > 0), key=lambda k: -debt[k])
            candidates = owed + [k for k in [kind, *kinds] if k not in owed]
            candidates = list(dict.fromkeys(candidates))
        for used in candidates:
            text = _write(rng, problem, used)
            if text is not None:
                break
        else:
            raise ValueError(f"no attempt of kinds {candidates} fits {problem}")
        debt[kind] += used != kind
        debt[used] -= used != kind
        attempts.append(Attempt(problem, text, validate(problem, text).correct, used))
    return attempts


def attempt_from_record(row: object, where: str) -> Attempt:
    """One attempt from a record ``{"numbers": [...], "target": int, "attempt":
    str, "error_kind"?: str}`` (a JSONL line or a parquet row).

    The label is recomputed by :func:`validate`: ``error_kind`` becomes
    ``"none"`` for a correct attempt, and for an incorrect one the given kind,
    or ``"unknown"`` when none is given or the given one is ``"none"``. A
    malformed record raises ValueError starting with ``where``.
    """

    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}")

    if not isinstance(row, dict):
        raise bad("expected a JSON object")
    for key in ("numbers", "target", "attempt"):
        if key not in row:
            raise bad(f"missing field {key!r}")
    numbers, target, text = row["numbers"], row["target"], row["attempt"]
    kind = row.get("error_kind", "unknown")
    if not (isinstance(numbers, list) and numbers and all(type(x) is int for x in numbers)):
        raise bad("'numbers' must be a non-empty list of integers")
    if type(target) is not int:
        raise bad("'target' must be an integer")
    if not isinstance(text, str):
        raise bad("'attempt' must be a string")
    if not isinstance(kind, str):
        raise bad("'error_kind' must be a string")
    problem = Problem(tuple(numbers), target)
    correct = validate(problem, text).correct
    kind = "none" if correct else ("unknown" if kind == "none" else kind)
    return Attempt(problem, text, correct, kind)
