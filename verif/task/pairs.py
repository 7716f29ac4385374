"""Counterfactual pairs: each problem's correct attempt and a minimal corruption of it, of equal token length.

Activation patching (resample ablation) moves a component's activation from one prompt into the other
at the same position, so the two prompts of a pair must tokenise to the same length in every model
that scores them. The generator takes each model's token count of a prompt as a function and
redraws a corruption until the lengths agree; nothing here loads a tokenizer.

A pair is two prompts with one `pair_id`, one correct and one incorrect attempt; a prompt's partner
is the other one. The same rules hold for pairs read from a `prompts.file` (`check_pairs`,
`check_pair_lengths`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from verif.task.countdown import CORRUPTIONS, Attempt, Problem, correct_line, corruptions, validate

MAX_SKIPPED = 100
"""Problems in a row that may fail to carry a corruption before the generator gives up (a template or
tokenizer under which no candidate keeps its length)."""

LengthFn = Callable[[str], int]
"""One model's token count of a prompt text."""


@dataclass(frozen=True)
class Pair:
    """A problem's correct attempt and its corruption (a key of CORRUPTIONS)."""

    correct: Attempt
    incorrect: Attempt
    corruption: str


@dataclass(frozen=True)
class PairSet:
    """The pairs made, and what it took: candidates redrawn because their token length differed
    (`redrawn`; `redrawn_by_model`: in how many each model's tokenizer differed) and problems left out
    because no candidate of their corruption kept its length (`problems_skipped`)."""

    pairs: tuple[Pair, ...]
    redrawn: int = 0
    redrawn_by_model: dict[str, int] = field(default_factory=dict)
    problems_skipped: int = 0

    def record(self) -> dict:
        """What the manifest keeps about the pairs."""
        return {
            "n_pairs": len(self.pairs),
            "by_corruption": dict(Counter(p.corruption for p in self.pairs)),
            "redrawn": self.redrawn,
            "redrawn_by_model": dict(self.redrawn_by_model),
            "problems_skipped": self.problems_skipped,
        }


def make_pairs(
    problems: Iterable[Problem],
    n: int,
    seed: int,
    render: Callable[[Problem, str], str],
    lengths: Mapping[str, LengthFn],
    kinds: Sequence[str] = tuple(CORRUPTIONS),
) -> PairSet:
    """`n` pairs from the first problems of `problems` that carry them, deterministic from `seed`.

    The corruption kinds cycle through `kinds` (balanced to within one, in shuffled order, assigned at
    random as `make_attempts` assigns error kinds). For each pair the next problem's correct attempt
    is written, then candidate corruptions of the pair's kind are drawn in random order
    (`countdown.corruptions`) until one renders (`render(problem, attempt)`) to a prompt of the same
    token length as the correct one's in every model of `lengths`; each candidate that fails is
    counted as redrawn. A problem where none fits is skipped (counted) and the next one tried;
    MAX_SKIPPED in a row is a ValueError. Labels come from the validator.
    """
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"corruption kinds must be a non-empty subset of {list(CORRUPTIONS)}, got {list(kinds)}")
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    schedule = [order[i % len(order)] for i in range(n)]
    rng.shuffle(schedule)
    stream = iter(problems)
    redrawn_by_model = Counter({name: 0 for name in lengths})
    redrawn = skipped = 0

    def token_lengths(problem: Problem, text: str) -> dict[str, int]:
        prompt = render(problem, text)
        return {name: count(prompt) for name, count in lengths.items()}

    pairs: list[Pair] = []
    for kind in schedule:
        in_a_row = 0
        while True:
            problem = next(stream, None)
            if problem is None:
                raise ValueError(f"the problems ran out after {len(pairs)} of {n} pairs ({skipped} skipped)")
            text = correct_line(problem)
            want = token_lengths(problem, text)
            found = None
            for changed, bad_text in corruptions(rng, problem, kind):
                got = token_lengths(changed, bad_text)
                differ = [name for name in want if got[name] != want[name]]
                if not differ:
                    found = Attempt(changed, bad_text, validate(changed, bad_text).correct, CORRUPTIONS[kind])
                    break
                redrawn += 1
                redrawn_by_model.update(differ)
            if found is not None:
                pairs.append(Pair(Attempt(problem, text, validate(problem, text).correct, "none"), found, kind))
                break
            skipped += 1
            in_a_row += 1
            if in_a_row >= MAX_SKIPPED:
                raise ValueError(f"{MAX_SKIPPED} problems in a row have no {kind!r} corruption of the same token "
                                 f"length as their correct attempt in every model ({', '.join(lengths)})")
    return PairSet(tuple(pairs), redrawn, dict(redrawn_by_model), skipped)


# --------------------------------------------------------------------------------------------
# pairs given with the prompts
# --------------------------------------------------------------------------------------------


def check_pairs(pair_ids: Sequence[int | None], labels: Sequence[bool], where: Sequence[str]) -> bool:
    """Whether the rows are paired (any `pair_id` given); a ValueError naming the first rows that break
    a rule: when any row has a pair_id every row has one, each pair_id has exactly two rows, and
    those two carry different labels (one correct, one incorrect attempt)."""
    if all(p is None for p in pair_ids):
        return False
    rows: dict[int, list[int]] = {}
    for i, pid in enumerate(pair_ids):
        if pid is None:
            raise ValueError(f"{where[i]}: no pair_id, while other rows have one; pair every row or none")
        rows.setdefault(pid, []).append(i)
    for pid, members in rows.items():
        if len(members) != 2:
            raise ValueError(f"{', '.join(where[i] for i in members)}: pair_id {pid} has {len(members)} rows; "
                             "a pair is exactly two (one correct and one incorrect attempt)")
        a, b = members
        if labels[a] == labels[b]:
            what = "correct" if labels[a] else "incorrect"
            raise ValueError(f"{where[a]} and {where[b]}: pair_id {pid} holds two {what} attempts; a pair is "
                             "one correct and one incorrect attempt")
    return True


def check_pair_lengths(pair_ids: Sequence[int], prompts: Sequence[str], where: Sequence[str],
                       lengths: Mapping[str, LengthFn]) -> None:
    """A ValueError naming the first pair whose two prompts differ in token length in some model (its
    rows, pair_id, both lengths): patching needs its positions to correspond."""
    rows: dict[int, list[int]] = {}
    for i, pid in enumerate(pair_ids):
        rows.setdefault(pid, []).append(i)
    for name, count in lengths.items():
        for pid, (a, b) in rows.items():
            na, nb = count(prompts[a]), count(prompts[b])
            if na != nb:
                raise ValueError(f"{where[a]} and {where[b]}: the prompts of pair_id {pid} have {na} and {nb} "
                                 f"tokens in {name}; a pair's prompts must have the same token length in every "
                                 "model, so that positions correspond")
