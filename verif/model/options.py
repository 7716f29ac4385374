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
    # The two token budgets bound a worker's memory whatever the prompts' lengths (a prompt longer than
    # `max_prompt_tokens` is refused): a chunk's temporaries grow with its tokens, a unit's held states
    # with its tokens (see verif.model.engine).
    max_chunk_tokens: int = doc("Tokens (rows x padded length) of one forward chunk at most, on CPU as on GPU: "
                                "max_rows is lowered for long prompts.", 65536, at_least(1))
    max_unit_tokens: int = doc("Tokens (rows x padded length) a unit holds at once at most: max_unit_rows is "
                               "lowered for long prompts.", 524288, at_least(2))
    share_trunk: bool = doc("Compute layers below a condition's first ablated layer once per prompt.", True)
    bucket_by_length: bool = doc("Sort prompts by token length into units; a unit mixes lengths only to fill a "
                                 "forward chunk, and within bucket_ratio.", True)
    bucket_ratio: float = doc("Longest / shortest prompt a unit may mix (padding costs the difference in every "
                              "layer): a long prompt never pads short ones. 1 = one length per unit.", 1.125,
                              at_least(1))
    compile: bool = doc("torch.compile the decoder layer (on a GPU; see README, Speed).", False)
    # float32 rounding of the shorter last-block GEMMs differs from the plain path by ~1e-5 in log-odds.
    last_position_only: bool = doc("Run the last decoder block for the last position only.", False)
    pad_id: int | None = doc("Padding token id; null = the tokenizer's, else the model config's.", None)
    # share_trunk, compile and last_position_only act on the fast path only.
    path: str = doc("auto (the fast path where it implements the model, else the hook path with a warning), "
                    "fast (refuse a model it does not implement) or hook (the model's own forward with hooks).",
                    "auto", lambda v: None if v in PATHS else f"must be one of {', '.join(map(repr, PATHS))}")

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the engine scores: one row must fit a chunk, a trunk and a branch row a unit."""
        return min(self.max_chunk_tokens, self.max_unit_tokens // 2)
