"""The study's verification prompt, reproduced byte for byte.

The prompt ends in "the final answer is" with no trailing space or newline, so
the model's next token is the answer (" Yes" / " No") read at the last position.
"""

from __future__ import annotations

from typing import Sequence

PROMPT_TEMPLATE = (
    "A conversation between User and Assistant.\n"
    "The User is given a set of numbers {numbers} to create an equation that equals {target}.\n"
    "The User can use basic arithmetic operations (+, -, *, /) and each number can only be used once.\n"
    "The following is the User's attempt:\n"
    "{attempt}\n"
    "Your job as an Assistant is to verify if this attempt is correct or not.\n"
    "Is the User's attempt correct? Answer only in 'Yes' or 'No'.\n"
    "Assistant: Let me think about this step by step.\n"
    "The User is given the set of numbers {numbers} and must create an equation that equals {target}.\n"
    "The User's attempt is {attempt}. Therefore, the final answer is"
)


def format_numbers(numbers: Sequence[int]) -> str:
    """Numbers as ``str(numpy.array(numbers))`` prints them, as the study's
    notebook did: space separated in brackets, right-aligned to a common width
    (``[79 17  5]``), so prompts match the study's even for mixed widths."""
    texts = [str(int(x)) for x in numbers]
    width = max(map(len, texts), default=0)
    return "[" + " ".join(t.rjust(width) for t in texts) + "]"


def render_prompt(numbers: Sequence[int], target: int, attempt_text: str) -> str:
    """The verification prompt for one attempt, numbers in the given order."""
    return PROMPT_TEMPLATE.format(
        numbers=format_numbers(numbers), target=target, attempt=attempt_text
    )
