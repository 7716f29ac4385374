"""Exact ablation effects through the sweep's engine, and which heads to screen exactly.

The effect of a component set is `delta = M(set intervened on at every position) - M(no ablation)`
(zero-ablated by default; `discover.intervention` mean or resample through `Sources`),
scored by `verif.model.engine.Scorer` exactly as a sweep scores its conditions (shared trunk, float64
log-softmax). `score_log_odds` is the one place that talks to the engine, so switching to another
engine signature touches one function.

Shards return `PromptSums` of per-prompt differences `log_odds(set) - log_odds(none)` (summed per
prompt before summing over prompts, so the small effects do not cancel against the large baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np

from verif.analysis.discovery.sums import PromptSums
from verif.design.conditions import Ablation
from verif.design.heads import Head
from verif.model.engine import Scorer
from verif.model.interventions import Sources


def score_log_odds(scorer: Scorer, token_ids: Sequence[Sequence[int]], sets: Sequence[Ablation],
                   sources: Sources | None = None) -> np.ndarray:
    """`[n_prompts, n_sets]` float64 log-odds of each prompt under each set (the engine adapter)."""
    return scorer.score_tokens(token_ids, sets, sources).log_odds


def delta_sums(scorer: Scorer, token_ids: Sequence[Sequence[int]], sets: Sequence[Ablation],
               sources: Sources | None = None) -> PromptSums:
    """Sums over these prompts: `delta` `[n_sets]` of log_odds(set) - log_odds(none), and `log_odds`
    (`sources`: what sets of a non-zero kind read, `verif.model.interventions`).

    `.mean("delta")` of the combined sums is each set's exact effect on M; non-finite log-odds (a
    probability that underflowed) make the affected effects NaN rather than being dropped.
    """
    if not token_ids:
        raise ValueError("delta_sums: no prompts given")
    scores = score_log_odds(scorer, token_ids, [Ablation(), *sets], sources)
    base = scores[:, :1]
    return PromptSums({"delta": (scores[:, 1:] - base).sum(0), "log_odds": base.sum()}, len(token_ids))


def heads_to_screen(atp_heads: np.ndarray, exact: int | str) -> list[Head]:
    """The heads `discover.exact` asks to score exactly: `"all"`, or the top k by |atp| (ties: lower index).

    `atp_heads` is `[L, H]`; the result is ordered by decreasing |atp| (all heads: by layer and head).
    """
    n_layers, n_heads = atp_heads.shape
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if exact == "all":
        return every
    if isinstance(exact, bool) or not isinstance(exact, int) or exact < 1:
        raise ValueError(f"discover.exact: {exact!r} must be 'all' or a positive int (top k heads by |atp|)")
    order = np.argsort(-np.abs(atp_heads).ravel(), kind="stable")
    return [every[i] for i in order[: min(exact, len(every))]]


def single_head_sets(heads: Sequence[Head], kind: str = "zero") -> list[Ablation]:
    """One condition per head, each intervening on that head alone (with `kind`)."""
    return [Ablation(heads=(head,), kind=kind) for head in heads]
