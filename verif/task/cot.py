"""Attempts taken from a model's chains of thought, the way the study took them from R1's outputs.

R1 writes its tries as list items (``- 79 - 60 + 17 = 19 + 17 = 36 (not 36)``). The study kept the
lines of ``output_text`` that start with "- ", removed every parenthesised group together with the
whitespace before it, and used only the last attempt of each output. That rule also removes
parentheses that belong to the expression: ``(79 - 60) + 17 = 36`` loses its first term. So two
rules are offered:

* ``study``: the study's rule, every parenthesised group (``\\s*\\(.*?\\)``, each up to the first
  ``)``) goes;
* ``remarks`` (default): only remarks go, a remark being a balanced parenthesised group whose own
  text (outside groups nested in it) contains a letter; groups of the expression stay.

The attempt is the line after its "- ", with either rule, stripped of surrounding whitespace; the
text is otherwise kept exactly as the model wrote it, because it is shown to the verifier. In
particular a unicode minus (U+2212) is not normalised: the attempt keeps it and our validator labels
it incorrect ("characters outside ..."), as TinyZero's reward (whose character rule R1 was trained
against) scores it zero; the ``reason`` column says so for every such row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import polars as pl

from verif.task.countdown import Attempt
from verif.task.validator import Problem, validate

EXTRACT_RULES = ("remarks", "study")
ATTEMPT_CHOICES = ("last", "all")
ATTEMPT_PREFIX = "- "
OUTPUT_FIELDS = ("nums", "target", "output_text")


ATTEMPT_SCHEMA = {
    "numbers": pl.List(pl.Int64),
    "target": pl.Int64,
    "attempt": pl.String,
    "label": pl.Boolean,
    "reason": pl.String,
    "error_kind": pl.String,
    "source_row": pl.Int64,
    "attempt_index": pl.Int64,
    "n_attempts": pl.Int64,
    "rules_differ": pl.Boolean,
    "pair_id": pl.Int64,
}
"""Columns of an attempt table: the attempt, its validator verdict, where it came from, and its
counterfactual pair (`verif.task.pairs`; null when the attempts are not paired)."""


@dataclass(frozen=True)
class Output:
    """One model output on a Countdown problem; `source_row` is its 0-based record index in the file."""

    numbers: tuple[int, ...]
    target: int
    text: str
    source_row: int


@dataclass(frozen=True)
class AttemptTable:
    """Labelled attempts with provenance (`frame`, columns ATTEMPT_SCHEMA), and what was left out.

    `no_attempt_rows` are the source rows of outputs without any attempt line (reported, never
    dropped silently); `n_rules_differ` counts selected attempts whose text differs between the
    study's rule and the remarks rule; `locations` name each source row in its file (`file:line`
    or `file:row N`), empty when the attempts did not come from a file.
    """

    frame: pl.DataFrame
    n_rows: int
    no_attempt_rows: tuple[int, ...]
    n_rules_differ: int
    locations: tuple[str, ...] = ()

    @property
    def attempts(self) -> list[Attempt]:
        """The rows as countdown Attempts (error_kind "none" when correct, else as in the frame)."""
        return [
            Attempt(Problem(tuple(r["numbers"]), r["target"]), r["attempt"], r["label"], r["error_kind"])
            for r in self.frame.iter_rows(named=True)
        ]


def strip_study(text: str) -> str:
    r"""The study's rule: every parenthesised group and the whitespace before it removed.

    The study wrote it as `re.sub(r"\s*\(.*?\)", "", text)`: a group runs from a `(` to the first `)`
    after it, within its line. That regex takes quadratic time on a line of unclosed `(` (each one scans
    to the end), and model outputs are untrusted text, so this does the same in one pass: the next `)`
    and the next line break are found once and reused by every `(` before them (tested equal on random
    text)."""
    kept, i, close, newline = [], 0, -1, -1
    while (start := text.find("(", i)) >= 0:
        if close < start:
            close = text.find(")", start)
            if close < 0:
                break
        if newline < start:
            newline = text.find("\n", start)
            newline = len(text) if newline < 0 else newline
        if newline < close:  # not closed on its line: kept, as the regex keeps it
            kept.append(text[i:start + 1])
            i = start + 1
            continue
        kept.append(text[i:start].rstrip())
        i = close + 1
    kept.append(text[i:])
    return "".join(kept).strip()


def _groups(text: str) -> tuple[dict[int, int], set[int]]:
    """Every balanced group in one pass: {index of a `(`: index of its `)`} (an unclosed `(` is absent),
    and the `(`s whose own text (outside the groups nested in them) has a letter."""
    closes: dict[int, int] = {}
    with_letter: set[int] = set()
    open_: list[int] = []
    for i, ch in enumerate(text):
        if ch == "(":
            open_.append(i)
        elif ch == ")":
            if open_:
                closes[open_.pop()] = i
        elif open_ and ch.isalpha():
            with_letter.add(open_[-1])
    return closes, with_letter


def strip_remarks(text: str) -> str:
    """Remove remarks (balanced groups whose own text has a letter) and the whitespace before them;
    expression groups, and remarks nested in them, are handled from the outside in, so
    ``(79 - 60 (nineteen)) + 17`` keeps ``(79 - 60)``. An unclosed ``(`` is kept as written.

    Each group's end and whether it is a remark are found in one pass first (`_groups`), so a line
    of thousands of ``(`` costs linear time, not a scan to the end from each of them."""
    closes, remarks = _groups(text)
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "(" and i in closes and i in remarks:
            while out and out[-1].isspace():
                out.pop()
            i = closes[i] + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out).strip()


_RULES = {"study": strip_study, "remarks": strip_remarks}


def check_options(rule: str, attempts: str) -> None:
    """Refuse an unknown `prompts.extract` rule or `prompts.attempts` choice, naming the valid ones."""
    for value, valid, key in ((rule, EXTRACT_RULES, "prompts.extract"), (attempts, ATTEMPT_CHOICES, "prompts.attempts")):
        if value not in valid:
            raise ValueError(f"{key} {value!r}: valid values are {', '.join(valid)}")


def attempt_lines(output_text: str) -> list[str]:
    """The raw attempt lines of an output: lines starting with "- ", without that prefix."""
    return [line[len(ATTEMPT_PREFIX):] for line in output_text.split("\n") if line.startswith(ATTEMPT_PREFIX)]


def output_from_record(row: object, where: str, source_row: int) -> Output:
    """One output from a record with `nums`, `target`, `output_text`; a malformed record raises
    ValueError starting with `where` (file and line or row)."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}")

    if not isinstance(row, dict):
        raise bad("expected an object with fields " + ", ".join(OUTPUT_FIELDS))
    for key in OUTPUT_FIELDS:
        if key not in row or row[key] is None:
            raise bad(f"missing field {key!r} (model outputs need {', '.join(OUTPUT_FIELDS)})")
    numbers, target, text = row["nums"], row["target"], row["output_text"]
    if not (isinstance(numbers, list) and numbers and all(type(x) is int for x in numbers)):
        raise bad(f"'nums' must be a non-empty list of integers, got {numbers!r}")
    if type(target) is not int:
        raise bad(f"'target' must be an integer, got {target!r}")
    if not isinstance(text, str):
        raise bad(f"'output_text' must be a string, got {type(text).__name__}")
    return Output(tuple(numbers), target, text, source_row)


def extract_attempts(
    outputs: Sequence[Output], rule: str = "remarks", attempts: str = "last"
) -> AttemptTable:
    """The attempts of `outputs` (`attempts`: the `last` line of each output, or `all`), cleaned by
    `rule` and labelled by our validator; error_kind is "none" when correct, else "unknown"."""
    check_options(rule, attempts)
    other = _RULES["study" if rule == "remarks" else "remarks"]
    rows: dict[str, list] = {name: [] for name in ATTEMPT_SCHEMA}
    missing = []
    for out in outputs:
        lines = attempt_lines(out.text)
        if not lines:
            missing.append(out.source_row)
            continue
        chosen = range(len(lines)) if attempts == "all" else [len(lines) - 1]
        problem = Problem(out.numbers, out.target)
        for k in chosen:
            text = _RULES[rule](lines[k])
            verdict = validate(problem, text)
            for name, value in zip(ATTEMPT_SCHEMA, (
                list(out.numbers), out.target, text, verdict.correct, verdict.reason,
                "none" if verdict.correct else "unknown", out.source_row, k, len(lines),
                other(lines[k]) != text, None,
            )):
                rows[name].append(value)
    frame = pl.DataFrame(rows, schema=ATTEMPT_SCHEMA)
    return AttemptTable(frame, len(outputs), tuple(missing), int(frame["rules_differ"].sum()))
