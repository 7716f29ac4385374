"""What a user chooses about the model side: dtypes, devices, Yes/No variants, how the engine cuts work.

Torch-free on purpose: the configuration is validated against these before torch, transformers or
Ray are imported, so a typo costs a fraction of a second. Each field's `metadata` carries its one-line
documentation (the README's configuration reference is generated from it) and, where a type alone
does not say what is valid, a `check` returning an error text or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATHS = ("auto", "fast", "hook")
DEVICES = ("auto", "cpu", "cuda")
# The study sums these spelling variants (each one token of the Qwen2.5 vocabulary).
DEFAULT_YES = (" Yes", "Yes", " yes", "yes")
DEFAULT_NO = (" No", "No", " no", "no")


def positive_or_auto(v: int | str) -> str | None:
    """A whole number >= 1, or 'auto'."""
    if isinstance(v, str):
        return None if v == "auto" else "must be a whole number >= 1 or 'auto'"
    return None if v >= 1 else "must be >= 1"


def at_least(low: int):
    """A check: the value is >= `low`."""
    return lambda v: None if v >= low else f"must be >= {low}"


def doc(text: str, default: Any, check=None) -> Any:
    """A dataclass field with its documentation and optional check (immutable defaults only)."""
    return field(default=default, metadata={"doc": text, "check": check})


@dataclass(frozen=True)
class EngineOptions:
    """How the scorer cuts work into forward calls; none of these change a result (tested)."""

    max_rows: int | str = doc("Rows (prompt x condition) per forward chunk; auto = from free GPU memory.", 64,
                              positive_or_auto)
    max_unit_rows: int = doc("Rows held at once while conditions branch off a shared trunk.", 2048, at_least(2))
    share_trunk: bool = doc("Compute layers below a condition's first ablated layer once per prompt.", True)
    bucket_by_length: bool = doc("Group prompts of one token length into a unit (no padding).", True)
    compile: bool = doc("torch.compile the decoder layer (on a GPU; see README, Speed).", False)
    # float32 rounding of the shorter last-block GEMMs differs from the plain path by ~1e-5 in log-odds.
    last_position_only: bool = doc("Run the last decoder block for the last position only.", False)
    pad_id: int | None = doc("Padding token id; null = the tokenizer's, else the model config's.", None)
    # share_trunk, compile and last_position_only act on the fast path only.
    path: str = doc("auto (the fast path where it implements the model, else the hook path with a warning), "
                    "fast (refuse a model it does not implement) or hook (the model's own forward with hooks).",
                    "auto", lambda v: None if v in PATHS else f"must be one of {', '.join(map(repr, PATHS))}")
