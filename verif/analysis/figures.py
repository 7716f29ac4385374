"""Figures of a verification sweep: the study's before/after bars, the null distribution of random
head sets, per-head and per-layer effect maps, and P(Yes) histograms.

Built on `matplotlib.figure.Figure` with the Agg canvas directly (never pyplot), so no GUI backend
is touched, no global figure state leaks between calls, and the module is safe to call from worker
processes. Every function writes one PNG and returns its Path; the plots of optional sweeps
(heatmap, layer bars, histograms) return None when the data they need is absent, and
`make_figures` makes whatever applies.

Every figure names the model and the number of prompts, and labels its axes with units.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl

# The Agg canvas is attached to each Figure explicitly; pyplot (and with it the process-wide
# backend choice, which would hijack e.g. a notebook's inline backend) is never touched.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from verif.analysis import stats
from verif.design.conditions import INTERVENTIONS
from verif.design.heads import parse_heads

__all__ = [
    "METRIC_LABELS",
    "plot_before_after",
    "plot_null_distribution",
    "plot_head_heatmap",
    "plot_layer_bars",
    "plot_p_yes_hist",
    "plot_interventions",
    "plot_faithfulness",
    "make_figures",
]

DPI = 120
PNORM = "normalised P(Yes) = p_yes/(p_yes+p_no)"
METRIC_LABELS: dict[str, str] = {
    "delta_correct": "Δ normalised P(Yes) on correct attempts\n(ablated − baseline, probability units)",
    "delta_incorrect": "Δ normalised P(Yes) on incorrect attempts\n(ablated − baseline, probability units)",
    "delta_auroc": "Δ AUROC, correct vs incorrect by normalised P(Yes)\n(ablated − baseline; 0.5 = chance)",
    "auroc": "AUROC, correct vs incorrect by normalised P(Yes) (0.5 = chance)",
    "delta_log_odds_correct": "Δ log-odds ln P(Yes) − ln P(No), correct attempts (nats)",
    "delta_log_odds_incorrect": "Δ log-odds ln P(Yes) − ln P(No), incorrect attempts (nats)",
    "mean_p_yes_norm_correct": f"mean {PNORM}, correct attempts",
    "mean_p_yes_norm_incorrect": f"mean {PNORM}, incorrect attempts",
}
# How each intervention kind is named in a title.
VERBS = {"zero": "zero-ablating", "mean": "mean-ablating", "mean_positional": "position-mean-ablating",
         "resample": "resampling (the partner's activations into)"}
_C_BASE = "#5b7fa6"
_C_ABL = "#e07b39"
_C_CORRECT = "#2a9d4b"
_C_INCORRECT = "#c0392b"


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _short(metric: str) -> str:
    return _label(metric).split("\n")[0]


def _new_figure(w: float = 8.0, h: float = 5.0) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path | None) -> Path:
    if path is None:
        raise ValueError("path is required: where to write the PNG")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=DPI, format="png")
    return p


def _safe(name: str) -> str:
    """A model name usable in a file name (hub ids contain '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _n_prompts_from_summary(summary: pl.DataFrame, model: str) -> int | None:
    b = summary.filter((pl.col("model") == model) & (pl.col("kind") == "baseline"))
    if b.height == 0:
        return None
    r = b.row(0, named=True)
    return int(r["n_correct"] + r["n_incorrect"] + r.get("n_nonfinite", 0))


# --------------------------------------------------------------------------------------------
# the study's figure
# --------------------------------------------------------------------------------------------


def plot_before_after(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    model: str,
    target: str = "target",
    baseline: str = "baseline",
    path: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    conditions: pl.DataFrame | None = None,
    intervention: str = "zero",
) -> Path:
    """The study's figure: mean normalised P(Yes) and P(No) before and after ablating the target set
    (`target` is its condition under `intervention`, whose name the title gives).

    One panel for correct attempts, one for incorrect ones; in each, P(Yes) and P(No) as grouped
    bars (baseline vs ablated) with 95% percentile-bootstrap CIs of the mean (resampling prompts).
    The paired change with its own bootstrap CI is written over each panel, since the paired CI is
    much tighter than the overlap of the two level CIs suggests. Only prompts where both rows are
    finite are used (the count of dropped pairs is shown when non-zero).
    """
    df = stats.labelled(results.filter(pl.col("model") == model), prompts)
    if df.height == 0:
        raise ValueError(f"no results for model {model!r}")
    for c in (baseline, target):
        if df.filter(pl.col("condition") == c).height == 0:
            raise ValueError(f"model {model!r}: condition {c!r} not in results")
    pc = stats.paired_change(results.filter(pl.col("model") == model), prompts, target, baseline, n_boot=n_boot, seed=seed)
    b = df.filter(pl.col("condition") == baseline).select("prompt_id", "label", pl.col("p_yes_norm").alias("b"), pl.col("_finite").alias("fb"))
    a = df.filter(pl.col("condition") == target).select("prompt_id", pl.col("p_yes_norm").alias("a"), pl.col("_finite").alias("fa"))
    pairs = b.join(a, on="prompt_id", how="inner")
    n_all = pairs.height
    n_drop = pairs.filter(~(pl.col("fa") & pl.col("fb"))).height
    pairs = pairs.filter(pl.col("fa") & pl.col("fb"))

    n_heads = None
    if conditions is not None and "n_heads" in conditions.columns:
        t = conditions.filter(pl.col("condition") == target)
        if t.height:
            n_heads = t["n_heads"][0]

    fig = _new_figure(9.0, 5.5)
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.36
    for k, (ax, lab) in enumerate(zip(axes, ("correct", "incorrect"))):
        g = pairs.filter(pl.col("label") == (lab == "correct"))
        n = g.height
        ax.set_title(f"{lab} attempts (n = {n})", fontsize=11)
        ax.set_xticks([0, 1], ["P(Yes) normalised", "P(No) normalised"])
        ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)
        if n == 0:
            ax.text(0.5, 0.5, f"no {lab} attempts", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        bv = g["b"].to_numpy().astype(np.float64)
        av = g["a"].to_numpy().astype(np.float64)
        for j, (vals, name, col, off) in enumerate(
            ((bv, "before (baseline)", _C_BASE, -width / 2), (av, f"after ablating {target}", _C_ABL, width / 2))
        ):
            m, lo, hi = stats.bootstrap_mean_ci(vals, n_boot, stats.group_seed(seed, model, lab, j), 0.95)
            means = np.array([m, 1.0 - m])
            los = np.array([lo, 1.0 - hi])
            his = np.array([hi, 1.0 - lo])
            yerr = np.vstack([means - los, his - means])
            bars = ax.bar(np.arange(2) + off, means, width, yerr=yerr, capsize=4, color=col, label=name if k == 0 else None)
            for rect, v in zip(bars, means):
                ax.text(rect.get_x() + rect.get_width() / 2, 0.02, f"{v:.3f}", ha="center", va="bottom", fontsize=8, color="white")
        r = pc.filter(pl.col("label") == lab).row(0, named=True)
        if r["mean_change"] is not None:
            ci = "" if r["ci_low"] is None else f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            ax.text(0.5, 1.06, f"paired Δ P(Yes) = {r['mean_change']:+.3f}{ci}", ha="center", va="center", fontsize=9)
    axes[0].set_ylabel("mean normalised probability\nP(Yes)/(P(Yes)+P(No)) and P(No)/(P(Yes)+P(No))")
    heads_txt = f" ({n_heads} heads)" if n_heads is not None else ""
    fig.suptitle(f"{model}: verification before vs after {VERBS.get(intervention, intervention)} the target "
                 f"heads{heads_txt}", fontsize=12)
    sub = f"{n_all} prompts paired; error bars: 95% bootstrap CI of the mean ({n_boot} resamples of prompts)"
    if n_drop:
        sub += f"; {n_drop} non-finite pairs dropped"
    fig.text(0.5, 0.905, sub, ha="center", fontsize=9, color="dimgray")
    fig.legend(loc="lower center", ncol=2, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.9))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# null distribution of random head sets
