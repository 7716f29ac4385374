"""Figures of the cross-model tables: "same mechanism?" per model pair, and the per-head effect scatter.

With cross-model activation patching (`verif.analysis.cmap`) the "same mechanism?" figure also shows, for
each direction the sweep patched between the pair's models, the target's gap_closed against the random sets'.

Drawn like `verif.analysis.figures` (a `Figure` on the Agg canvas, never pyplot; one PNG per call,
its Path returned; every figure names the models and the number of prompts, and its axes carry units).
Files go to `OUT/figures/cross/<a>__<b>__<figure>.png`, apart from the per-model figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes

from verif.analysis.cross_model import CROSS_METRICS
from verif.analysis.figures import METRIC_LABELS, _new_figure, _safe, _save, _target_heads

__all__ = ["plot_effect_scatter", "plot_same_mechanism", "make_cross_figures", "pair_figures"]

_LABELS = {**METRIC_LABELS, "delta_log_odds": "Δ log-odds ln P(Yes) − ln P(No), all attempts (nats)"}
_C_A, _C_B, _C_CONTROL, _C_TARGET = "#5b7fa6", "#e07b39", "#9e9e9e", "#c0392b"
SCATTER_METRIC = "delta_log_odds"  # the per-head panel of the "same mechanism?" figure


def _short(metric: str) -> str:
    return _LABELS.get(metric, metric).split("\n")[0]


def _fmt_ci(row: dict, stat: str) -> str:
    if row.get(stat) is None:
        return "n/a"
    ci = "" if row.get(f"{stat}_lo") is None else f" [{row[f'{stat}_lo']:+.3g}, {row[f'{stat}_hi']:+.3g}]"
    return f"{row[stat]:+.3g}{ci}"


def _sweep_points(cross: pl.DataFrame, conditions: pl.DataFrame, pair: str, sweep: str, metric: str) -> pl.DataFrame:
    """The sweep's rows of one pair and metric with each condition's layer and head."""
    meta = conditions.select("condition", *[c for c in ("layer", "head") if c in conditions.columns])
    return (cross.filter((pl.col("pair") == pair) & (pl.col("kind") == sweep) & (pl.col("metric") == metric))
            .join(meta, on="condition", how="left"))


def _draw_scatter(ax: Axes, points: pl.DataFrame, target: set[tuple[int, int]], sweep: str, model_a: str,
                  model_b: str, metric: str, maps_row: dict | None) -> None:
    x, y = points["effect_a"].cast(pl.Float64).to_numpy(), points["effect_b"].cast(pl.Float64).to_numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    what = "head" if sweep == "single_head" else "layer"
    ax.scatter(x[ok], y[ok], s=14, color=_C_A, alpha=0.75, label=f"one {what} zero-ablated (n = {int(ok.sum())})")
    if target and "head" in points.columns:
        hit = np.array([(r["layer"], r["head"]) in target for r in points.select("layer", "head").iter_rows(named=True)])
        if (hit & ok).any():
            ax.scatter(x[hit & ok], y[hit & ok], s=40, facecolors="none", edgecolors="black", lw=1.4,
                       label=f"target-set heads ({int((hit & ok).sum())})")
    if ok.any():
        lo, hi = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
        pad = 0.05 * (hi - lo) if hi > lo else 1e-3
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", ls="--", lw=1, label="same effect in both")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"{model_a}: {_short(metric)}", fontsize=8)
    ax.set_ylabel(f"{model_b}: {_short(metric)}", fontsize=8)
    if maps_row is not None:
        ax.set_title(f"Spearman across {what}s {_fmt_ci(maps_row, 'spearman')}\ntop-{maps_row['k']} by |effect| share "
                     f"{maps_row['overlap']} (chance {maps_row['expected_overlap']:.2g}, p = {maps_row['p_overlap']:.2g})",
                     fontsize=8)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def _maps_row(maps: pl.DataFrame | None, pair: str, sweep: str, metric: str) -> dict | None:
    if maps is None or maps.height == 0:
        return None
    rows = maps.filter((pl.col("pair") == pair) & (pl.col("sweep") == sweep) & (pl.col("metric") == metric))
    return rows.row(0, named=True) if rows.height and rows["spearman"][0] is not None else None


def plot_effect_scatter(cross: pl.DataFrame, maps: pl.DataFrame, conditions: pl.DataFrame, pair: str, sweep: str,
                        path: str | Path) -> Path | None:
    """Effect in model a against effect in model b, one point per head (per layer), the target's heads
    outlined, one panel per per-prompt metric; the maps table's Spearman and top-k overlap in each
    title. None when the pair has no rows of that sweep."""
    first = cross.filter(pl.col("pair") == pair)
    if first.filter(pl.col("kind") == sweep).height == 0:
        return None
    model_a, model_b = first["model_a"][0], first["model_b"][0]
    metrics = [m for m in CROSS_METRICS if m != "delta_auroc"]
    fig = _new_figure(4.5 * len(metrics), 4.5)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    target = set(_target_heads(conditions)) if sweep == "single_head" else set()
    for ax, m in zip(axes, metrics):
        _draw_scatter(ax, _sweep_points(cross, conditions, pair, sweep, m), target, sweep, model_a, model_b, m,
                      _maps_row(maps, pair, sweep, m))
    n = first.filter(pl.col("metric") == "delta_log_odds")["n_prompts"].max()
    fig.suptitle(f"{model_a} vs {model_b}: the effect of zero-ablating each {'head' if sweep == 'single_head' else 'layer'}"
                 f" alone in both models ({n} prompts)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save(fig, path)


def _draw_metric(ax: Axes, rows: pl.DataFrame, metric: str, model_a: str, model_b: str) -> None:
    """The target's effect in each model with its CI, the random sets' effects and their central 95%."""
    m = rows.filter(pl.col("metric") == metric)
    target = m.filter(pl.col("kind") == "target")
    controls = m.filter(pl.col("kind") == "random")
    for i, (side, color) in enumerate((("a", _C_A), ("b", _C_B))):
        cv = controls[f"effect_{side}"].cast(pl.Float64).drop_nulls().to_numpy()
        cv = cv[np.isfinite(cv)]
        if cv.size >= 2:
            lo, hi = np.quantile(cv, [0.025, 0.975])
            ax.fill_between([i - 0.3, i + 0.3], lo, hi, color=_C_CONTROL, alpha=0.3,
                            label=f"random sets, central 95% (n = {cv.size})" if i == 0 else None)
        if cv.size:
            jitter = np.linspace(-0.2, 0.2, cv.size)
            ax.scatter(i + jitter, cv, s=6, color=_C_CONTROL, zorder=2)
        if target.height and target[f"effect_{side}"][0] is not None:
            t = target.row(0, named=True)
            lo_t, hi_t = t[f"effect_{side}_lo"], t[f"effect_{side}_hi"]
            err = None if lo_t is None else [[t[f"effect_{side}"] - lo_t], [hi_t - t[f"effect_{side}"]]]
            ax.errorbar([i], [t[f"effect_{side}"]], yerr=err, fmt="o", color=color, ms=7, capsize=5, zorder=3,
                        label="target set, 95% CI" if i == 0 else None)
    ax.axhline(0, color="grey", ls="--", lw=1)
    ax.set_xticks([0, 1], [model_a, model_b], fontsize=8)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(_LABELS.get(metric, metric), fontsize=7)
    if target.height:
        t = target.row(0, named=True)
        p = t.get("diff_p_empirical")
        ax.set_title(f"{_short(metric)}\ndiff (b − a) {_fmt_ci(t, 'diff')}\nagainst the random sets' diffs: p = "
                     f"{'n/a' if p is None else f'{p:.2g}'}", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _draw_cmap(ax: Axes, cmap: pl.DataFrame, vs: pl.DataFrame | None, model_a: str, model_b: str) -> None:
    """Per direction patched between the two models (source -> receiver): the random sets' gap_closed (dots and
    their central 95%) and the target's with its CI; 1 = the set carries the whole difference, 0 = none."""
    directions = [(s, r) for s, r in ((model_a, model_b), (model_b, model_a))
                  if cmap.filter((pl.col("source") == s) & (pl.col("model") == r)).height]
    titles = []
    for i, (source, receiver) in enumerate(directions):
        rows = cmap.filter((pl.col("source") == source) & (pl.col("model") == receiver))
        cv = rows.filter(pl.col("kind") == "random")["gap_closed"].cast(pl.Float64).drop_nulls().to_numpy()
        if cv.size >= 2:
            lo, hi = np.quantile(cv, [0.025, 0.975])
            ax.fill_between([i - 0.3, i + 0.3], lo, hi, color=_C_CONTROL, alpha=0.3,
                            label=f"random sets, central 95% (n = {cv.size})" if i == 0 else None)
        if cv.size:
            ax.scatter(i + np.linspace(-0.2, 0.2, cv.size), cv, s=6, color=_C_CONTROL, zorder=2)
        target = rows.filter(pl.col("kind") == "target")
        if target.height and target["gap_closed"][0] is not None:
            t = target.row(0, named=True)
            err = None if t["gap_closed_lo"] is None else [[t["gap_closed"] - t["gap_closed_lo"]],
                                                          [t["gap_closed_hi"] - t["gap_closed"]]]
            ax.errorbar([i], [t["gap_closed"]], yerr=err, fmt="o", color=_C_TARGET, ms=7, capsize=5, zorder=3,
                        label="target set, 95% CI" if i == 0 else None)
            p = None if vs is None else vs.filter((pl.col("source") == source) & (pl.col("model") == receiver))
            p_text = "n/a" if p is None or p.height == 0 else f"{p['p_greater'][0]:.2g}"
            titles.append(f"{source} → {receiver}: {_fmt_ci(t, 'gap_closed')} ({t['n_prompts']} prompts, "
                          f"{t['n_left_out']} left out), p_greater {p_text}")
    ax.axhline(0, color="grey", ls="--", lw=1)
    ax.axhline(1, color=_C_TARGET, ls=":", lw=1)
    ax.set_xticks(range(len(directions)), [f"{s} → {r}" for s, r in directions], fontsize=7)
    ax.set_xlim(-0.6, len(directions) - 0.4)
    ax.set_ylabel("gap closed by patching the set from source into receiver\n(LD_patched − LD_r) / (LD_s − LD_r)",
                  fontsize=7)
    ax.set_title("CMAP: does the set carry the difference?\n" + "\n".join(titles), fontsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")
    ax.grid(axis="y", alpha=0.3)


def plot_same_mechanism(cross: pl.DataFrame, maps: pl.DataFrame, conditions: pl.DataFrame, pair: str,
                        path: str | Path, cmap: pl.DataFrame | None = None,
                        cmap_vs: pl.DataFrame | None = None) -> Path | None:
    """One pair's answer to "is it the same mechanism?": per metric, the target's effect in each model
    with its CI beside the random sets' effects (and their central 95%), the difference with its CI and
    its p against the random sets' differences; below, the per-head effect scatter when both models
    ran a single-head sweep, and CMAP's gap_closed against its null when the sweep patched between them
    (`cmap`: stats/cmap.parquet, `cmap_vs`: stats/cmap_vs_controls.parquet). None when the pair has no
    target condition."""
    rows = cross.filter(pl.col("pair") == pair)
    if rows.filter(pl.col("kind") == "target").height == 0:
        return None
    model_a, model_b = rows["model_a"][0], rows["model_b"][0]
    fig = _new_figure(3.6 * len(CROSS_METRICS), 8.5)
    grid = fig.add_gridspec(2, len(CROSS_METRICS), height_ratios=(1, 1.1))
    for j, m in enumerate(CROSS_METRICS):
        _draw_metric(fig.add_subplot(grid[0, j]), rows, m, model_a, model_b)
    fig.axes[0].legend(fontsize=7, loc="best")
    bottom = fig.add_subplot(grid[1, 1:3])
    points = _sweep_points(cross, conditions, pair, "single_head", SCATTER_METRIC)
    if points.height:
        _draw_scatter(bottom, points, set(_target_heads(conditions)), "single_head", model_a, model_b, SCATTER_METRIC,
                      _maps_row(maps, pair, "single_head", SCATTER_METRIC))
    else:
        bottom.axis("off")
        bottom.text(0.5, 0.5, "no per-head comparison: run ablation.sweeps: [single_head] to get one",
                    ha="center", va="center", color="grey", fontsize=9, transform=bottom.transAxes)
    pair_cmap = None if cmap is None else cmap.filter(pl.col("source").is_in([model_a, model_b])
                                                      & pl.col("model").is_in([model_a, model_b]))
    if pair_cmap is not None and pair_cmap.height:
        _draw_cmap(fig.add_subplot(grid[1, 3]), pair_cmap, cmap_vs, model_a, model_b)
    n = rows.filter(pl.col("metric") == "delta_log_odds")["n_prompts"].max()
    fig.suptitle(f"Is the mechanism the same in {model_a} (a) and {model_b} (b)? The target set's effect in each, "
                 f"against random sets of its size ({n} prompts)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


def make_cross_figures(cross: pl.DataFrame, maps: pl.DataFrame, conditions: pl.DataFrame,
                       out_dir: str | Path, cmap: pl.DataFrame | None = None,
                       cmap_vs: pl.DataFrame | None = None) -> list[Path]:
    """Every cross-model figure the tables support, one set per pair, into `out_dir` (CMAP's panel in
    "same mechanism?" with `cmap`)."""
    out = Path(out_dir)
    made: list[Path | None] = []
    for pair in cross["pair"].unique(maintain_order=True).to_list():
        stem = out / _safe(pair)
        made.append(plot_same_mechanism(cross, maps, conditions, pair, f"{stem}__same_mechanism.png", cmap, cmap_vs))
        made += [plot_effect_scatter(cross, maps, conditions, pair, sweep, f"{stem}__scatter_{sweep}.png")
                 for sweep in ("single_head", "layer")]
    return [p for p in made if p is not None]


def pair_figures(folder: str | Path, pair: str) -> dict[str, Path]:
    """{figure name: file} of one pair (`pair_name(a, b)`) among the files `make_cross_figures` wrote to `folder`."""
    prefix = f"{_safe(pair)}__"
    return {p.stem.removeprefix(prefix): p for p in sorted(Path(folder).glob(f"{prefix}*.png"))}
