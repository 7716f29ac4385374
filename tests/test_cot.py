"""Attempts from chains of thought (verif.task.cot) and reading prompts.file (verif.task.prompt_file)."""

import json
import random
import re

import polars as pl
import pytest

from verif.task.cot import attempt_lines, strip_remarks, strip_study
from verif.task.prompt_file import has_line_break, join_lines, load_problems, load_prompt_file
from verif.task.validator import Problem

MINUS = "\u2212"

# Outputs as R1 writes them: tries as "- " list items with remarks in parentheses.
OUTPUTS = [
    {   # row 0: three tries; the last is correct and bracketed in the expression
        "nums": [79, 17, 60], "target": 36,
        "output_text": "Let me try.\n- 79 + 17 - 60 = 96 - 60 = 36 (this works)\n"
                       "- 79 - 17 = 62 (too big)\nSo:\n- (79 - 60) + 17 = 19 + 17 = 36 (correct!)\n"
                       "</think> <answer>(79 - 60) + 17</answer>",
    },
    {"nums": [3, 5, 7], "target": 22, "output_text": "I think 3 * 5 + 7 works. <answer>3*5+7</answer>"},  # no try
    {"nums": [3, 5, 7], "target": 8, "output_text": f"- 3 {MINUS} 5 + 7 = 5 (nope)\n"},  # unicode minus
    {"nums": [3, 5, 7], "target": 22, "output_text": "- 3 * 5 + 7 (that is 22)\n"},  # no '='
    {"nums": [3, 5, 7], "target": 22, "output_text": "  - 3 * 5 + 7 = 22\n- 3 * 5 + 7 = 15 + 7 = 22\r\n"},
]


def _jsonl(tmp_path, rows, name="outputs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, study, remarks",
    [
        ("79 - 60 + 17 = 19 + 17 = 36 (this works!)", "79 - 60 + 17 = 19 + 17 = 36", "79 - 60 + 17 = 19 + 17 = 36"),
        # the study's rule strips the expression's own bracket: the first term is lost
        ("(79 - 60) + 17 = 19 + 17 = 36", "+ 17 = 19 + 17 = 36", "(79 - 60) + 17 = 19 + 17 = 36"),
        ("(79 - 60) + 17 = 36 (correct)", "+ 17 = 36", "(79 - 60) + 17 = 36"),
        ("79 - (60 + 17) = 2 (not 36)", "79 - = 2", "79 - (60 + 17) = 2"),
        # a remark nested in an expression group goes, the group stays
        ("(79 - 60 (nineteen)) + 17 = 36", ") + 17 = 36", "(79 - 60) + 17 = 36"),
        # a remark containing an expression goes whole
        ("79 - 60 + 17 = 36 (since (79 - 60) = 19)", "79 - 60 + 17 = 36 = 19)", "79 - 60 + 17 = 36"),
        # symbols only, no letter: not a remark
        ("79 - 60 + 17 = 36 (✓)", "79 - 60 + 17 = 36", "79 - 60 + 17 = 36 (✓)"),
        ("79 - 60 + 17 = 36 (close", "79 - 60 + 17 = 36 (close", "79 - 60 + 17 = 36 (close"),
    ],
)
def test_study_and_remarks_rules(line, study, remarks):
    assert strip_study(line) == study
    assert strip_remarks(line) == remarks


def test_attempt_lines_are_lines_starting_with_dash_space():
    assert attempt_lines("a\n- x\n-y\n  - z\n- w") == ["x", "w"]
    assert attempt_lines("no tries here") == []