# --------------------------------------------------------------------------------------------


def plot_null_distribution(
    summary: pl.DataFrame,
    model: str,
    metric: str,
    path: str | Path,
    target_kind: str = "target",
    control_kind: str = "random",
) -> Path:
    """Histogram of the random head sets' effects with the target set's effect marked.

    The empirical two-sided p-value ((1 + #|control| >= |target|) / (n + 1)), z and rank are written
    on the plot, with the smallest p attainable with this many controls so a reader sees whether
    the control budget could support a claim at all. Raises ValueError (from
    `stats.target_vs_controls`) without a target or random conditions.
    """
    sm = summary.filter(pl.col("model") == model)
    tvc = stats.target_vs_controls(sm, metric, target_kind=target_kind, control_kind=control_kind).row(0, named=True)
    cv = sm.filter(pl.col("kind") == control_kind)[metric].cast(pl.Float64).to_numpy()
    cv = cv[np.isfinite(cv)]
    t = tvc["target_effect"]
    tgt = sm.filter(pl.col("kind") == target_kind)
    rnd = sm.filter(pl.col("kind") == control_kind)
    k_t = tgt["n_heads"][0] if "n_heads" in tgt.columns else None
    k_r = sorted(set(rnd["n_heads"].drop_nulls().to_list())) if "n_heads" in rnd.columns else []

    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    vals = np.concatenate([cv, [t] if t is not None and np.isfinite(t) else []])
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.05 * (hi - lo) if hi > lo else max(1e-3, abs(lo) * 0.05)
        edges = np.linspace(lo - pad, hi + pad, int(np.clip(np.sqrt(max(cv.size, 1)) * 2, 10, 40)) + 1)
    else:
        edges = np.linspace(-1, 1, 11)
    if cv.size:
        ax.hist(cv, bins=edges, color=_C_BASE, alpha=0.85, edgecolor="white",
                label=f"random head sets (n = {cv.size}{', ' + '/'.join(map(str, k_r)) + ' heads each' if k_r else ''})")
        ax.axvline(float(cv.mean()), color=_C_BASE, ls=":", lw=1.5, label=f"mean of random sets = {cv.mean():+.4f}")
    ax.axvline(0.0, color="grey", ls="--", lw=1, label="no effect")
    if t is not None and np.isfinite(t):
        ax.axvline(t, color=_C_INCORRECT, lw=2.5, label=f"target set{f' ({k_t} heads)' if k_t is not None else ''} = {t:+.4f}")
    n = tvc["n_controls"]
    if tvc["p_empirical"] is not None:
        z = f"{tvc['z']:+.2f}" if tvc["z"] is not None else "n/a (controls have zero spread)"
        stats_txt = (
            f"empirical p (two-sided) = {tvc['p_empirical']:.3g}  (smallest attainable 1/{n + 1} = {1 / (n + 1):.3g});"
            f"  z = {z}\none-sided p(≤) = {tvc['p_less']:.3g}, p(≥) = {tvc['p_greater']:.3g};"
            f"  rank by |effect|: {tvc['rank']} of {n + 1}"
        )
    else:
        stats_txt = "target effect undefined: no p-value"
    ax.set_title(stats_txt, fontsize=9)
    ax.set_xlabel(_label(metric))
    ax.set_ylabel("count of random head sets")
    n_p = _n_prompts_from_summary(summary, model)
    kinds = sorted(set(sm["intervention"].drop_nulls().to_list()) - {"none"}) if "intervention" in sm.columns else []
    how = f", {'/'.join(kinds)}" if kinds and kinds != ["zero"] else ""
    fig.suptitle(f"{model}: target heads vs random head sets ({n_p if n_p is not None else '?'} prompts{how})\n"
                 f"{_short(metric)}", fontsize=11)
    ax.legend(loc="best", fontsize=8)
    ymax = ax.get_ylim()[1]
    ax.set_ylim(0, ymax * 1.3)  # headroom so the legend does not sit on the bars
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# sweeps over single heads and whole layers
# --------------------------------------------------------------------------------------------


