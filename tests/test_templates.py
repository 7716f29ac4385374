"""prompts.template: the study's code string (byte for byte), the post's form, and template files."""

import random

import numpy as np
import pytest

from verif.task.countdown import generate_problems, make_attempts
from verif.task.prompts import POST, STUDY, format_numbers, load_template, render_prompt

# Copied from MISSION.md, "What the study's code does": one line here per line break of the string.
STUDY_EXAMPLE = (
    "A conversation between User and Assistant. The User is given a set of numbers [79 17 60] to create an "
    "equation that equals 36. The User can use basic arithmetic operations (+, -, *, /) and each number can "
    "only be used once. The following is the User's attempt:\n"
    "79 - 60 + 17 = 19 + 17 = 36\n"
    "Your job as an Assistant is to verify if this attempt is correct or not. Is the User's attempt correct? "
    "Answer only in 'Yes' or 'No'.\n"
    "Assistant: Let me think about this step by step. The User is given the set of numbers [79 17 60] and must "
    "create an equation that equals 36. The User's attempt is 79 - 60 + 17 = 19 + 17 = 36. Therefore, the "
    "final answer is"
)
SEED = ([79, 17, 60], 36, "79 - 60 + 17 = 19 + 17 = 36")


def test_study_template_renders_the_mission_string_byte_for_byte():
    assert STUDY.render(*SEED).encode() == STUDY_EXAMPLE.encode()
    assert load_template("study").render(*SEED) == STUDY_EXAMPLE
    assert render_prompt(*SEED) == STUDY_EXAMPLE  # the default
    assert STUDY_EXAMPLE.count("\n") == 3


def test_post_and_study_differ_only_in_line_breaks():
    post = POST.render(*SEED)
    assert post != STUDY_EXAMPLE
    assert post.replace("\n", " ") == STUDY_EXAMPLE.replace("\n", " ")
    assert post.count("\n") == 9


def test_generated_problems_render_with_numpy_printed_numbers():
    for attempt in make_attempts(generate_problems(40, seed=5), seed=5):
        p = attempt.problem
        prompt = STUDY.render(p.numbers, p.target, attempt.text)
        shown = str(np.array(p.numbers))
        assert prompt.startswith(
            "A conversation between User and Assistant. The User is given a set of numbers "
            f"{shown} to create an equation that equals {p.target}. "
        )
        assert prompt.endswith(
            f"The User is given the set of numbers {shown} and must create an equation that equals "
            f"{p.target}. The User's attempt is {attempt.text}. Therefore, the final answer is"
        )
        assert f"attempt:\n{attempt.text}\nYour job" in prompt


def test_numbers_print_as_numpy_prints_them():
    rng = random.Random(0)
    for _ in range(2000):
        # mixed widths: 1-, 2- and 3-digit numbers in one problem, 1-6 numbers
        numbers = [rng.choice([rng.randint(1, 9), rng.randint(10, 99), 100]) for _ in range(rng.randint(1, 6))]
        assert format_numbers(numbers) == str(np.array(numbers)), numbers


def test_templates_tokenise_differently(qwen_tokenizer):
    study = qwen_tokenizer(STUDY.render(*SEED))["input_ids"]
    post = qwen_tokenizer(POST.render(*SEED))["input_ids"]
    assert study != post


def test_template_file_with_repeated_placeholders_and_literal_braces(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Set {numbers} -> {target}; {{not a field}}\nAttempt: {attempt} ({attempt})\n", encoding="utf-8")
    template = load_template(str(path))
    assert template.name == f"file:{path.resolve()}"
    # one final newline is dropped; doubled braces are literal
    assert template.render([5, 10, 7], 3, "a") == "Set [ 5 10  7] -> 3; {not a field}\nAttempt: a (a)"
    assert template.digest != STUDY.digest
    path.write_text("Set {numbers} -> {target}: {attempt}!\n", encoding="utf-8")
    assert load_template(str(path)).digest != template.digest  # an edited file is a different template


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("{numbers} {target}", ["missing placeholder(s) {attempt}"]),
        ("nothing here", ["missing placeholder(s) {numbers}, {target}, {attempt}"]),
        ("{numbers} {target} {attempt} {answer}", ["unknown placeholder(s) {answer}"]),
        ("{numbers} {target} {attempt} {}", ["unknown placeholder(s) {}"]),
        ("{numbers} {target:>4} {attempt}", ["unknown placeholder(s) {target:>4}"]),
        ("{numbers!r} {target} {attempt}", ["unknown placeholder(s) {numbers!r}"]),
        ("{numbers} {target} {attempt} {x", ["doubled"]),
        ("{numbers} {target} {attempt} }", ["doubled"]),
    ],
)
def test_bad_template_files_are_refused_naming_the_problem(tmp_path, text, fragments):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_template(str(path))
    message = str(err.value)
    assert "prompts.template" in message and "bad.txt" in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_template_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"prompts.template 'studdy'.*study, post"):
        load_template("studdy")
    with pytest.raises(ValueError, match="prompts.template"):
        load_template("")
