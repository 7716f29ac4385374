"""Reading `prompts.file`: attempts to verify as they are, or model outputs to take attempts from.

A file is JSONL (one object per line, blank lines skipped) or parquet (by the `.parquet` suffix).
Its first record decides what it holds:

* attempts: `numbers`, `target`, `attempt` (optional `error_kind`, and `pair_id`: counterfactual pairs,
  checked by `verif.task.pairs.check_pairs`), labelled by our validator;
* model outputs: `nums`, `target`, `output_text` (the study's cached generations, or
  `OUT/generations.parquet` of the generate job), whose attempt lines are extracted by
  `verif.task.cot` with `prompts.extract` and `prompts.attempts`.

Either way the result is one `AttemptTable` with the same columns, so a sweep treats both alike.
`load_problems` reads just the problems (`nums` or `numbers`, and `target`) of any such file, for
generating from them.
Every malformed record is an error naming the file and the line (JSONL, 1-based) or row (parquet,
0-based), before any model is loaded: text that is not UTF-8, a file without any record (empty, or
every line blank), and an attempt containing a line break (the templates put the attempt on a line of
its own), unless `line_breaks="join"` turns each break into a space.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import polars as pl

from verif.task.cot import ATTEMPT_SCHEMA, OUTPUT_FIELDS, AttemptTable, check_options, extract_attempts, output_from_record
from verif.task.countdown import attempt_from_record
from verif.task.pairs import check_pairs
from verif.task.validator import Problem, validate

ATTEMPT_FIELDS = ("numbers", "target", "attempt")
LINE_BREAK_CHOICES = ("error", "join")
# What str.splitlines() breaks at; `\s` covers all of them, so a run of whitespace holding one is one match.
_BREAK = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ONE_BREAK = re.compile(f"[{_BREAK}]")
# Runs of whitespace, found in linear time (a pattern such as \s*[breaks]\s* rescans a long run of spaces
# from each of its characters: quadratic in untrusted text).
_SPACE_RUN = re.compile(r"\s+")


def has_line_break(text: str) -> bool:
    return _ONE_BREAK.search(text) is not None


def join_lines(text: str) -> str:
    """Each line break with the whitespace around it as one space (none at either end): every run of
    whitespace that holds a break becomes one space."""

    def joined(run: re.Match) -> str:
        if not _ONE_BREAK.search(run.group()):
            return run.group()
        return "" if run.start() == 0 or run.end() == len(text) else " "

    return _SPACE_RUN.sub(joined, text)


def _jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line, or a ValueError naming the first line that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"prompts.file {str(path)!r}: cannot read it ({e.strerror or e})") from None
    lines = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                             "a prompts.file is UTF-8 JSONL or parquet") from None
    return lines


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """The records of a JSONL or parquet file, each with where it is (`file:line` or `file:row N`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts.file {str(path)!r}: no such file")
    if path.suffix == ".parquet":
        try:
            rows = pl.read_parquet(path).to_dicts()
        except Exception as e:  # polars raises several kinds for a file that is not parquet
            raise ValueError(f"prompts.file {str(path)!r}: cannot read as parquet ({e})") from None
        if not rows:
            raise ValueError(f"prompts.file {str(path)!r}: no records (the parquet file has no rows)")
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    records = []
    lines = _jsonl_lines(path)
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not records:
        what = "the file is empty" if lines == [(1, "")] else "every line is blank"
        raise ValueError(f"prompts.file {str(path)!r}: no records ({what}); expected one JSON object per line")
    return records


def _kind(where: str, record: object) -> str:
    """'outputs' or 'attempts', from the fields of a file's first record."""
    keys = set(record) if isinstance(record, dict) else set()
    is_outputs, is_attempts = "output_text" in keys, "attempt" in keys
    if is_outputs == is_attempts:
        problem = "has both 'output_text' and 'attempt'" if is_outputs else f"has fields {sorted(keys)}"
        raise ValueError(
            f"{where}: {problem}; a prompts.file holds either attempts ({', '.join(ATTEMPT_FIELDS)}) "
            f"or model outputs ({', '.join(OUTPUT_FIELDS)})"
        )
    return "outputs" if is_outputs else "attempts"


def _joined(record: object, field: str, per_line: bool) -> object:
    """The record with line breaks in `field` joined (`per_line`: within each "\\n"-separated line)."""
    if not (isinstance(record, dict) and isinstance(record.get(field), str)):
        return record  # malformed: the record's own check names it
    text = record[field]
    joined = "\n".join(join_lines(line) for line in text.split("\n")) if per_line else join_lines(text)
    return {**record, field: joined}


def _refuse_line_breaks(table: AttemptTable, locations: tuple[str, ...]) -> None:
    """A ValueError naming the first attempt with a line break by its file and line."""
    for row, text in zip(table.frame["source_row"], table.frame["attempt"]):
        if has_line_break(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise ValueError(
                f"{locations[row]}: the attempt {shown!r} contains a line break, which would break the prompt's "
                "line structure; remove it, or set prompts.line_breaks=join to make each break a space"
            )


def _pair_id(record: dict, where: str) -> int | None:
    """The record's pair_id (an integer, or null / absent when it is not paired)."""
    pid = record.get("pair_id")
    if pid is not None and type(pid) is not int:
        raise ValueError(f"{where}: 'pair_id' must be an integer or null, got {pid!r}")
    return pid


def load_prompt_file(path: str | Path, extract: str = "remarks", attempts: str = "last",
                     line_breaks: str = "error") -> AttemptTable:
    """The labelled attempts of `prompts.file` (see the module docstring); `locations` name each record."""
    check_options(extract, attempts)
    if line_breaks not in LINE_BREAK_CHOICES:
        raise ValueError(f"prompts.line_breaks {line_breaks!r}: valid values are {', '.join(LINE_BREAK_CHOICES)}")
    records = read_records(path)
    locations = tuple(where for where, _ in records)
    is_outputs = _kind(*records[0]) == "outputs"
    if line_breaks == "join":  # before labelling: the validator judges the text the prompt will show
        field = "output_text" if is_outputs else "attempt"
        records = [(where, _joined(rec, field, per_line=is_outputs)) for where, rec in records]
    if is_outputs:
        paired = next((where for where, rec in records if isinstance(rec, dict) and rec.get("pair_id") is not None),
                      None)
        if paired:
            raise ValueError(f"{paired}: a pair_id pairs attempts, and this file holds model outputs (one output "
                             "may give several attempts); give pairs as attempt records (numbers, target, attempt)")
        outputs = [output_from_record(rec, where, i) for i, (where, rec) in enumerate(records)]
        table = dataclasses.replace(extract_attempts(outputs, extract, attempts), locations=locations)
        _refuse_line_breaks(table, locations)
        return table
    loaded = [attempt_from_record(rec, where) for where, rec in records]
    pair_ids = [_pair_id(rec, where) for where, rec in records]
    check_pairs(pair_ids, [a.label for a in loaded], locations)
    frame = pl.DataFrame(
        {
            "numbers": [list(a.problem.numbers) for a in loaded],
            "target": [a.problem.target for a in loaded],
            "attempt": [a.text for a in loaded],
            "label": [a.label for a in loaded],
            "reason": [validate(a.problem, a.text).reason for a in loaded],
            "error_kind": [a.error_kind for a in loaded],
            "source_row": list(range(len(loaded))),
            "attempt_index": [0] * len(loaded),
            "n_attempts": [1] * len(loaded),
            "rules_differ": [None] * len(loaded),
            "pair_id": pair_ids,
        },
        schema=ATTEMPT_SCHEMA,
    )
    table = AttemptTable(frame, len(loaded), (), 0, locations)
    _refuse_line_breaks(table, locations)
    return table


def load_problems(path: str | Path) -> list[Problem]:
    """The problems of a JSONL or parquet file whose records have `nums` (or `numbers`) and
    `target`, in file order; other fields are ignored."""
    return [problem for _, problem in located_problems(path)]


def located_problems(path: str | Path) -> list[tuple[str, Problem]]:
    """`load_problems`, each problem with where it is (`file:line`, for messages about it)."""
    problems = []
    for where, rec in read_records(path):
        key = "nums" if isinstance(rec, dict) and "nums" in rec else "numbers"
        numbers, target = (rec.get(key), rec.get("target")) if isinstance(rec, dict) else (None, None)
        if not (isinstance(numbers, list) and numbers and all(type(x) is int for x in numbers)):
            raise ValueError(f"{where}: a problem needs 'nums' (or 'numbers'): a non-empty list of integers")
        if type(target) is not int:
            raise ValueError(f"{where}: a problem needs 'target': an integer")
        problems.append((where, Problem(tuple(numbers), target)))
    if not problems:
        raise ValueError(f"problems file {str(path)!r}: no records")
    return problems
