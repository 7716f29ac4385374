"""What a finished discovery writes and prints: the tables, the target set for a sweep, the figures.

Files under OUT/discovery (see the README's "Finding components"): heads.parquet, neurons.parquet,
probes.parquet and sets.parquet (every model's rows, `model` column first), cross_model.parquet (with
two or more models: how far their top-k sets overlap), target.yaml (the best head and neuron sets as a
sweep config, pointed at prompts the sets were not chosen on; one `target-<model>.yaml` per model when
there are several), heldout_prompts.parquet (the held-out attempts it points at) and figures/.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from jobs.config import Config
from jobs.prepare import build_prompts
from jobs.runtime.storage import OutDir, write_parquet_atomic, writing
from verif.analysis.discovery import figures
from verif.analysis.discovery.probes import Probe, probe_table
from verif.analysis.discovery.ranking import pearson, ranked, spearman
from verif.analysis.discovery.sets import HEAD_RANKINGS, NEURON_RANKINGS, SET_STATS, best_set, set_overlaps, target_yaml
from verif.analysis.discovery.tables import heads_table, neurons_table
from verif.design.heads import parse_heads

TOP_PRINTED = 5  # heads and neurons listed at the end of a run
TOP_NEURONS_PLOTTED = 100
# The held-out attempts (a prompts.file of attempts: the columns of prompts.parquet it takes).
HELDOUT_PROMPTS = "heldout_prompts"
ATTEMPT_COLUMNS = ("numbers", "target", "attempt", "error_kind")
# Seeds tried after the discovery's own for a follow-up sweep's generated prompts (discover.holdout 0).
FRESH_SEEDS = 100


@dataclass
class Findings:
    """One model's discovery: its score maps, probes and set effects."""

    model: str
    spec: str  # model.path entry, for the target config
    n_objective: int
    which: str  # discover.prompts
    head_maps: dict[str, np.ndarray]  # atp, exact, attn_to_target: [L, H]
    neuron_maps: dict[str, np.ndarray]  # atp, logit_yes_no, probe_cos: [L, I]
    probes: list[Probe]
    sets: pl.DataFrame  # sets.parquet rows, model column first
    objective_attribution: float  # M as the attribution pass computed it
    objective_engine: float  # M as the engine computed it (the sets step's baseline)
    n_controls: int  # random sets per size and kind (discover.controls): p_empirical >= 1 / (n_controls + 1)
    probe_note: str | None = None
    n_heldout: int = 0  # held-out prompts the sets were also scored on (discover.holdout)

    @property
    def heads(self) -> pl.DataFrame:
        return heads_table(self.model, **self.head_maps)

    @property
    def neurons(self) -> pl.DataFrame:
        return neurons_table(self.model, **self.neuron_maps)

    def best(self, kind: str) -> dict | None:
        return best_set(self.sets, kind)

    def correlations(self) -> tuple[float, float, int]:
        """Spearman and Pearson of atp against exact over the screened heads, and how many there are."""
        a, e = self.head_maps["atp"], self.head_maps["exact"]
        return spearman(a, e), pearson(a, e), int(np.isfinite(e).sum())

    def metrics(self) -> dict[str, float | None]:
        """W&B summary values under `{model}/discover/`."""
        rho, r, n = self.correlations()
        values: dict[str, float | None] = {
            "objective": self.objective_engine, "objective_attribution": self.objective_attribution,
            "n_prompts": self.n_objective, "n_heads_exact": n, "spearman_atp_exact": rho, "pearson_atp_exact": r,
            "n_probe_layers_separating": sum(p.separates for p in self.probes),
        }
        for kind in ("head", "neuron"):
            best = self.best(kind)
            for stat in ("k", *SET_STATS, *(f"heldout_{c}" for c in SET_STATS)):
                values[f"best_{kind}_set/{stat}"] = None if best is None else best[stat]
        return {f"{self.model}/discover/{k}": (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in values.items()}

    def lines(self) -> list[str]:
        """The model's part of the end-of-run report: M, agreement of atp with exact, top components, sets."""
        rho, r, n = self.correlations()
        a_heads = self.head_maps["atp"].size
        lines = [
            f"{self.model}: M = {self.objective_engine:.4f} nats, mean log P(Yes) - log P(No) over {self.n_objective} "
            f"{self.which} prompts ({self.objective_attribution:.4f} in the attribution pass); {n} of {a_heads} heads "
            f"scored exactly, atp vs exact: Spearman {rho:.3f}, Pearson {r:.3f}",
            "  top heads by |exact| effect, then |atp| (nats; attention as a probability):",
        ]
        order = ranked(self.head_maps["exact"], "exact")
        order += [h for h in ranked(self.head_maps["atp"], "atp") if h not in set(order)]
        lines.append(f"    {'head':<10}{'exact':>10}{'atp':>10}{'attn_to_target':>16}")
        for layer, head in order[:TOP_PRINTED]:
            e, a, t = (self.head_maps[s][layer, head] for s in ("exact", "atp", "attn_to_target"))
            lines.append(f"    {f'L{layer} H{head}':<10}{e:>+10.4f}{a:>+10.4f}{t:>16.4f}")
        lines.append("  top neurons by |atp| (nats; logit_yes_no in logits per unit activation):")
        lines.append(f"    {'neuron':<12}{'atp':>10}{'logit_yes_no':>14}{'probe_cos':>11}")
        for layer, i in ranked(self.neuron_maps["atp"], "atp")[:TOP_PRINTED]:
            a, lg, c = (self.neuron_maps[s][layer, i] for s in NEURON_RANKINGS)
            lines.append(f"    {f'L{layer} N{i}':<12}{a:>+10.4f}{lg:>+14.4f}{c:>11.3f}")
        lines.append(f"  {self.probe_summary()}")
        for kind in ("head", "neuron"):
            best = self.best(kind)
            if best is None:
                lines.append(f"  best {kind} set: none (no set has a p-value)")
                continue
            lines.append(f"  best {kind} set: top {best['k']} by {best['ranking']}, delta {best['delta']:+.4f} nats "
                         f"({self.n_controls} random sets {best['null_mean']:+.4f} +- {best['null_std'] or 0:.4f}), "
                         f"p_empirical {best['p_empirical']:.3f} (the least possible: {1 / (self.n_controls + 1):.3f}): "
                         f"{_shorten(best['components'])}")
            if best["heldout_delta"] is not None:
                p = best["heldout_p_empirical"]
                lines.append(f"    on the {self.n_heldout} held-out prompts: delta {best['heldout_delta']:+.4f} nats (random "
                             f"sets {best['heldout_null_mean']:+.4f} +- {best['heldout_null_std'] or 0:.4f}), p_empirical "
                             f"{'n/a' if p is None else f'{p:.3f}'}")
        return lines

    def probe_summary(self) -> str:
        if self.probe_note:
            return f"probes: {self.probe_note}"
        good = [p for p in self.probes if p.separates]
        best = max(self.probes, key=lambda p: p.heldout_acc)
        return (f"probes: {len(good)} of {len(self.probes)} layers separate correct from incorrect on held-out prompts "
                f"(best held-out accuracy {best.heldout_acc:.2f} at layer {best.layer}, chance {best.chance_acc:.2f}, "
                f"{best.n_test} held out); probe_cos is null where no separating probe reads a layer")


def _shorten(components: str, most: int = 8) -> str:
    items = components.split(", ")
    return components if len(items) <= most else f"{', '.join(items[:most])}, ... ({len(items)} in all)"


def _safe(name: str) -> str:
    """A model name usable in a file name (hub ids contain '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


@dataclass
class Written:
    """The files a discovery wrote, the frames behind them and the numbers W&B gets."""

    root: Path
    tables: dict[str, pl.DataFrame]
    files: list[Path]
    targets: dict[str, Path | None]  # model -> its target config (None: no set had a p-value)
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [f"{name + ':':<9} {self.root / (name + '.parquet')}" for name in self.tables]
        for model, path in self.targets.items():
            lines.append(f"target:   {path} (test it: python launch.py --sweep --config {path})" if path
                         else f"target:   none for {model} (no set has a p-value)")
        lines.append(f"figures:  {self.root / 'figures'}/ ({len(self.figures)} PNG)")
        return lines


@dataclass(frozen=True)
class FollowUp:
    """Where the sweep that tests a discovery's sets takes its prompts (target.yaml's `prompts`), and why."""

    prompts: dict
    note: str
    heldout: pl.DataFrame | None = None  # the held-out attempts, written as HELDOUT_PROMPTS


def follow_up_prompts(cfg: Config, prompts: pl.DataFrame, out: OutDir, tokenizers: Mapping[str, object]) -> FollowUp:
    """Prompts disjoint from the selection half for the follow-up sweep: the held-out attempts (as a
    prompts.file); without a held-out half, generated attempts from the next seed that repeats none of
    the discovery's; with neither (discover.holdout 0 on a prompts.file), none, and a note saying so."""
    p, d = cfg.prompts, cfg.discover
    held = prompts.filter(pl.col("heldout"))
    if held.height:
        path = (out.root / f"{HELDOUT_PROMPTS}.parquet").resolve()
        return FollowUp({"file": str(path), "template": p.template},
                        f"prompts: the {held.height} attempts discover.holdout {d.holdout} (seed {d.seed}) kept out of "
                        "the selection half: no ranking and no set was chosen on them.", held.select(ATTEMPT_COLUMNS))
    if p.file:
        return FollowUp({}, f"prompts: discover.holdout 0 chose these sets on every attempt of {p.file}; give the "
                            "sweep other attempts (prompts.file) before reading its p-values.")
    seen = _attempt_keys(prompts)
    for seed in range(p.seed + 1, p.seed + 1 + FRESH_SEEDS):
        fresh, _, _ = build_prompts(cfg.replace(prompts=dataclasses.replace(p, seed=seed)), tokenizers)
        if not _attempt_keys(fresh) & seen:
            return FollowUp({"n": p.n, "seed": seed, "p_correct": p.p_correct, "template": p.template},
                            f"prompts: generated from seed {seed}, none of them among the {prompts.height} attempts "
                            f"(prompts.seed {p.seed}) these sets were chosen on (discover.holdout 0).")
    return FollowUp({}, f"prompts: no seed up to {p.seed + FRESH_SEEDS} generates attempts disjoint from the discovery's; "
                        "give the sweep other attempts before reading its p-values.")


