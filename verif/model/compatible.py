"""Whether two models can exchange activations: the same architecture, the same tokens for every prompt.

Cross-model activation patching (`verif.analysis.cmap`) puts one model's head slices and neuron
activations into another's forward at the same positions. That means something only when both
models have the same layers, heads and widths, and when every prompt is the same token sequence in
both (a different split of one word would move every later position). Both are checked from configs
and tokenizers, before any weights load; each check returns one line naming what differs, or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from verif.model.arch import Arch

# What decides the shapes and places of the patched activations (the vocabulary is checked through
# the prompts' tokens, and tied embeddings do not move an activation).
PATCH_FIELDS = ("family", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size", "intermediate_size")


def architecture_difference(archs: Mapping[str, Arch]) -> str | None:
    """The first of PATCH_FIELDS in which the models differ, with every model's value; None if none."""
    items = list(archs.items())
    for name in PATCH_FIELDS:
        values = [dataclasses.asdict(arch)[name] for _, arch in items]
        if len(set(values)) > 1:
            listed = ", ".join(f"{model} {value}" for (model, _), value in zip(items, values))
            return f"models differ in {name}: {listed}"
    return None


def tokenization_difference(tokens: Mapping[str, Sequence[Sequence[int]]], where: Sequence[str]) -> str | None:
    """The first prompt whose token ids differ between two models (`tokens[model][prompt]`), named by
    `where[prompt]`, with both lengths and the first position that differs; None if every prompt agrees."""
    (first, ref), *others = tokens.items()
    for model, ids in others:
        if len(ids) != len(ref):
            raise ValueError(f"{len(ref)} prompts tokenized by {first}, {len(ids)} by {model}")
        for i, (a, b) in enumerate(zip(ref, ids)):
            if list(a) != list(b):
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return (f"{where[i]} tokenizes differently: {first} {len(a)} tokens, {model} {len(b)} tokens, first "
                        f"difference at token {at} ({first} {_token_at(a, at)}, {model} {_token_at(b, at)})")
    return None


def _token_at(ids: Sequence[int], at: int) -> str:
    return str(ids[at]) if at < len(ids) else "end"
