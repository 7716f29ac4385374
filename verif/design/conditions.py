"""Ablation conditions: what a sweep scores every prompt under.

`baseline` ablates nothing; `target` is the component set under study (attention heads, MLP neurons
or both); `random-NNN` are control sets with the target's number of heads and of neurons, the null
distribution the target's effect is judged against; `layer-LL` ablates every head of one layer;
`head-LxxHyy` ablates one head. Ids are stable, so results from different runs of the same
configuration line up.

Every condition but the baseline intervenes with one kind (`INTERVENTIONS`, the `intervention` column of
conditions.parquet): zero (the study's ablation), mean, mean_positional or resample. Several kinds score
every condition under each (`with_interventions`): the zero condition keeps its plain id, another kind
appends `@kind` (`target@mean`, `random-003@resample`), so an id names the same set and kind in any sweep.
`cross` (cross-model activation patching) replaces the set's activations with another model's (the sweep's
`ablation.source_model`) on the same prompt; only the models other than the source score it.
The `circuit` family (`circuit_conditions`) keeps a set and intervenes on every other component: the
faithfulness of a set (Wang et al. 2022).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from verif.design.components import canonical
from verif.design.heads import Head, HeadSet, format_heads, random_head_sets
from verif.design.neurons import NeuronSet, format_neurons, random_neuron_sets

SWEEPS = ("layer", "single_head")
# What replaces an intervened activation (verif.model.interventions): 0, the reference prompts' mean,
# their mean at the same position from the end, the prompt's partner's activation, the source model's
# activation on the same prompt.
INTERVENTIONS = ("zero", "mean", "mean_positional", "resample", "cross")
# Kinds that read the reference prompts' means (computed in a first pass) or the partner's activations.
REFERENCE_KINDS = ("mean", "mean_positional")
PAIRED_KINDS = ("resample",)
CROSS_KINDS = ("cross",)
CIRCUIT_NEEDS_TARGET = ("ablation.circuit: a circuit keeps the target set, and ablation.target_heads and "
                        "ablation.target_neurons are both empty; name the set to keep")
# Neuron controls draw from their own stream, so adding neurons to a target leaves its head controls
# exactly as they were (same seed, same head sets).
NEURON_SEED_OFFSET = 7919


@dataclass(frozen=True)
class Ablation:
    """What one condition intervenes on: attention heads and MLP neurons, as canonical sorted tuples,
    and how (`kind`, one of INTERVENTIONS).

    A head is its slice of the attention output projection's input; a neuron is its coordinate of
    the MLP down projection's input; both are replaced at every position (by 0 for `zero`).
    """

    heads: HeadSet = ()
    neurons: NeuronSet = ()
    kind: str = "zero"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", canonical(self.heads))
        object.__setattr__(self, "neurons", canonical(self.neurons))
        if self.kind not in INTERVENTIONS:
            raise ValueError(f"intervention kind {self.kind!r}: must be one of {', '.join(INTERVENTIONS)}")

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
        """'L3 H13, L4 H0 | L20 N1234' (either part may be absent; 'nothing' when empty), with ' (mean)'
        for a kind other than zero."""
        parts = [p for p in (format_heads(self.heads), format_neurons(self.neurons)) if p]
        text = " | ".join(parts) or "nothing"
        return text if self.kind == "zero" else f"{text} ({self.kind})"


@dataclass(frozen=True)
class Condition:
    """One condition: a stable id, its kind (the family it belongs to: baseline, target, random, ...), the
    (canonical) heads and neurons it intervenes on, and how (`intervention`: one of INTERVENTIONS, `none`
    for the baseline). `kept` names the set a circuit condition keeps (its heads and neurons are then
    everything else)."""

    id: str
    kind: str
    heads: HeadSet
    layer: int | None = None
    head: int | None = None
    neurons: NeuronSet = field(default=())
    intervention: str = "zero"
    kept: str | None = None

    @property
    def ablation(self) -> Ablation:
        return Ablation(self.heads, self.neurons, "zero" if self.intervention == "none" else self.intervention)

    def row(self) -> dict:
        """The condition as a row of `conditions.parquet` (a circuit's heads and neurons, every component
        but a few, are written as what they complement)."""
        spelled = self.kept is None
        return {
            "condition": self.id,
            "kind": self.kind,
            "intervention": self.intervention,
            "heads": format_heads(self.heads) if spelled else f"all but {self.kept}'s",
            "n_heads": len(self.heads),
            "neurons": format_neurons(self.neurons) if spelled or not self.neurons else f"all but {self.kept}'s",
            "n_neurons": len(self.neurons),
            "layer": self.layer,
            "head": self.head,
            "kept": self.kept,
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
    conditions = [Condition("baseline", "baseline", (), intervention="none")]
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


def kind_id(condition_id: str, kind: str) -> str:
    """The id of a condition under an intervention kind: the plain id for zero, `id@kind` otherwise."""
    return condition_id if kind == "zero" else f"{condition_id}@{kind}"


def with_interventions(conditions: Sequence[Condition], kinds: Sequence[str]) -> list[Condition]:
    """Every condition under every kind, kind by kind (the baseline, which intervenes on nothing, once).

    With `kinds == ("zero",)` the conditions come back as they are: the default sweep's ids and order.
    """
    out = [c for c in conditions if c.kind == "baseline"]
    for kind in kinds:
        out += [dataclasses.replace(c, id=kind_id(c.id, kind), intervention=kind)
                for c in conditions if c.kind != "baseline"]
    return out


def complement(heads: HeadSet, neurons: NeuronSet, n_layers: int, n_heads: int, n_neurons: int,
               with_neurons: bool) -> tuple[HeadSet, NeuronSet]:
    """Every head but `heads`, and (when `with_neurons`) every MLP neuron but `neurons`: what a circuit
    condition intervenes on."""
    keep_h, keep_n = set(heads), set(neurons)
    all_heads = tuple((l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in keep_h)
    if not with_neurons:
        return all_heads, ()
    return all_heads, tuple((l, i) for l in range(n_layers) for i in range(n_neurons) if (l, i) not in keep_n)


def circuit_conditions(conditions: Sequence[Condition], kinds: Sequence[str], n_layers: int, n_heads: int,
                       n_neurons: int) -> list[Condition]:
    """The circuit family under each kind: `circuit` keeps the target set, `circuit-random-NNN` keeps
    random set NNN (the controls' own sets), `circuit-empty` keeps nothing; each intervenes on every
    other head and, when the target has neurons, on every other MLP neuron.

    faithfulness = (M(circuit) - M(circuit-empty)) / (M(baseline) - M(circuit-empty)) (verif.analysis.stats).
    """
    target = next((c for c in conditions if c.kind == "target"), None)
    if target is None or not (target.heads or target.neurons):
        raise ValueError(CIRCUIT_NEEDS_TARGET)
    with_neurons = bool(target.neurons)
    kept = [("circuit", "circuit", target)] + [
        (f"circuit-{c.id}", "circuit_random", c) for c in conditions if c.kind == "random"]
    out = []
    for kind in kinds:
        for cid, family, c in kept:
            heads, neurons = complement(c.heads, c.neurons, n_layers, n_heads, n_neurons, with_neurons)
            out.append(Condition(kind_id(cid, kind), family, heads, neurons=neurons, intervention=kind, kept=c.id))
        heads, neurons = complement((), (), n_layers, n_heads, n_neurons, with_neurons)
        out.append(Condition(kind_id("circuit-empty", kind), "circuit_empty", heads, neurons=neurons,
                             intervention=kind, kept="nothing"))
    return out
