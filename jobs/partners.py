"""Each prompt's partner: what resample patches a prompt with (the other prompt of its counterfactual pair).

`prompts.parquet` carries `pair_id` (Int64, null without pairs; made by `jobs.prepare.build_prompts`): a
pair is the two rows sharing one, a correct attempt and an incorrect one of the same token length. A
worker reads the partner's activations from the partner's text, which travels with the shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from jobs.errors import InputError
from verif.design.conditions import PAIRED_KINDS, Condition


def pair_partners(prompts: pl.DataFrame, conditions: Sequence[Condition], paired: bool = False,
                  key: str = "ablation.kind") -> list[int] | None:
    """Each prompt's partner (the row of its pair that is not itself) when a condition resamples (or `paired`:
    a discovery under resample), else None.

    A pair is the two rows of `prompts.parquet` sharing a `pair_id`; the worker reads the partner's
    activations from the partner's text, which travels with the shard (partners need not share one)."""
    if not paired and not any(c.intervention in PAIRED_KINDS for c in conditions):
        return None
    ids = prompts["pair_id"].to_list() if "pair_id" in prompts.columns else [None] * prompts.height
    rows: dict[int, list[int]] = {}
    for i, pid in enumerate(ids):
        if pid is not None:
            rows.setdefault(pid, []).append(i)
    partners = []
    for i, pid in enumerate(ids):
        pair = rows.get(pid, []) if pid is not None else []
        if len(pair) != 2:
            raise InputError(f"{key}: resample patches each prompt with its partner's activations, and prompt "
                             f"{i} has {'no pair' if pid is None else f'{len(pair) - 1} partners in pair {pid}'}; "
                             "resample needs counterfactual pairs (prompts.pairs: true, or a prompts.file with pair_id)")
        partners.append(pair[1] if pair[0] == i else pair[0])
    return partners