def _sweep_rows(summary: pl.DataFrame, model: str, kind: str) -> pl.DataFrame:
    """Summary rows of one sweep kind for a model (summary carries each condition's layer and head)."""
    return summary.filter((pl.col("model") == model) & (pl.col("kind") == kind))


def _target_heads(conditions: pl.DataFrame | None) -> list[tuple[int, int]]:
    """The target set's heads, read from the `heads` column of conditions.parquet."""
    if conditions is None:
        return []
    t = conditions.filter(pl.col("kind") == "target")
    return parse_heads(t["heads"][0]) if t.height else []


def plot_head_heatmap(
    summary: pl.DataFrame,
    conditions: pl.DataFrame | None,
    model: str,
    n_layers: int | None = None,
    n_heads: int | None = None,
    metric: str = "delta_correct",
    path: str | Path | None = None,
) -> Path | None:
    """Layer x head map of the effect of zero-ablating each head alone (a `single_head` sweep).

    Diverging colormap centred at 0 (symmetric limits, so colour intensity compares across signs);
    heads not swept are grey; heads of the target set are outlined, which shows at a glance whether
    the chosen heads are the ones with individual effects. Returns None (no file) when the model
    has no single_head conditions. n_layers / n_heads default to the largest index seen + 1.
    """
    sm = _sweep_rows(summary, model, "single_head").filter(
        pl.col("layer").is_not_null() & pl.col("head").is_not_null()
    )
    if sm.height == 0:
        return None
    L = int(n_layers) if n_layers else int(sm["layer"].max()) + 1
    H = int(n_heads) if n_heads else int(sm["head"].max()) + 1
    grid = np.full((L, H), np.nan)
    for layer, head, v in sm.select("layer", "head", metric).iter_rows():
        if 0 <= layer < L and 0 <= head < H and v is not None:
            grid[layer, head] = v
    finite = grid[np.isfinite(grid)]
    a = float(np.abs(finite).max()) if finite.size else 0.0
    a = a if a > 0 else 1e-9
    fig = _new_figure(8.0, max(5.0, min(11.0, 2.0 + 0.22 * L)))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=TwoSlopeNorm(vmin=-a, vcenter=0.0, vmax=a),
                   aspect="auto", origin="upper", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(_label(metric), fontsize=9)
    tgt = _target_heads(conditions)
    for layer, head in tgt:
        if 0 <= layer < L and 0 <= head < H:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.4))
    ax.set_xticks(range(H))
    ax.set_xticklabels([str(h) for h in range(H)], fontsize=7)
    step = 1 if L <= 40 else 2
    ax.set_yticks(range(0, L, step))
    ax.set_yticklabels([str(i) for i in range(0, L, step)], fontsize=7)
    ax.set_xlabel("attention head index (0-based)")
    ax.set_ylabel("layer index (0-based)")
    n_p = _n_prompts_from_summary(summary, model)
    note = "; black boxes = target-set heads" if tgt else ""
    ax.set_title(f"{model}: effect of zero-ablating one head — {_short(metric)}\n"
                 f"{n_p if n_p is not None else '?'} prompts; {sm.height} heads swept (grey = not swept){note}",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_bars(
    summary: pl.DataFrame,
    model: str,
    n_layers: int | None = None,
    metric: str = "delta_correct",
    path: str | Path | None = None,
) -> Path | None:
    """Bar per layer: the effect of zero-ablating all heads of that layer (a `layer` sweep).

    The target set's effect and the central 95% of the random sets are drawn as references when
    present (their sizes are in the legend: a whole layer is not the same size as the target set,
    so they are context, not a test). Returns None when the model has no layer conditions.
    """
    sm = _sweep_rows(summary, model, "layer").filter(pl.col("layer").is_not_null()).sort("layer")
    if sm.height == 0:
        return None
    layers = sm["layer"].to_numpy()
    vals = sm[metric].cast(pl.Float64).fill_null(np.nan).to_numpy()
    fig = _new_figure(max(8.0, min(14.0, 0.25 * len(layers) + 3)), 5.0)
    ax = fig.add_subplot(1, 1, 1)
    colors = [_C_INCORRECT if v < 0 else _C_BASE for v in np.nan_to_num(vals)]
    sizes = sorted(set(sm["n_heads"].drop_nulls().to_list())) if "n_heads" in sm.columns else []
    ax.bar(layers, np.nan_to_num(vals), color=colors, width=0.8,
           label=f"one whole layer ablated{f' ({sizes[0]} heads)' if len(sizes) == 1 else ''}")
    ax.axhline(0.0, color="black", lw=0.8)
    allm = summary.filter(pl.col("model") == model)
    rnd = allm.filter(pl.col("kind") == "random")[metric].cast(pl.Float64).to_numpy()
    rnd = rnd[np.isfinite(rnd)]
    if rnd.size >= 2:
        lo, hi = np.quantile(rnd, [0.025, 0.975])
        ax.axhspan(lo, hi, color="grey", alpha=0.2, label=f"random head sets, central 95% (n = {rnd.size})")
    tgt = allm.filter(pl.col("kind") == "target")
    if tgt.height and tgt[metric][0] is not None:
        k = tgt["n_heads"][0] if "n_heads" in tgt.columns else None
        ax.axhline(float(tgt[metric][0]), color=_C_ABL, ls="--", lw=1.8,
                   label=f"target set{f' ({k} heads)' if k is not None else ''} = {float(tgt[metric][0]):+.4f}")
    L = int(n_layers) if n_layers else int(layers.max()) + 1
    ax.set_xlim(-0.7, L - 0.3)
    step = 1 if L <= 40 else 2
    ax.set_xticks(range(0, L, step))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("layer index (0-based), all heads of the layer zero-ablated")
    ax.set_ylabel(_label(metric))
    ax.grid(axis="y", alpha=0.3)
    n_p = _n_prompts_from_summary(summary, model)
    ax.set_title(f"{model}: effect of ablating whole layers — {_short(metric)}\n"
                 f"{n_p if n_p is not None else '?'} prompts; {sm.height} layers swept", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------------


def plot_p_yes_hist(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    model: str,
    conditions: Sequence[str] = ("baseline", "target"),
    path: str | Path | None = None,
    bins: int = 25,
) -> Path | None:
    """Histograms of normalised P(Yes) per condition, correct vs incorrect attempts overlaid.

    Means hide saturation (a verifier at 0.99 for everything has a fine mean and no
    discrimination); the distributions show it. Non-finite rows are left out and counted in the
    panel title. Returns None when none of `conditions` exists for the model.
    """
    df = stats.labelled(results.filter(pl.col("model") == model), prompts) if results.height else None
    present = [c for c in conditions if df is not None and df.filter(pl.col("condition") == c).height]
    if not present:
        return None
    fig = _new_figure(max(8.0, 4.2 * len(present)), 5.0)
    axes = np.atleast_1d(fig.subplots(1, len(present), sharey=True, squeeze=False)[0])
    edges = np.linspace(0, 1, bins + 1)
    n_prompts = df.filter(pl.col("condition") == present[0]).height
    for ax, c in zip(axes, present):
        g = df.filter(pl.col("condition") == c)
        fin = g.filter(pl.col("_finite"))
        for lab, col, name in ((True, _C_CORRECT, "correct"), (False, _C_INCORRECT, "incorrect")):
            v = fin.filter(pl.col("label") == lab)["p_yes_norm"].to_numpy()
            if v.size:
                ax.hist(np.clip(v, 0, 1), bins=edges, color=col, alpha=0.55, label=f"{name} attempts (n = {v.size})")
        bad = g.height - fin.height
        ax.set_title(f"{c}" + (f" ({bad} non-finite left out)" if bad else ""), fontsize=10)
        ax.set_xlabel(PNORM, fontsize=9)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("count of prompts")
    fig.suptitle(f"{model}: distribution of normalised P(Yes) by attempt correctness — {n_prompts} prompts", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# intervention kinds side by side, and faithfulness
# --------------------------------------------------------------------------------------------


def _judged_kinds(summary: pl.DataFrame, model: str) -> list[str]:
    """Intervention kinds under which the model has both a target and random sets, in INTERVENTIONS order."""
    sm = summary.filter(pl.col("model") == model)
    if "intervention" not in sm.columns:
        return []
    have = {k: set(sm.filter(pl.col("intervention") == k)["kind"].to_list()) for k in INTERVENTIONS}
    return [k for k in INTERVENTIONS if {"target", "random"} <= have[k]]


def plot_interventions(
    summary: pl.DataFrame, model: str, path: str | Path, metrics: Sequence[str] = stats.DEFAULT_CONTROL_METRICS
) -> Path | None:
    """The target-vs-controls verdict under each intervention kind, side by side: per metric, one column per
    kind with every random set's effect (dots) and the target's (diamond), and its empirical p-value.

    A claim that a set matters should hold across kinds (Miller et al. 2024: the kind of ablation decides
    which task is measured); this is where a reader sees whether it does. None when fewer than two kinds ran.
    """
    kinds = _judged_kinds(summary, model)
    if len(kinds) < 2:
        return None
    sm = summary.filter(pl.col("model") == model)
    tvc = stats.target_vs_controls(sm, list(metrics))
    fig = _new_figure(4.2 * len(metrics), 5.0)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)[0])
    rng = np.random.default_rng(0)  # jitter only
    for ax, m in zip(axes, metrics):
        for x, k in enumerate(kinds):
            part = sm.filter(pl.col("intervention") == k)
            cv = part.filter(pl.col("kind") == "random")[m].cast(pl.Float64).to_numpy()
            cv = cv[np.isfinite(cv)]
            ax.scatter(x + rng.uniform(-0.15, 0.15, cv.size), cv, s=14, color=_C_BASE, alpha=0.7,
                       label="random sets" if x == 0 else None)
            t = part.filter(pl.col("kind") == "target")[m].cast(pl.Float64).to_list()
            row = tvc.filter((pl.col("intervention") == k) & (pl.col("metric") == m))
            if t and t[0] is not None and np.isfinite(t[0]):
                ax.scatter([x], [t[0]], s=90, marker="D", color=_C_INCORRECT, zorder=3,
                           label="target set" if x == 0 else None)
            if row.height and row["p_empirical"][0] is not None:
                ax.annotate(f"p = {row['p_empirical'][0]:.2g}", (x, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=8)
        ax.axhline(0.0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(kinds)), kinds, fontsize=9)
        ax.set_xlim(-0.6, len(kinds) - 0.4)
        ax.set_xlabel("intervention kind")
        ax.set_ylabel(_label(m), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    n_p = _n_prompts_from_summary(summary, model)
    fig.suptitle(f"{model}: target set vs random sets of its size under each intervention "
                 f"({n_p if n_p is not None else '?'} prompts; p: two-sided empirical)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def plot_faithfulness(faith: pl.DataFrame, model: str, path: str | Path, label: str = "all") -> Path | None:
    """Faithfulness of the target set and of each random set of its size, one column per circuit kind:
    1 = the set alone restores the model's mean log-odds, 0 = no better than intervening on everything."""
    fm = faith.filter((pl.col("model") == model) & (pl.col("label") == label))
    if fm.height == 0:
        return None
    kinds = [k for k in INTERVENTIONS if k in set(fm["intervention"].to_list())]
    fig = _new_figure(max(7.0, 2.2 * len(kinds) + 2), 5.0)
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    for x, k in enumerate(kinds):
        part = fm.filter(pl.col("intervention") == k)
        rv = part.filter(pl.col("kept") != "target")["faithfulness"].cast(pl.Float64).to_numpy()
        rv = rv[np.isfinite(rv)]
        ax.scatter(x + rng.uniform(-0.15, 0.15, rv.size), rv, s=14, color=_C_BASE, alpha=0.7,
                   label="random sets of its size" if x == 0 else None)
        tgt = part.filter(pl.col("kept") == "target")
        if tgt.height and tgt["faithfulness"][0] is not None:
            ax.scatter([x], [tgt["faithfulness"][0]], s=90, marker="D", color=_C_INCORRECT, zorder=3,
                       label="target set" if x == 0 else None)
            if tgt["p_greater"][0] is not None:
                ax.annotate(f"p(≥) = {tgt['p_greater'][0]:.2g}", (x, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=8)
    for y in (0.0, 1.0):
        ax.axhline(y, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_xlim(-0.6, len(kinds) - 0.4)
    ax.set_xlabel("intervention on everything outside the kept set")
    ax.set_ylabel("faithfulness = (M(circuit) − M(nothing kept)) / (M(model) − M(nothing kept))", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{model}: faithfulness of the target set\n({label} attempts; M = mean log-odds)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# everything that applies
# --------------------------------------------------------------------------------------------


def make_figures(
    results: pl.DataFrame,
    prompts: pl.DataFrame,
    conditions: pl.DataFrame,
    summary: pl.DataFrame | None,
    out_dir: str | Path,
    n_layers: int | None = None,
    n_heads: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    metrics: Sequence[str] = stats.DEFAULT_CONTROL_METRICS,
    target: str = "target",
    baseline: str = "baseline",
    faith: pl.DataFrame | None = None,
) -> list[Path]:
    """Make every figure the data supports, for each model, into `out_dir`; return their paths.

    Per model and intervention kind: before/after bars (needs the target condition), null distributions for
    each metric in `metrics` (needs target and random conditions, and a finite target effect), the
    single-head heatmap and layer bars for each metric in ("delta_correct", "delta_incorrect") when those
    sweeps ran; then P(Yes) histograms for baseline and the target under each kind, the kinds side by side
    (`plot_interventions`, two kinds or more) and the faithfulness of the target (`faith`, when circuit
    conditions ran). Missing pieces are skipped, not errors. File names:
    `<model>__<figure>[__<metric>][__<kind>].png` with the model name made file-safe; zero has no suffix.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if summary is None:
        summary = stats.summarize(results, prompts, conditions, baseline=baseline)
    paths: list[Path] = []
    for model in sorted(results["model"].unique().to_list()):
        stem = _safe(model)
        conds = set(results.filter(pl.col("model") == model)["condition"].unique().to_list())
        sm_all = summary.filter(pl.col("model") == model)
        kinds = [k for k in INTERVENTIONS if k in set(sm_all["intervention"].to_list())] \
            if "intervention" in sm_all.columns else ["zero"]
        for kind in kinds:
            sfx = "" if kind == "zero" else f"__{kind}"
            tcond = target if kind == "zero" else f"{target}@{kind}"
            sm = sm_all.filter(pl.col("intervention").is_in(["none", kind])) if "intervention" in sm_all.columns \
                else sm_all
            kinds_here = set(sm["kind"].drop_nulls().to_list())
            if baseline in conds and tcond in conds:
                paths.append(plot_before_after(results, prompts, model, target=tcond, baseline=baseline,
                                               path=out / f"{stem}__before_after{sfx}.png", n_boot=n_boot, seed=seed,
                                               conditions=conditions, intervention=kind))
            if "target" in kinds_here and "random" in kinds_here:
                for m in metrics:
                    if m not in sm.columns:
                        continue
                    tv = sm.filter(pl.col("kind") == "target")[m][0]
                    if tv is None or not np.isfinite(tv):
                        continue
                    paths.append(plot_null_distribution(sm, model, m, out / f"{stem}__null__{m}{sfx}.png"))
            for m in ("delta_correct", "delta_incorrect"):
                p = plot_head_heatmap(sm, conditions, model, n_layers=n_layers, n_heads=n_heads, metric=m,
                                      path=out / f"{stem}__head_heatmap__{m}{sfx}.png")
                if p is not None:
                    paths.append(p)
                p = plot_layer_bars(sm, model, n_layers=n_layers, metric=m,
                                    path=out / f"{stem}__layer_bars__{m}{sfx}.png")
                if p is not None:
                    paths.append(p)
        shown = [baseline] + [target if k == "zero" else f"{target}@{k}" for k in kinds]
        p = plot_p_yes_hist(results, prompts, model, conditions=shown, path=out / f"{stem}__p_yes_hist.png")
        if p is not None:
            paths.append(p)
        p = plot_interventions(summary, model, out / f"{stem}__interventions.png", metrics)
        if p is not None:
            paths.append(p)
        if faith is not None and faith.height:
            p = plot_faithfulness(faith, model, out / f"{stem}__faithfulness.png")
            if p is not None:
                paths.append(p)
    return paths
