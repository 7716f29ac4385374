"""Yes/No scoring: token sets, probabilities from last-position logits, and the plain batched path.

The study sums the softmax probability over spelling variants (" Yes", "Yes", " yes", "yes" and the
same for No) and reports `p_yes / (p_yes + p_no)`. Probabilities are taken from a float64
log-softmax over the full vocabulary, so tiny ablation effects are not lost to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from verif.model.ablation import AblationMasks, HookedAblation
from verif.model.options import DEFAULT_NO, DEFAULT_YES



@dataclass(frozen=True)
class YesNoIds:
    """Token ids of the Yes and No variants, each variant exactly one token."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def resolve_yes_no(tokenizer, yes: Sequence[str] = DEFAULT_YES, no: Sequence[str] = DEFAULT_NO) -> YesNoIds:
    """Encode each variant; a variant that is not exactly one token, or a token in both sets, is an error."""

    def ids(variants: Sequence[str], which: str) -> tuple[int, ...]:
        if not variants:
            raise ValueError(f"scoring.{which}: at least one variant is needed")
        out = []
        for text in variants:
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"scoring.{which}: variant {text!r} encodes to {len(enc)} tokens {enc}; "
                    "each variant must be exactly one token of this model's vocabulary"
                )
            out.append(enc[0])
        if len(set(out)) != len(out):
            raise ValueError(f"scoring.{which}: variants {list(variants)} repeat a token id {out}")
        return tuple(out)

    yes_ids, no_ids = ids(yes, "yes"), ids(no, "no")
    both = set(yes_ids) & set(no_ids)
    if both:
        raise ValueError(f"scoring: token ids {sorted(both)} are in both the yes and the no set")
    return YesNoIds(yes_ids, no_ids)


@dataclass
class YesNoScores:
    """Per-row results (float64): summed probabilities, normalised P(yes) and log-odds."""

    p_yes: np.ndarray
    p_no: np.ndarray
    p_yes_norm: np.ndarray
    log_odds: np.ndarray

    @property
    def nonfinite(self) -> np.ndarray:
        """Rows where any value is NaN or infinite: reported, never averaged."""
        stacked = np.stack([self.p_yes, self.p_no, self.p_yes_norm, self.log_odds])
        return ~np.isfinite(stacked).all(axis=0)


def yes_no_log_probs(last_logits: torch.Tensor, ids: YesNoIds) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(yes set), log p(no set) per row, from `[rows, vocab]` logits, in float64."""
    logp = torch.log_softmax(last_logits.double(), dim=-1)
    yes = torch.logsumexp(logp[:, list(ids.yes)], dim=-1)
    no = torch.logsumexp(logp[:, list(ids.no)], dim=-1)
    return yes, no


def scores_from_log_probs(log_yes: np.ndarray, log_no: np.ndarray) -> YesNoScores:
    """p_yes_norm = p_yes / (p_yes + p_no) computed as a sigmoid of the log-odds (no underflow)."""
    log_yes = np.asarray(log_yes, dtype=np.float64)
    log_no = np.asarray(log_no, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        log_odds = log_yes - log_no
        p_yes_norm = 1.0 / (1.0 + np.exp(-log_odds))
    return YesNoScores(np.exp(log_yes), np.exp(log_no), p_yes_norm, log_odds)


def left_pad(token_ids: Sequence[Sequence[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and position ids that count only real tokens."""
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, toks in enumerate(token_ids):
        ids[row, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[row, width - len(toks):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def score_plain(
    model: nn.Module,
    hooks: HookedAblation,
    token_ids: Sequence[Sequence[int]],
    masks: torch.Tensor | AblationMasks,
    ids: YesNoIds,
    pad_id: int,
    full_logits: bool = False,
) -> YesNoScores:
    """The model's own forward with hook ablation: the reference the fast engine is checked against.

    `masks`: one row per prompt, head keep-masks `[rows, L, H]` or `AblationMasks` (heads and
    neurons). `full_logits=True` computes logits at every position, as a notebook would (for
    benchmarks only).
    """
    device = next(model.parameters()).device
    input_ids, attn, positions = left_pad(token_ids, pad_id, device)
    if isinstance(masks, AblationMasks):
        hooks.set(masks, device)
    else:
        hooks.masks = masks.to(device)
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=positions,
            logits_to_keep=0 if full_logits else 1,
            use_cache=False,
        )
    finally:
        hooks.set(None)
    log_yes, log_no = yes_no_log_probs(out.logits[:, -1], ids)
    return scores_from_log_probs(log_yes.cpu().numpy(), log_no.cpu().numpy())
