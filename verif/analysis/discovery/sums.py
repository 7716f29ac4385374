"""Per-prompt sums that shards compute and a driver adds.

Every discovery score is a mean over prompts (M is a mean of log-odds, so its gradient and its
ablation effects are means too). A worker therefore returns sums over its prompts together with the
prompt count; the driver adds the parts and divides once, which gives the same number as one pass
over all prompts (up to float64 summation order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PromptSums:
    """Named float64 arrays summed over `n_prompts` prompts."""

    sums: Mapping[str, np.ndarray]
    n_prompts: int

    def __add__(self, other: PromptSums) -> PromptSums:
        if set(self.sums) != set(other.sums):
            raise ValueError(f"cannot add sums of {sorted(self.sums)} and {sorted(other.sums)}")
        for key in self.sums:
            if self.sums[key].shape != other.sums[key].shape:
                raise ValueError(f"sums[{key!r}]: shapes {self.sums[key].shape} and {other.sums[key].shape} differ")
        return PromptSums({k: self.sums[k] + other.sums[k] for k in self.sums}, self.n_prompts + other.n_prompts)

    def mean(self, key: str) -> np.ndarray:
        """The mean over all prompts of the summed quantity `key`."""
        if self.n_prompts == 0:
            raise ValueError("no prompts were summed: a mean over zero prompts is undefined")
        return self.sums[key] / self.n_prompts


def combine(parts: Iterable[PromptSums]) -> PromptSums:
    """Add the partial sums of several shards (at least one)."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine needs at least one PromptSums")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