def _attempt_keys(prompts: pl.DataFrame) -> set[tuple]:
    return {(tuple(r["numbers"]), r["target"], r["attempt"]) for r in prompts.select("numbers", "target", "attempt").iter_rows(named=True)}


def _target(findings: Findings, path: Path, follow_up: FollowUp) -> Path | None:
    heads, neurons = findings.best("head"), findings.best("neuron")
    if heads is None and neurons is None:
        return None
    text = (target_yaml(heads, neurons, findings.model, follow_up.prompts, follow_up.note)
            + yaml.safe_dump({"model": {"path": findings.spec}}))
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        tmp.write_text(text)
        tmp.replace(path)
    return path


def _figures(f: Findings, folder: Path) -> list[Path]:
    stem = folder / _safe(f.model)
    best = f.best("head")
    highlight = parse_heads(best["components"]) if best else []
    made = [figures.plot_head_scores(f.head_maps[s], s, f.model, f.n_objective, f"{stem}__heads_{s}.png", highlight)
            for s in HEAD_RANKINGS]
    made += [figures.plot_top_neurons(f.neuron_maps[s], s, f.model, f.n_objective, f"{stem}__neurons_{s}.png",
                                      TOP_NEURONS_PLOTTED) for s in NEURON_RANKINGS]
    made.append(figures.plot_atp_vs_exact(f.head_maps["atp"], f.head_maps["exact"], f.model, f.n_objective,
                                          f"{stem}__atp_vs_exact.png"))
    made += [figures.plot_effect_vs_k(f.sets, kind, f.model, f.n_objective, f"{stem}__effect_vs_k_{kind}.png")
             for kind in ("head", "neuron")]
    return [p for p in made if p is not None]


