"""The objective discovery ranks components by.

Per prompt, `log_odds = log P(Yes) - log P(No)`, with P(Yes) and P(No) the softmax probabilities
summed over the spelling variants, from a float64 log-softmax of the last position's logits: the
sweep's own arithmetic (`verif.model.score.yes_no_log_probs`). The objective M is the mean of
`log_odds` over the chosen prompts; the effect of a component is M with it zero-ablated minus M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verif.model.score import YesNoIds, yes_no_log_probs

PROMPT_CHOICES = ("correct", "incorrect", "all")


def choose_prompts(labels: Sequence[bool], which: str) -> list[int]:
    """Indices of the prompts M averages: those whose attempt is correct, incorrect, or all of them."""
    if which not in PROMPT_CHOICES:
        raise ValueError(f"discover.prompts: {which!r} is not one of {', '.join(PROMPT_CHOICES)}")
    chosen = [i for i, label in enumerate(labels) if which == "all" or bool(label) == (which == "correct")]
    if not chosen:
        raise ValueError(f"discover.prompts: {which!r} selects no prompt out of {len(labels)}")
    return chosen


def log_odds(last_logits: torch.Tensor, ids: YesNoIds) -> torch.Tensor:
    """`[rows]` float64 log P(Yes) - log P(No) from `[rows, vocab]` logits; differentiable."""
    log_yes, log_no = yes_no_log_probs(last_logits, ids)
    return log_yes - log_no
