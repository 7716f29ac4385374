"""What a ranking buys: its top-k sets against random sets of the same size, and the target YAML.

For each ranking and each k, the top-k components are ablated together, and so are `n_controls`
random sets of k components of the same kind; the ranking's set is judged against that null with
the sweep's empirical p-value, `(1 + #controls with |delta| >= |set's delta|) / (n_controls + 1)`
(as `verif.analysis.stats.target_vs_controls`). This is the study's "cumulative prefix" search with
the controls it lacked.

With `discover.holdout` the rankings, and so the sets, come from the selection half of the prompts;
every set and its controls are also scored on the held-out half, and `sets_table` reports both: the
held-out numbers are the ones no choice has seen.

Random sets are drawn from all components of the kind, top-k members included: the null is "k
components picked blindly". (Excluding the top-k, as a sweep excludes its target, would draw the
null from what the ranking put last and flatter the ranking.) They depend only on (seed, kind, k),
so every ranking of a kind is judged against the same null sets, and all sets of all rankings of a
kind are the conditions of one engine call (`SetPlan.conditions`, duplicates scored once).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from verif.analysis.cross_model import model_pairs, pair_name, topk_overlap
from verif.analysis.discovery.ranking import ranked
from verif.design.conditions import Ablation
from verif.design.heads import format_heads, parse_heads
from verif.design.neurons import parse_neurons

DEFAULT_K = (1, 2, 4, 8, 16, 29, 64)
DEFAULT_CONTROLS = 20
KINDS = ("head", "neuron")
HEAD_RANKINGS = ("atp", "exact", "attn_to_target")
NEURON_RANKINGS = ("atp", "logit_yes_no", "probe_cos")

Component = tuple[int, int]


@dataclass(frozen=True)
class PlannedSet:
    """One (ranking, k): its top-k members and where its and its controls' conditions are."""

    ranking: str
    kind: str
    k: int
    members: tuple[Component, ...]
    condition: int
    controls: tuple[int, ...]


@dataclass
class SetPlan:
    """The distinct conditions to score (no baseline: `delta_sums` adds it) and the sets they serve."""

    conditions: list[Ablation]
    sets: list[PlannedSet]


def format_components(kind: str, members: Sequence[Component]) -> str:
    """Canonical text of a set: 'L3 H13, L4 H0' for heads, 'L20 N1234, L21 N77' for neurons."""
    if kind == "head":
        return format_heads(members)
    return ", ".join(f"L{layer} N{index}" for layer, index in sorted(set(members)))


def _component_set(kind: str, members: Sequence[Component]) -> Ablation:
    members = tuple(sorted(members))
    return Ablation(heads=members) if kind == "head" else Ablation(neurons=members)


