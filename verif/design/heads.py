"""Attention-head sets: parsing, validation against a model, and random control sets.

Researchers write heads the way papers print them (`L3 H13`), the way notebooks print them (`3.13`),
or as YAML pairs (`[3, 13]`). Everything is normalised to a sorted tuple of `(layer, head)` pairs so
that the same set always gets the same id, whatever order or spelling it was written in.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

Head = tuple[int, int]
HeadSet = tuple[Head, ...]

_TOKEN = re.compile(r"^(?:[Ll](\d+)\s*[Hh](\d+)|(\d+)\.(\d+))$")
# Split on commas, semicolons and newlines; inside one item, `L3 H13` keeps its space.
_ITEM_SPLIT = re.compile(r"[,;\n]+")
_SPACED_PAIR = re.compile(r"[Ll]\d+\s+[Hh]\d+")

# The 29 heads of Qwen2.5-3B that the study zero-ablates (MISSION.md), layers and heads from 0.
STUDY_HEADS_TEXT = (
    "L3 H13, L4 H5, L4 H0, L5 H9, L5 H14, L10 H0, L10 H5, L11 H8, L12 H3, L13 H6, L13 H3, "
    "L15 H8, L15 H4, L17 H14, L17 H13, L17 H11, L17 H10, L17 H9, L17 H3, L17 H1, L19 H13, "
    "L19 H8, L21 H7, L21 H14, L21 H2, L22 H14, L22 H12, L25 H14, L25 H11"
)


def _parse_token(token: str) -> Head:
    m = _TOKEN.match(token.strip())
    if not m:
        raise ValueError(
            f"cannot parse head {token!r}: write heads as 'L3 H13', 'L3H13', '3.13' or [3, 13]"
        )
    layer, head = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    return int(layer), int(head)


def _text_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for item in _ITEM_SPLIT.split(text):
        item = item.strip()
        if not item:
            continue
        # `L3 H13 L4 H5` (space separated pairs) and `3.13 4.5` both split on whitespace between pairs.
        pairs = _SPACED_PAIR.findall(item)
        rest = _SPACED_PAIR.sub(" ", item).split()
        tokens.extend(pairs + rest)
    return tokens


def parse_heads(spec: str | Iterable) -> list[Head]:
    """Parse a head set in any accepted spelling, keeping the order given (duplicates kept, see validate)."""
    if isinstance(spec, str):
        return [_parse_token(t) for t in _text_tokens(spec)]
    heads: list[Head] = []
    for item in spec:
        if isinstance(item, str):
            heads.extend(parse_heads(item))
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(v, int) for v in item):
            heads.append((int(item[0]), int(item[1])))
        else:
            raise ValueError(f"cannot parse head {item!r}: expected [layer, head] or a string like 'L3 H13'")
    return heads


def canonical(heads: Iterable[Head]) -> HeadSet:
    """Sorted, duplicate-free form: the identity of a head set."""
    return tuple(sorted(set(heads)))


def format_heads(heads: Iterable[Head]) -> str:
    """Canonical text form, e.g. 'L3 H13, L4 H0'."""
    return ", ".join(f"L{layer} H{head}" for layer, head in canonical(heads))


def validate_heads(heads: Sequence[Head], n_layers: int, n_heads: int, what: str = "head set") -> HeadSet:
    """Check every head against the model's shape and refuse duplicates; returns the canonical set."""
    errors = []
    for layer, head in heads:
        if not 0 <= layer < n_layers:
            errors.append(f"L{layer} H{head}: model has {n_layers} layers (0-{n_layers - 1})")
        elif not 0 <= head < n_heads:
            errors.append(f"L{layer} H{head}: model has {n_heads} heads per layer (0-{n_heads - 1})")
    dupes = [h for h, c in Counter(heads).items() if c > 1]
    if dupes:
        errors.append(f"duplicate heads: {format_heads(dupes)}")
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    return canonical(heads)


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
    a control differs from the target only in which heads, not in which layers.
    """
    excluded = set(exclude)
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in excluded]
    if match_layers_of is not None:
        per_layer = Counter(layer for layer, _ in match_layers_of)
        size = sum(per_layer.values())
        for layer, k in per_layer.items():
            available = sum(1 for lh in pool if lh[0] == layer)
            if available < k:
                raise ValueError(f"layer {layer}: need {k} heads per control set, only {available} allowed")
    elif size > len(pool):
        raise ValueError(f"control sets of {size} heads: only {len(pool)} heads are allowed")
    rng = random.Random(seed)
    seen: set[HeadSet] = set()
    sets: list[HeadSet] = []
    for _ in range(max(1000, 100 * n_sets)):
        if len(sets) == n_sets:
            break
        if match_layers_of is not None:
            chosen = [
                lh
                for layer, k in sorted(per_layer.items())
                for lh in rng.sample([p for p in pool if p[0] == layer], k)
            ]
        else:
            chosen = rng.sample(pool, size)
        hs = canonical(chosen)
        if hs not in seen:
            seen.add(hs)
            sets.append(hs)
    if len(sets) < n_sets:
        raise ValueError(f"only {len(sets)} distinct control sets of {size} heads exist under these constraints")
    return sets
