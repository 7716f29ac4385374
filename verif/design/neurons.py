"""MLP neuron sets ("value vectors"): parsing, validation against a model, and random control sets.

Neuron i of layer l is coordinate i of the input of that layer's MLP down projection: the activation
that multiplies the value vector `down_proj.weight[:, i]`. Researchers write neurons as `L20 N1234`
(or `L20N1234`), or as YAML pairs (`[20, 1234]`). Everything is normalised to a sorted tuple of
`(layer, neuron)` pairs, so the same set always has the same identity whatever its spelling.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

Neuron = tuple[int, int]
NeuronSet = tuple[Neuron, ...]

_TOKEN = re.compile(r"^[Ll](\d+)\s*[Nn](\d+)$")
_ITEM_SPLIT = re.compile(r"[,;\n]+")
_SPACED_PAIR = re.compile(r"[Ll]\d+\s+[Nn]\d+")


def _parse_token(token: str) -> Neuron:
    m = _TOKEN.match(token.strip())
    if not m:
        raise ValueError(f"cannot parse neuron {token!r}: write neurons as 'L20 N1234', 'L20N1234' or [20, 1234]")
    return int(m.group(1)), int(m.group(2))


def _text_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for item in _ITEM_SPLIT.split(text):
        pairs = _SPACED_PAIR.findall(item)  # `L20 N1 L21 N2`: pairs separated by spaces
        tokens.extend(pairs + _SPACED_PAIR.sub(" ", item).split())
    return tokens


def parse_neurons(spec: str | Iterable) -> list[Neuron]:
    """Parse a neuron set in any accepted spelling, keeping the order given (duplicates kept, see validate)."""
    if isinstance(spec, str):
        return [_parse_token(t) for t in _text_tokens(spec)]
    neurons: list[Neuron] = []
    for item in spec:
        if isinstance(item, str):
            neurons.extend(parse_neurons(item))
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(v, int) for v in item):
            neurons.append((int(item[0]), int(item[1])))
        else:
            raise ValueError(f"cannot parse neuron {item!r}: expected [layer, neuron] or a string like 'L20 N1234'")
    return neurons


def canonical_neurons(neurons: Iterable[Neuron]) -> NeuronSet:
    """Sorted, duplicate-free form: the identity of a neuron set."""
    return tuple(sorted(set((int(layer), int(i)) for layer, i in neurons)))


def format_neurons(neurons: Iterable[Neuron]) -> str:
    """Canonical text form, e.g. 'L20 N77, L20 N1234'."""
    return ", ".join(f"L{layer} N{i}" for layer, i in canonical_neurons(neurons))


def validate_neurons(neurons: Sequence[Neuron], n_layers: int, n_neurons: int, what: str = "neuron set") -> NeuronSet:
    """Check every neuron against the model's shape and refuse duplicates; returns the canonical set."""
    errors = []
    for layer, i in neurons:
        if not 0 <= layer < n_layers:
            errors.append(f"L{layer} N{i}: model has {n_layers} layers (0-{n_layers - 1})")
        elif not 0 <= i < n_neurons:
            errors.append(f"L{layer} N{i}: model has {n_neurons} MLP neurons per layer (0-{n_neurons - 1})")
    dupes = [n for n, c in Counter(neurons).items() if c > 1]
    if dupes:
        errors.append(f"duplicate neurons: {format_neurons(dupes)}")
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    return canonical_neurons(neurons)


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
    model with 11008 neurons per layer has ~400k): a draw that hits an excluded neuron is redrawn.
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
    for _ in range(max(1000, 100 * n_sets)):
        if len(sets) == n_sets:
            break
        if per_layer is not None:
            chosen = set().union(*(draw([layer], k) for layer, k in sorted(per_layer.items())))
        else:
            chosen = draw(None, size)
        ns = canonical_neurons(chosen)
        if ns not in seen:
            seen.add(ns)
            sets.append(ns)
    if len(sets) < n_sets:
        raise ValueError(f"only {len(sets)} distinct control sets of {size} neurons exist under these constraints")
    return sets
