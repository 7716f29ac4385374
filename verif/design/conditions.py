"""Ablation conditions: what a sweep scores every prompt under.

`baseline` ablates nothing; `target` is the head set under study; `random-NNN` are control sets of
the same size, the null distribution the target's effect is judged against; `layer-LL` ablates every
head of one layer; `head-LxxHyy` ablates one head. Ids are stable, so results from different runs of
the same configuration line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from verif.design.heads import Head, HeadSet, canonical, format_heads, random_head_sets

SWEEPS = ("layer", "single_head")


@dataclass(frozen=True)
class Condition:
    """One ablation condition: a stable id, its kind and its (canonical) head set."""

    id: str
    kind: str
    heads: HeadSet
    layer: int | None = None
    head: int | None = None

    def row(self) -> dict:
        """The condition as a row of `conditions.parquet`."""
        return {
            "condition": self.id,
            "kind": self.kind,
            "heads": format_heads(self.heads),
            "n_heads": len(self.heads),
            "layer": self.layer,
            "head": self.head,
        }


def build_conditions(
    n_layers: int,
    n_heads: int,
    target: Sequence[Head],
    n_random: int,
    seed: int,
    exclude_target: bool = True,
    match_layers: bool = False,
    sweeps: Sequence[str] = (),
) -> list[Condition]:
    """Baseline, target (if any), random controls of the target's size, then the requested sweeps."""
    conditions = [Condition("baseline", "baseline", ())]
    target_set = canonical(target)
    if target_set:
        conditions.append(Condition("target", "target", target_set))
    if n_random:
        if not target_set:
            raise ValueError("random controls need a target set (ablation.target_heads): they match its size")
        controls = random_head_sets(
            n_random, len(target_set), n_layers, n_heads, seed,
            exclude=target_set if exclude_target else (),
            match_layers_of=target_set if match_layers else None,
        )
        conditions += [Condition(f"random-{i:03d}", "random", hs) for i, hs in enumerate(controls)]
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
