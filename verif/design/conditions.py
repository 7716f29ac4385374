"""Ablation conditions: what a sweep scores every prompt under.

`baseline` ablates nothing; `target` is the component set under study (attention heads, MLP neurons
or both); `random-NNN` are control sets with the target's number of heads and of neurons, the null
distribution the target's effect is judged against; `layer-LL` ablates every head of one layer;
`head-LxxHyy` ablates one head. Ids are stable, so results from different runs of the same
configuration line up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from verif.design.components import canonical
from verif.design.heads import Head, HeadSet, format_heads, random_head_sets
from verif.design.neurons import NeuronSet, format_neurons, random_neuron_sets

SWEEPS = ("layer", "single_head")
# Neuron controls draw from their own stream, so adding neurons to a target leaves its head controls
# exactly as they were (same seed, same head sets).
NEURON_SEED_OFFSET = 7919


@dataclass(frozen=True)
class Ablation:
    """What one condition zero-ablates: attention heads and MLP neurons, as canonical sorted tuples.

    A head is its slice of the attention output projection's input; a neuron is its coordinate of
    the MLP down projection's input; both are zeroed at every position.
    """

    heads: HeadSet = ()
    neurons: NeuronSet = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", canonical(self.heads))
        object.__setattr__(self, "neurons", canonical(self.neurons))

    @classmethod
    def of(cls, item: Ablation | Iterable[Head]) -> Ablation:
        """An `Ablation` as is, or a plain head set (the form callers used before neurons existed)."""
        return item if isinstance(item, Ablation) else cls(tuple(item))

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers where anything is ablated, ascending."""
        return tuple(sorted({layer for layer, _ in self.heads} | {layer for layer, _ in self.neurons}))

    def __bool__(self) -> bool:
        return bool(self.heads or self.neurons)

    def describe(self) -> str:
        """'L3 H13, L4 H0 | L20 N1234' (either part may be absent; 'nothing' when empty)."""
        parts = [p for p in (format_heads(self.heads), format_neurons(self.neurons)) if p]
        return " | ".join(parts) or "nothing"


@dataclass(frozen=True)
class Condition:
    """One ablation condition: a stable id, its kind and its (canonical) heads and neurons."""

    id: str
    kind: str
    heads: HeadSet
    layer: int | None = None
    head: int | None = None
    neurons: NeuronSet = field(default=())

    @property
    def ablation(self) -> Ablation:
        return Ablation(self.heads, self.neurons)

    def row(self) -> dict:
        """The condition as a row of `conditions.parquet`."""
        return {
            "condition": self.id,
            "kind": self.kind,
            "heads": format_heads(self.heads),
            "n_heads": len(self.heads),
            "neurons": format_neurons(self.neurons),
            "n_neurons": len(self.neurons),
            "layer": self.layer,
            "head": self.head,
        }


def build_conditions(
    n_layers: int,
    n_heads: int,
    target: Sequence[Head] | Ablation,
    n_random: int,
    seed: int,
    exclude_target: bool = True,
    match_layers: bool = False,
    sweeps: Sequence[str] = (),
    n_neurons: int | None = None,
) -> list[Condition]:
    """Baseline, target (if any), random controls matching the target, then the requested sweeps.

    `target` is a head set or an `Ablation` with heads and/or neurons. Each control has as many
    heads as the target and as many neurons (`n_neurons`, the MLP width, is needed only then),
    both drawn with the target's per-layer histogram when `match_layers` is set.
    """
    tgt = Ablation.of(target)
    conditions = [Condition("baseline", "baseline", ())]
    if tgt:
        conditions.append(Condition("target", "target", tgt.heads, neurons=tgt.neurons))
    if n_random:
        if not tgt:
            raise ValueError("random controls need a target set (ablation.target_heads or target_neurons): "
                             "they match its size")
        head_sets: list[HeadSet] = [()] * n_random
        if tgt.heads:
            head_sets = random_head_sets(
                n_random, len(tgt.heads), n_layers, n_heads, seed,
                exclude=tgt.heads if exclude_target else (),
                match_layers_of=tgt.heads if match_layers else None,
            )  # fmt: skip
        neuron_sets: list[NeuronSet] = [()] * n_random
        if tgt.neurons:
            if not n_neurons:
                raise ValueError("build_conditions: n_neurons (the MLP width) is needed for neuron controls")
            neuron_sets = random_neuron_sets(
                n_random, len(tgt.neurons), n_layers, n_neurons, seed + NEURON_SEED_OFFSET,
                exclude=tgt.neurons if exclude_target else (),
                match_layers_of=tgt.neurons if match_layers else None,
            )  # fmt: skip
        conditions += [
            Condition(f"random-{i:03d}", "random", hs, neurons=ns)
            for i, (hs, ns) in enumerate(zip(head_sets, neuron_sets, strict=True))
        ]
    if "layer" in sweeps:
        conditions += [
            Condition(f"layer-{layer:02d}", "layer", tuple((layer, h) for h in range(n_heads)), layer=layer)
            for layer in range(n_layers)
        ]
    if "single_head" in sweeps:
        conditions += [
            Condition(f"head-L{layer:02d}H{h:02d}", "single_head", ((layer, h),), layer=layer, head=h)
            for layer in range(n_layers)
            for h in range(n_heads)
        ]
    return conditions