def _check(kind: str, ks: Sequence[int], n_controls: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise ValueError(f"discover.k: {list(ks)} must be a non-empty list of positive ints")
    if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 1:
        raise ValueError(f"discover.controls: {n_controls!r} must be a positive int")


def check_controls(n_controls: int, ks: Sequence[int], n_components: int, noun: str,
                   scored: Sequence[int] = ()) -> None:
    """Refuse more random sets per size than distinct sets of that size exist. The sizes are the ks capped
    as `plan_sets` caps them: at `n_components` for a ranking that scores every component, and at each
    count in `scored` for one that scores fewer (the heads screened exactly). Exact counts (C(n, k)), so
    a null of repeats of the few possible sets is refused before any work."""
    caps = {n_components, *(min(c, n_components) for c in scored)}
    for k in sorted({min(k, cap) for k in ks for cap in caps}):
        count = math.comb(n_components, k)
        if n_controls > count:
            raise ValueError(f"discover.controls {n_controls}: only {count} distinct random sets of {k} {noun}s exist "
                             f"({n_components} {noun}s in all; sets of {k} from discover.k {list(ks)}); lower "
                             "discover.controls or leave such sizes out of discover.k")


def plan_sets(
    rankings: Mapping[str, np.ndarray],
    kind: str,
    ks: Sequence[int] = DEFAULT_K,
    n_controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
) -> SetPlan:
    """Top-k and random sets for every ranking of one kind (`[L, X]` score maps of equal shape).

    k is capped at the number of components a ranking scored (NaN = unscored, e.g. heads not
    screened exactly), so a short ranking still gets its full set.
    """
    _check(kind, ks, n_controls)
    shapes = {name: np.shape(scores) for name, scores in rankings.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"rankings of one kind must share a shape, got {shapes}")
    conditions: list[Ablation] = []
    index: dict[Ablation, int] = {}

    def condition(members: Sequence[Component]) -> int:
        cs = _component_set(kind, members)
        if cs not in index:
            index[cs] = len(conditions)
            conditions.append(cs)
        return index[cs]

    nulls: dict[int, tuple[int, ...]] = {}
    planned = []
    for name, scores in rankings.items():
        order = ranked(scores, name)
        width = np.shape(scores)[1]
        n_all = int(np.prod(np.shape(scores)))
        for k in sorted({min(k, len(order)) for k in ks} - {0}):
            if k not in nulls:
                rng = np.random.default_rng([seed, KINDS.index(kind), k])
                draws = [rng.choice(n_all, size=min(k, n_all), replace=False) for _ in range(n_controls)]
                nulls[k] = tuple(condition([(int(i // width), int(i % width)) for i in d]) for d in draws)
            members = tuple(order[:k])
            planned.append(PlannedSet(name, kind, k, members, condition(members), nulls[k]))
    return SetPlan(conditions, planned)


SET_STATS = ("delta", "null_mean", "null_std", "p_empirical")
SETS_SCHEMA = {
    "ranking": pl.Utf8, "kind": pl.Utf8, "k": pl.Int64, "components": pl.Utf8,
    **{c: pl.Float64 for c in SET_STATS}, **{f"heldout_{c}": pl.Float64 for c in SET_STATS},
}  # fmt: skip


def _judged(delta: float, null: np.ndarray) -> dict:
    """A set's delta against its controls' (non-finite controls left out, null_std with ddof=1)."""
    null = null[np.isfinite(null)]
    ok = np.isfinite(delta) and null.size > 0
    return {
        "delta": float(delta) if np.isfinite(delta) else None,
        "null_mean": float(null.mean()) if null.size else None,
        "null_std": float(null.std(ddof=1)) if null.size >= 2 else None,
        "p_empirical": (1 + int((np.abs(null) >= abs(delta)).sum())) / (null.size + 1) if ok else None,
    }


def sets_table(plan: SetPlan, deltas: np.ndarray, heldout: np.ndarray | None = None) -> pl.DataFrame:
    """`sets.parquet` rows from the plan and each condition's exact delta (`[len(plan.conditions)]`) on
    the prompts the sets were chosen on, and on the held-out prompts (`heldout_*` columns; null
    without them, or where `heldout` is NaN).

    null_std has ddof=1; controls with a non-finite delta are left out of the null, as in the sweep.
    """
    n = len(plan.conditions)
    deltas = np.asarray(deltas, dtype=np.float64)
    heldout = np.full(n, np.nan) if heldout is None else np.asarray(heldout, dtype=np.float64)
    for name, values in (("deltas", deltas), ("heldout", heldout)):
        if values.shape != (n,):
            raise ValueError(f"{name} {values.shape}: expected one per planned condition ({n})")
    rows = []
    for s in plan.sets:
        controls = list(s.controls)
        rows.append({
            "ranking": s.ranking, "kind": s.kind, "k": s.k, "components": format_components(s.kind, s.members),
            **_judged(deltas[s.condition], deltas[controls]),
            **{f"heldout_{c}": v for c, v in _judged(heldout[s.condition], heldout[controls]).items()},
        })
    return pl.DataFrame(rows, schema=SETS_SCHEMA)


def best_set(table: pl.DataFrame, kind: str) -> dict | None:
    """The set of `kind` with the smallest p_empirical; ties (the p floor 1/(n+1) is often shared) go
    to the set lying most null standard deviations beyond the null mean, then to the smaller k."""
    rows = table.filter((pl.col("kind") == kind) & pl.col("p_empirical").is_not_null()).to_dicts()
    if not rows:
        return None

    def key(row: dict) -> tuple:
        spread = row["null_std"] or 0.0
        beyond = abs(row["delta"] - row["null_mean"]) / spread if spread > 0 else 0.0
        return (row["p_empirical"], -beyond, row["k"])

    return min(rows, key=key)


# The first words of every target config (a copy of one is still recognised by them: jobs.lineage).
TARGET_HEADER = "# Best sets found by --discover"


def target_yaml(heads: dict | None, neurons: dict | None, model: str, prompts: dict | None = None,
                prompts_note: str = "") -> str:
    """A config fragment setting `ablation.target_heads` / `target_neurons` to the best sets (rows of
    `sets_table`), so `--sweep` can test them with full random-set controls, and the `prompts` section
    that sweep should read (with `prompts_note`, why, as a comment above it)."""
    if heads is None and neurons is None:
        raise ValueError("target_yaml: no set to write (no head or neuron set has a p-value)")
    lines = [f"{TARGET_HEADER} on {model}; test them with --sweep and its random controls."]
    for row in (heads, neurons):
        if row is not None:
            lines.append(f"# {row['kind']}s: top {row['k']} by {row['ranking']}, chosen on the selection prompts: "
                         + _set_numbers(row))
            if row.get("heldout_delta") is not None:
                lines.append(f"#   on the held-out prompts: {_set_numbers(row, 'heldout_')}")
    lines.append("ablation:")
    if heads is not None:
        lines.append(f'  target_heads: "{heads["components"]}"')
    if neurons is not None:
        lines.append(f'  target_neurons: "{neurons["components"]}"')
    lines += [f"# {line}" for line in textwrap.wrap(prompts_note, 100)]
    if prompts:
        lines.append("prompts:")
        lines += [f"  {key}: {json.dumps(value)}" for key, value in prompts.items()]
    return "\n".join(lines) + "\n"


def _set_numbers(row: dict, prefix: str = "") -> str:
    p = row[f"{prefix}p_empirical"]
    return (f"delta {row[f'{prefix}delta']:+.4g} nats (random sets {row[f'{prefix}null_mean']:+.4g} +- "
            f"{row[f'{prefix}null_std'] or 0:.2g}), p_empirical {'n/a' if p is None else f'{p:.3g}'}")


OVERLAP_SCHEMA = {
    "pair": pl.Utf8, "model_a": pl.Utf8, "model_b": pl.Utf8, "kind": pl.Utf8, "ranking": pl.Utf8, "k": pl.Int64,
    "n_components": pl.Int64, "overlap": pl.Int64, "expected_overlap": pl.Float64, "p_overlap": pl.Float64,
    "shared": pl.Utf8,
}  # fmt: skip


def set_overlaps(sets: pl.DataFrame, populations: Mapping[str, Mapping[str, int]], models: Sequence[str]) -> pl.DataFrame:
    """For each pair of models (a before b in `models`), kind, ranking and k both have: how many components
    their top-k sets share, how many two random sets of those sizes would share on average, and the
    hypergeometric p of sharing at least that many (`verif.analysis.cross_model.topk_overlap`).

    `populations[model][kind]` is how many components of the kind the model has; a pair whose models
    differ in it is left out for that kind (their components do not correspond).
    """
    parse = {"head": parse_heads, "neuron": parse_neurons}
    rows = []
    for a, b in model_pairs(models):
        for kind in KINDS:
            n = populations[a][kind]
            if populations[b][kind] != n:
                continue
            mine = sets.filter((pl.col("model") == a) & (pl.col("kind") == kind))
            theirs = sets.filter((pl.col("model") == b) & (pl.col("kind") == kind)).select(
                "ranking", "k", pl.col("components").alias("components_b"))
            for row in mine.join(theirs, on=["ranking", "k"], how="inner").iter_rows(named=True):
                members_a, members_b = parse[kind](row["components"]), parse[kind](row["components_b"])
                ov = topk_overlap(members_a, members_b, n)
                rows.append({"pair": pair_name(a, b), "model_a": a, "model_b": b, "kind": kind, "ranking": row["ranking"],
                             "k": row["k"], "n_components": n, "overlap": ov["overlap"],
                             "expected_overlap": ov["expected_overlap"], "p_overlap": ov["p_overlap"],
                             "shared": format_components(kind, sorted(set(members_a) & set(members_b)))})
    return pl.DataFrame(rows, schema=OVERLAP_SCHEMA)
