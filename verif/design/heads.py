"""Attention-head sets: parsing, validation against a model, and random control sets.

Researchers write heads the way papers print them (`L3 H13`), the way notebooks print them (`3.13`),
or as YAML pairs (`[3, 13]`). Everything is normalised to a sorted tuple of `(layer, head)` pairs so
that the same set always gets the same id, whatever order or spelling it was written in (the parsing,
canonical form and validation neuron sets share: `verif.design.components`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from verif.design.components import Kind, canonical, check_enough_sets, count_sets

Head = tuple[int, int]
HeadSet = tuple[Head, ...]

# The 29 heads of Qwen2.5-3B that the study zero-ablates (MISSION.md), layers and heads from 0.
STUDY_HEADS_TEXT = (
    "L3 H13, L4 H5, L4 H0, L5 H9, L5 H14, L10 H0, L10 H5, L11 H8, L12 H3, L13 H6, L13 H3, "
    "L15 H8, L15 H4, L17 H14, L17 H13, L17 H11, L17 H10, L17 H9, L17 H3, L17 H1, L19 H13, "
    "L19 H8, L21 H7, L21 H14, L21 H2, L22 H14, L22 H12, L25 H14, L25 H11"
)


HEADS = Kind(
    noun="head", letter="H", per_layer="heads per layer",
    token=re.compile(r"^(?:[Ll](\d+)\s*[Hh](\d+)|(\d+)\.(\d+))$"),
    spellings="'L3 H13', 'L3H13', '3.13' or [3, 13]", example="'L3 H13'",
)


def parse_heads(spec: str | Iterable) -> list[Head]:
    """Parse a head set in any accepted spelling, keeping the order given (duplicates kept, see validate)."""
    return HEADS.parse(spec)


def format_heads(heads: Iterable[Head]) -> str:
    """Canonical text form, e.g. 'L3 H13, L4 H0'."""
    return HEADS.format(heads)


def validate_heads(heads: Sequence[Head], n_layers: int, n_heads: int, what: str = "head set") -> HeadSet:
    """Check every head against the model's shape and refuse duplicates; returns the canonical set."""
    return HEADS.validate(heads, n_layers, n_heads, what)


def random_head_sets(
    n_sets: int,
    size: int,
    n_layers: int,
    n_heads: int,
    seed: int,
    exclude: Iterable[Head] = (),
    match_layers_of: Sequence[Head] | None = None,
) -> list[HeadSet]:
    """`n_sets` distinct random head sets of `size` heads, reproducible from `seed`.

    `exclude` keeps chosen heads (usually the target's) out of every control set. `match_layers_of`
    draws each set with the same per-layer histogram as the given set (e.g. 7 heads in layer 17), so
    a control differs from the target only in which heads, not in which layers. A draw that repeats an
    earlier set is redrawn, so the number of distinct sets is counted first (`count_sets`).
    """
    excluded = set(exclude)
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in excluded]
    if match_layers_of is not None:
        per_layer = Counter(layer for layer, _ in match_layers_of)
        size = sum(per_layer.values())
        by_layer = {layer: [lh for lh in pool if lh[0] == layer] for layer in per_layer}
        for layer, k in per_layer.items():
            if len(by_layer[layer]) < k:
                raise ValueError(f"layer {layer}: need {k} heads per control set, only {len(by_layer[layer])} allowed")
    elif size > len(pool):
        raise ValueError(f"control sets of {size} heads: only {len(pool)} heads are allowed")
    check_enough_sets(n_sets, count_sets(size, n_layers, n_heads, excluded, match_layers_of), size, "head")
    rng = random.Random(seed)
    seen: set[HeadSet] = set()
    sets: list[HeadSet] = []
    while len(sets) < n_sets:  # ends: at least n_sets distinct sets exist
        if match_layers_of is not None:
            chosen = [lh for layer, k in sorted(per_layer.items()) for lh in rng.sample(by_layer[layer], k)]
        else:
            chosen = rng.sample(pool, size)
        hs = canonical(chosen)
        if hs not in seen:
            seen.add(hs)
            sets.append(hs)
    return sets