def test_outputs_become_labelled_attempts_with_provenance(tmp_path):
    table = load_prompt_file(_jsonl(tmp_path, OUTPUTS))
    f = table.frame
    assert table.n_rows == 5
    assert table.no_attempt_rows == (1,)  # reported, not silently dropped
    assert f["source_row"].to_list() == [0, 2, 3, 4]
    assert f["attempt"].to_list() == [
        "(79 - 60) + 17 = 19 + 17 = 36",
        f"3 {MINUS} 5 + 7 = 5",  # kept verbatim ...
        "3 * 5 + 7",
        "3 * 5 + 7 = 15 + 7 = 22",
    ]
    assert f["label"].to_list() == [True, False, False, True]
    assert f["reason"][1].startswith("characters outside")  # ... and labelled incorrect
    assert f["reason"][2] == "no claimed result (no '=')"
    assert f["error_kind"].to_list() == ["none", "unknown", "unknown", "none"]
    assert f["attempt_index"].to_list() == [2, 0, 0, 0]
    assert f["n_attempts"].to_list() == [3, 1, 1, 1]
    # rows 0, 2, 3 lose a remark under both rules; row 0 also loses its bracket under the study's
    assert f["rules_differ"].to_list() == [True, False, False, False]
    assert table.n_rules_differ == 1
    assert [a.text for a in table.attempts] == f["attempt"].to_list()


def test_study_rule_and_all_attempts(tmp_path):
    table = load_prompt_file(_jsonl(tmp_path, OUTPUTS[:1]), extract="study", attempts="all")
    f = table.frame
    assert f["attempt"].to_list() == ["79 + 17 - 60 = 96 - 60 = 36", "79 - 17 = 62", "+ 17 = 19 + 17 = 36"]
    assert f["label"].to_list() == [True, False, False]
    assert f["attempt_index"].to_list() == [0, 1, 2] and f["n_attempts"].to_list() == [3, 3, 3]
    assert f["rules_differ"].to_list() == [False, False, True] and table.n_rules_differ == 1


def test_parquet_gives_the_same_table_as_jsonl(tmp_path):
    path = tmp_path / "outputs.parquet"
    pl.DataFrame(OUTPUTS, schema={"nums": pl.List(pl.Int64), "target": pl.Int64, "output_text": pl.String}).write_parquet(path)
    from_parquet, from_jsonl = load_prompt_file(path, attempts="all"), load_prompt_file(_jsonl(tmp_path, OUTPUTS), attempts="all")
    assert from_parquet.frame.equals(from_jsonl.frame)
    assert from_parquet.no_attempt_rows == from_jsonl.no_attempt_rows == (1,)


