"""MLP neuron sets ("value vectors"): parsing, validation against a model, and random control sets.

Neuron i of layer l is coordinate i of the input of that layer's MLP down projection: the activation
that multiplies the value vector `down_proj.weight[:, i]`. Researchers write neurons as `L20 N1234`
(or `L20N1234`), or as YAML pairs (`[20, 1234]`); parsing, canonical form and validation are the
ones heads have (`verif.design.components`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from verif.design.components import Kind, canonical, check_enough_sets, count_sets

Neuron = tuple[int, int]
NeuronSet = tuple[Neuron, ...]

NEURONS = Kind(
    noun="neuron", letter="N", per_layer="MLP neurons per layer", token=re.compile(r"^[Ll](\d+)\s*[Nn](\d+)$"),
    spellings="'L20 N1234', 'L20N1234' or [20, 1234]", example="'L20 N1234'",
)


def parse_neurons(spec: str | Iterable) -> list[Neuron]:
    """Parse a neuron set in any accepted spelling, keeping the order given (duplicates kept, see validate)."""
    return NEURONS.parse(spec)


def format_neurons(neurons: Iterable[Neuron]) -> str:
    """Canonical text form, e.g. 'L20 N77, L20 N1234'."""
    return NEURONS.format(neurons)


def validate_neurons(neurons: Sequence[Neuron], n_layers: int, n_neurons: int, what: str = "neuron set") -> NeuronSet:
    """Check every neuron against the model's shape and refuse duplicates; returns the canonical set."""
    return NEURONS.validate(neurons, n_layers, n_neurons, what)


def random_neuron_sets(
    n_sets: int,
    size: int,
    n_layers: int,
    n_neurons: int,
    seed: int,
    exclude: Iterable[Neuron] = (),
    match_layers_of: Sequence[Neuron] | None = None,
) -> list[NeuronSet]:
    """`n_sets` distinct random neuron sets of `size` neurons, reproducible from `seed`.

    `exclude` keeps chosen neurons (usually the target's) out of every set. `match_layers_of` draws
    each set with the same per-layer histogram as the given set, so a control differs from the
    target only in which neurons, not in which layers. Draws never enumerate the pool (a 36-layer
    model with 11008 neurons per layer has ~400k): a draw that hits an excluded neuron is redrawn, and
    so is one that repeats an earlier set, which is why the distinct sets are counted first.
    """
    excluded = set(exclude)
    if match_layers_of is not None:
        per_layer = Counter(layer for layer, _ in match_layers_of)
        for layer, k in per_layer.items():
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer}: model has {n_layers} layers (0-{n_layers - 1})")
            available = n_neurons - sum(1 for lyr, _ in excluded if lyr == layer)
            if available < k:
                raise ValueError(f"layer {layer}: need {k} neurons per control set, only {available} allowed")
    else:
        per_layer = None
        available = n_layers * n_neurons - sum(1 for lyr, i in excluded if 0 <= lyr < n_layers and 0 <= i < n_neurons)
        if size > available:
            raise ValueError(f"control sets of {size} neurons: only {available} neurons are allowed")
    check_enough_sets(n_sets, count_sets(size, n_layers, n_neurons, excluded, match_layers_of), size, "neuron")
    rng = random.Random(seed)

    def draw(layers: Sequence[int] | None, k: int) -> set[Neuron]:
        chosen: set[Neuron] = set()
        while len(chosen) < k:
            layer = rng.choice(layers) if layers is not None else rng.randrange(n_layers)
            cand = (layer, rng.randrange(n_neurons))
            if cand not in excluded:
                chosen.add(cand)
        return chosen

    seen: set[NeuronSet] = set()
    sets: list[NeuronSet] = []
    while len(sets) < n_sets:  # ends: at least n_sets distinct sets exist
        if per_layer is not None:
            chosen = set().union(*(draw([layer], k) for layer, k in sorted(per_layer.items())))
        else:
            chosen = draw(None, size)
        ns = canonical(chosen)
        if ns not in seen:
            seen.add(ns)
            sets.append(ns)
    return sets