def write_outputs(out: OutDir, findings: list[Findings], follow_up: FollowUp) -> Written:
    """Write every model's tables, target config and figures under `out` (OUT/discovery)."""
    tables = {
        "heads": pl.concat([f.heads for f in findings]),
        "neurons": pl.concat([f.neurons for f in findings]),
        "probes": pl.concat([probe_table(f.model, f.probes) for f in findings]),
        "sets": pl.concat([f.sets for f in findings]),
    }
    if len(findings) > 1:
        populations = {f.model: {"head": f.head_maps["atp"].size, "neuron": f.neuron_maps["atp"].size} for f in findings}
        tables["cross_model"] = set_overlaps(tables["sets"], populations, [f.model for f in findings])
    if follow_up.heldout is not None:
        tables[HELDOUT_PROMPTS] = follow_up.heldout
    files = []
    for name, frame in tables.items():
        files.append(out.root / f"{name}.parquet")
        write_parquet_atomic(frame, files[-1])
    one = len(findings) == 1
    targets = {f.model: _target(f, out.root / ("target.yaml" if one else f"target-{_safe(f.model)}.yaml"), follow_up)
               for f in findings}
    files += [p for p in targets.values() if p is not None]
    written = Written(out.root, tables, files, targets)
    for f in findings:
        with writing(out.root / "figures"):
            written.figures += _figures(f, out.root / "figures")
        written.metrics.update(f.metrics())
    return written
