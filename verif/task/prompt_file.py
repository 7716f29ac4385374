"""Reading `prompts.file`: attempts to verify as they are, or model outputs to take attempts from.

A file is JSONL (one object per line, blank lines skipped) or parquet (by the `.parquet` suffix).
Its first record decides what it holds:

* attempts: `numbers`, `target`, `attempt` (optional `error_kind`), labelled by our validator;
* model outputs: `nums`, `target`, `output_text` (the study's cached generations, or
  `OUT/generations.parquet` of the generate job), whose attempt lines are extracted by
  `verif.task.cot` with `prompts.extract` and `prompts.attempts`.

Either way the result is one `AttemptTable` with the same columns, so a sweep treats both alike.
`load_problems` reads just the problems (`nums` or `numbers`, and `target`) of any such file, for
generating from them.
Every malformed record is an error naming the file and the line (JSONL, 1-based) or row (parquet,
0-based), before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from verif.task.cot import ATTEMPT_SCHEMA, OUTPUT_FIELDS, AttemptTable, check_options, extract_attempts, output_from_record
from verif.task.countdown import attempt_from_record
from verif.task.validator import Problem, validate

ATTEMPT_FIELDS = ("numbers", "target", "attempt")


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
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
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


def load_prompt_file(path: str | Path, extract: str = "remarks", attempts: str = "last") -> AttemptTable:
    """The labelled attempts of `prompts.file` (see the module docstring)."""
    check_options(extract, attempts)
    records = read_records(path)
    if not records:
        raise ValueError(f"prompts.file {str(path)!r}: no records")
    if _kind(*records[0]) == "outputs":
        outputs = [output_from_record(rec, where, i) for i, (where, rec) in enumerate(records)]
        return extract_attempts(outputs, extract, attempts)
    loaded = [attempt_from_record(rec, where) for where, rec in records]
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
        },
        schema=ATTEMPT_SCHEMA,
    )
    return AttemptTable(frame, len(loaded), (), 0)


def load_problems(path: str | Path) -> list[Problem]:
    """The problems of a JSONL or parquet file whose records have `nums` (or `numbers`) and
    `target`, in file order; other fields are ignored."""
    problems = []
    for where, rec in read_records(path):
        key = "nums" if isinstance(rec, dict) and "nums" in rec else "numbers"
        numbers, target = (rec.get(key), rec.get("target")) if isinstance(rec, dict) else (None, None)
        if not (isinstance(numbers, list) and numbers and all(type(x) is int for x in numbers)):
            raise ValueError(f"{where}: a problem needs 'nums' (or 'numbers'): a non-empty list of integers")
        if type(target) is not int:
            raise ValueError(f"{where}: a problem needs 'target': an integer")
        problems.append(Problem(tuple(numbers), target))
    if not problems:
        raise ValueError(f"problems file {str(path)!r}: no records")
    return problems
