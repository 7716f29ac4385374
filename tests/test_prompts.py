"""The verification prompt must match the study's byte for byte (the post's display form here;
the study's code string is tested in test_templates.py)."""

import pytest

from verif.task import prompts
from verif.task.prompts import POST, format_numbers, render_prompt

POST_EXAMPLE = """A conversation between User and Assistant.
The User is given a set of numbers [79 17 60] to create an equation that equals 36.
The User can use basic arithmetic operations (+, -, *, /) and each number can only be used once.
The following is the User's attempt:
79 - 60 + 17 = 19 + 17 = 36
Your job as an Assistant is to verify if this attempt is correct or not.
Is the User's attempt correct? Answer only in 'Yes' or 'No'.
Assistant: Let me think about this step by step.
The User is given the set of numbers [79 17 60] and must create an equation that equals 36.
The User's attempt is 79 - 60 + 17 = 19 + 17 = 36. Therefore, the final answer is"""


def test_post_example_is_byte_exact():
    prompt = render_prompt([79, 17, 60], 36, "79 - 60 + 17 = 19 + 17 = 36", POST)
    assert prompt.encode() == POST_EXAMPLE.encode()


def test_prompt_ends_in_is_without_trailing_whitespace():
    prompt = render_prompt((1, 2, 3), 6, "1 + 2 + 3 = 3 + 3 = 6")
    assert prompt.endswith("the final answer is")


def test_templates_are_module_constants():
    for template in (prompts.STUDY, prompts.POST):
        assert "{numbers}" in template.text and "{attempt}" in template.text
        assert template.text.count("{target}") == 2


def test_numbers_keep_given_order():
    assert "[60 79 17]" in render_prompt([60, 79, 17], 36, "x")


@pytest.mark.parametrize(
    "numbers, text",
    [([79, 17, 60], "[79 17 60]"), ([79, 17, 5], "[79 17  5]"),
     ([100, 17, 5, 3], "[100  17   5   3]"), ([7], "[7]")],
)
def test_numbers_are_padded_like_numpy(numbers, text):
    assert format_numbers(numbers) == text


def test_numbers_match_numpy_when_available():
    np = pytest.importorskip("numpy")
    for numbers in ([79, 17, 60], [1, 100, 9, 10], [5, 5, 5], [3, 44]):
        assert format_numbers(numbers) == str(np.array(numbers))


def test_braces_in_attempt_are_kept_literally():
    assert "{0} {x}" in render_prompt([1, 2, 3], 6, "{0} {x}")