def test_attempts_format_still_works(tmp_path):
    rows = [
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 19 + 17 = 36"},
        {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 29 + 17 = 36", "error_kind": "arithmetic_slip"},
    ]
    path = _jsonl(tmp_path, rows, "attempts.jsonl")
    table = load_prompt_file(path)
    assert [(a.text, a.label, a.error_kind) for a in table.attempts] == [
        (rows[0]["attempt"], True, "none"), (rows[1]["attempt"], False, "arithmetic_slip")]
    assert table.frame["reason"].to_list() == ["ok", "step 1 differs from the expression"]
    assert table.frame["source_row"].to_list() == [0, 1] and table.no_attempt_rows == ()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"nums": [1, 2], "target": 3}, "missing field 'output_text'"),
        ({"nums": [1, 2], "target": 3, "output_text": None}, "missing field 'output_text'"),
        ({"nums": "1 2", "target": 3, "output_text": "- 1 + 2 = 3"}, "'nums' must be a non-empty list of integers"),
        ({"nums": [1, 2.5], "target": 3, "output_text": "- 1 + 2 = 3"}, "'nums' must be a non-empty list of integers"),
        ({"nums": [1, 2], "target": 3.0, "output_text": "- 1 + 2 = 3"}, "'target' must be an integer"),
        ({"nums": [1, 2], "target": 3, "output_text": ["- 1 + 2 = 3"]}, "'output_text' must be a string"),
        ("[1, 2, 3]", "expected an object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_malformed_output_rows_name_file_and_line(tmp_path, bad, message):
    path = _jsonl(tmp_path, [OUTPUTS[1], bad])
    with pytest.raises(ValueError) as err:
        load_prompt_file(path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_malformed_parquet_row_names_the_row(tmp_path):
    path = tmp_path / "outputs.parquet"
    pl.DataFrame({"nums": [[1, 2], None], "target": [3, 3], "output_text": ["- 1 + 2 = 3", "x"]}).write_parquet(path)
    with pytest.raises(ValueError, match=rf"{path}:row 1: missing field 'nums'"):
        load_prompt_file(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="has both 'output_text' and 'attempt'"):
        load_prompt_file(_jsonl(tmp_path, [{"nums": [1], "target": 1, "output_text": "", "attempt": ""}]))
    with pytest.raises(ValueError, match=r"either attempts \(numbers, target, attempt\) or model outputs"):
        load_prompt_file(_jsonl(tmp_path, [{"numbers": [1], "target": 1}]))
    with pytest.raises(ValueError, match="no records"):
        load_prompt_file(_jsonl(tmp_path, []))
    with pytest.raises(ValueError, match="no such file"):
        load_prompt_file(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="prompts.extract 'all': valid values are remarks, study"):
        load_prompt_file(_jsonl(tmp_path, OUTPUTS), extract="all")
    with pytest.raises(ValueError, match="prompts.attempts 'first': valid values are last, all"):
        load_prompt_file(_jsonl(tmp_path, OUTPUTS), attempts="first")


def test_problems_from_outputs_or_attempts_files(tmp_path):
    assert load_problems(_jsonl(tmp_path, OUTPUTS[:2])) == [Problem((79, 17, 60), 36), Problem((3, 5, 7), 22)]
    attempts = _jsonl(tmp_path, [{"numbers": [1, 2], "target": 3, "attempt": "1 + 2 = 3"}], "a.jsonl")
    assert load_problems(attempts) == [Problem((1, 2), 3)]
    with pytest.raises(ValueError, match=r"outputs.jsonl:2: a problem needs 'target'"):
        load_problems(_jsonl(tmp_path, [OUTPUTS[0], {"nums": [1, 2]}]))
    with pytest.raises(ValueError, match=r"outputs.jsonl:1: a problem needs 'nums'"):
        load_problems(_jsonl(tmp_path, [{"nums": [], "target": 3}]))


# The rules as the regexes that define them (the study's code; the line-break rule), kept here as the
# reference: they take quadratic time on long runs of `(` or of spaces, which is why the code does not.
STUDY_REGEX = re.compile(r"\s*\(.*?\)")
BREAK_REGEX = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]\s*")


def test_linear_text_rules_equal_their_regexes_on_random_text():
    """strip_study, has_line_break and join_lines against the regexes on 20,000 random strings of
    parentheses, letters, spaces and every kind of line break (seeded)."""
    rng = random.Random(0)
    alphabet = " ()\nab\t\r\u2028\xa0\x85"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        assert strip_study(text) == STUDY_REGEX.sub("", text).strip(), repr(text)
        assert has_line_break(text) == (BREAK_REGEX.search(text) is not None), repr(text)
        want = BREAK_REGEX.sub(lambda m: "" if m.start() == 0 or m.end() == len(text) else " ", text)
        assert join_lines(text) == want, repr(text)


def _remarks_by_definition(text: str) -> str:
    """strip_remarks as first written (each group's end and own letters found by scanning from its `(`):
    the reference the one-pass version must equal."""
    def end_of(start: int) -> int:
        depth = 0
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                return i
        return -1

    def own_letter(inner: str) -> bool:
        depth = 0
        for ch in inner:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and ch.isalpha():
                return True
        return False

    out, i = [], 0
    while i < len(text):
        if text[i] == "(":
            end = end_of(i)
            if end != -1 and own_letter(text[i + 1:end]):
                while out and out[-1].isspace():
                    out.pop()
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out).strip()


def test_remarks_in_one_pass_equal_the_definition_on_random_text():
    rng = random.Random(1)
    for _ in range(20_000):
        text = "".join(rng.choice(" ()ab1-") for _ in range(rng.randrange(16)))
        assert strip_remarks(text) == _remarks_by_definition(text), repr(text)
