"""The verification prompt: the study's exact string, the post's display form, or a template file.

The study's notebook builds its prompt with sentences joined by single spaces and only three line
breaks (after "attempt:", after the attempt, after "Answer only in 'Yes' or 'No'."); the post shows
the same sentences one per line. The two tokenise differently, so the model sees different inputs:
`prompts.template` names which one a sweep uses (`study`, the default, or `post`), or a text file
with the placeholders `{numbers}`, `{target}` and `{attempt}` for other verification formats.

Every template ends where the model's answer starts (the built-in ones in "the final answer is",
no trailing space or newline), so the next token (" Yes" / " No") is read at the last position.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PLACEHOLDERS = ("numbers", "target", "attempt")

STUDY_TEXT = (
    "A conversation between User and Assistant. "
    "The User is given a set of numbers {numbers} to create an equation that equals {target}. "
    "The User can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "The following is the User's attempt:\n"
    "{attempt}\n"
    "Your job as an Assistant is to verify if this attempt is correct or not. "
    "Is the User's attempt correct? Answer only in 'Yes' or 'No'.\n"
    "Assistant: Let me think about this step by step. "
    "The User is given the set of numbers {numbers} and must create an equation that equals {target}. "
    "The User's attempt is {attempt}. Therefore, the final answer is"
)
"""The string the study's code builds (MISSION.md, "What the study's code does")."""

POST_TEXT = (
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
"""The same sentences as the post displays them, one per line."""


@dataclass(frozen=True)
class Template:
    """A verification prompt template. `name` goes into prompts.parquet and the manifest; `digest`
    (sha256 of the text) changes whenever the text does, so a resume can refuse an edited file."""

    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, numbers: Sequence[int], target: int, attempt: str) -> str:
        """The prompt for one attempt; numbers in the given order, printed as numpy prints them."""
        return self.text.format(numbers=format_numbers(numbers), target=target, attempt=attempt)


STUDY = Template("study", STUDY_TEXT)
POST = Template("post", POST_TEXT)
BUILTIN = {t.name: t for t in (STUDY, POST)}
DEFAULT_TEMPLATE = "study"


def check_template_text(text: str, where: str) -> None:
    """Refuse a template whose placeholders are not exactly {numbers}, {target}, {attempt} (each
    at least once). `where` names the source in the message. Parsing is str.format's own, so a
    template that passes renders with exactly these three values."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:  # a single '{' or '}'
        raise ValueError(
            f"prompts.template {where}: {e}; write a literal brace doubled ('{{{{' or '}}}}')"
        ) from None
    seen, unknown = set(), []
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name in PLACEHOLDERS and not spec and conversion is None:
            seen.add(name)
        else:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            unknown.append(shown)
    valid = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    if unknown:
        raise ValueError(
            f"prompts.template {where}: unknown placeholder(s) {', '.join(unknown)}; valid placeholders "
            f"are {valid} (no format spec or conversion); write a literal brace doubled ('{{{{' or '}}}}')"
        )
    missing = [p for p in PLACEHOLDERS if p not in seen]
    if missing:
        raise ValueError(
            f"prompts.template {where}: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)}; "
            f"a template must contain each of {valid}"
        )


def load_template(spec: str) -> Template:
    """`study`, `post`, or the path of a UTF-8 text file holding a template.

    One final line break of the file is dropped (editors add one, and a trailing newline would move
    the position the answer is read at); to end a prompt in a newline, end the file in two.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"prompts.template must be 'study', 'post' or a template file path, got {spec!r}")
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(
            f"prompts.template {spec!r}: not a built-in template ({', '.join(BUILTIN)}) "
            "and no such file (a template file holds {numbers}, {target} and {attempt})"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts.template {spec!r}: not UTF-8 text ({e})") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    check_template_text(text, repr(spec))
    return Template(f"file:{path.resolve()}", text)


def format_numbers(numbers: Sequence[int]) -> str:
    """Numbers as ``str(numpy.array(numbers))`` prints them, as the study's
    notebook did: space separated in brackets, right-aligned to a common width
    (``[79 17  5]``), so prompts match the study's even for mixed widths. (numpy
    also wraps lines longer than 75 characters; Countdown's 3-4 numbers never
    come near that.)"""
    texts = [str(int(x)) for x in numbers]
    width = max(map(len, texts), default=0)
    return "[" + " ".join(t.rjust(width) for t in texts) + "]"


def render_prompt(
    numbers: Sequence[int], target: int, attempt_text: str, template: Template = STUDY
) -> str:
    """The verification prompt for one attempt (the study's string unless another template is given)."""
    return template.render(numbers, target, attempt_text)
