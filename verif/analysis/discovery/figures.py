"""Figures of a discovery run: head score maps, top-neuron strips, AtP against exact, effect vs k.

Same conventions as `verif.analysis.figures`: a `Figure` with the Agg canvas attached (pyplot is
never touched), one PNG per call, the model and the number of prompts in every title, units on
every axis. Signed scores use a diverging map centred at 0; attention mass a sequential one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.patches import Rectangle

from verif.analysis.discovery.ranking import SIGNED_RANKINGS, pearson, ranked, spearman
from verif.analysis.figures import _new_figure, _save

SCORE_LABELS = {
    "atp": "AtP estimate of Δ mean log-odds (nats)",
    "exact": "exact Δ mean log-odds (nats)",
    "attn_to_target": "attention from last position to target tokens (probability)",
    "logit_yes_no": "value vector's mean Yes − mean No logit (logits per unit activation)",
    "probe_cos": "max cosine with a correct-vs-incorrect probe",
}
_NONNEGATIVE = {"attn_to_target"}


def _norm(values: np.ndarray, score: str) -> Normalize:
    finite = values[np.isfinite(values)]
    if score in _NONNEGATIVE:
        return Normalize(vmin=0.0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    a = float(np.abs(finite).max()) if finite.size else 0.0
    a = a if a > 0 else 1e-9
    return TwoSlopeNorm(vmin=-a, vcenter=0.0, vmax=a)


def _cmap(score: str):
    name = "viridis" if score in _NONNEGATIVE else "RdBu_r"
    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def plot_head_scores(
    scores: np.ndarray, score: str, model: str, n_prompts: int, path: str | Path,
    highlight: Sequence[tuple[int, int]] = (),
) -> Path:
    """Layer x head map of one head score (grey = not scored); `highlight` heads are outlined."""
    grid = np.asarray(scores, dtype=np.float64)
    n_layers, n_heads = grid.shape
    fig = _new_figure(8.0, max(5.0, min(11.0, 2.0 + 0.22 * n_layers)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=_cmap(score), norm=_norm(grid, score), aspect="auto",
                   origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label(SCORE_LABELS.get(score, score), fontsize=9)
    for layer, head in highlight:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.4))
    ax.set_xticks(range(n_heads))
    ax.set_xticklabels([str(h) for h in range(n_heads)], fontsize=7)
    step = 1 if n_layers <= 40 else 2
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels([str(i) for i in range(0, n_layers, step)], fontsize=7)
    ax.set_xlabel("attention head index (0-based)")
    ax.set_ylabel("layer index (0-based)")
    scored = int(np.isfinite(grid).sum())
    note = f"; black boxes = {len(highlight)} highlighted heads" if highlight else ""
    ax.set_title(f"{model}: {score} per head\n{n_prompts} prompts; {scored} of {grid.size} heads scored{note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_top_neurons(scores: np.ndarray, score: str, model: str, n_prompts: int, path: str | Path, top: int = 100) -> Path:
    """Layer x neuron-index strips: where the `top` neurons of a ranking sit, coloured by their score."""
    grid = np.asarray(scores, dtype=np.float64)
    n_layers, width = grid.shape
    best = ranked(grid, score)[:top]
    fig = _new_figure(10.0, max(4.5, min(10.0, 1.5 + 0.2 * n_layers)))
    ax = fig.add_subplot(1, 1, 1)
    for layer in range(n_layers):
        ax.axhline(layer, color="#eeeeee", lw=0.6, zorder=0)
    if best:
        layers = np.array([layer for layer, _ in best])
        index = np.array([i for _, i in best])
        values = grid[layers, index]
        sc = ax.scatter(index, layers, c=values, cmap=_cmap(score), norm=_norm(values, score), marker="|", s=160, lw=2)
        fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.02).set_label(SCORE_LABELS.get(score, score), fontsize=9)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(n_layers - 0.5, -0.5)
    ax.set_xlabel(f"neuron index in the MLP (0-{width - 1})")
    ax.set_ylabel("layer index (0-based)")
    order = "largest value" if score in SIGNED_RANKINGS else "largest |value|"
    ax.set_title(f"{model}: top {len(best)} neurons by {score} ({order})\n{n_prompts} prompts", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_atp_vs_exact(atp: np.ndarray, exact: np.ndarray, model: str, n_prompts: int, path: str | Path) -> Path | None:
    """Scatter of the AtP estimate against the exact effect per screened head, y = x for reference;
    Spearman and Pearson correlations in the title. None when fewer than 2 heads were screened."""
    x, y = np.asarray(exact, dtype=np.float64).ravel(), np.asarray(atp, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return None
    x, y = x[keep], y[keep]
    fig = _new_figure(6.5, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="#888888", lw=1, ls="--", label="atp = exact")
    ax.scatter(x, y, s=14, color="#5b7fa6", alpha=0.8, label="one head")
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.axvline(0, color="#cccccc", lw=0.8)
    ax.set_xlabel(SCORE_LABELS["exact"])
    ax.set_ylabel(SCORE_LABELS["atp"])
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{model}: AtP vs exact ablation effect, {int(keep.sum())} heads, {n_prompts} prompts\n"
                 f"Spearman {spearman(x, y):.3f}, Pearson {pearson(x, y):.3f}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_effect_vs_k(sets: pl.DataFrame, kind: str, model: str, n_prompts: int, path: str | Path) -> Path | None:
    """Effect of ablating each ranking's top k against k, with the random-set null (mean ± 2 sd)."""
    rows = sets.filter(pl.col("kind") == kind).sort("k")
    if rows.height == 0:
        return None
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    null = rows.group_by("k").agg(pl.col("null_mean").first(), pl.col("null_std").first()).sort("k").drop_nulls()
    if null.height:
        k, mean, sd = (null[c].to_numpy().astype(float) for c in ("k", "null_mean", "null_std"))
        ax.fill_between(k, mean - 2 * sd, mean + 2 * sd, color="#cccccc", alpha=0.6, label="random sets: mean ± 2 sd")
        ax.plot(k, mean, color="#888888", lw=1)
    for ranking in rows["ranking"].unique(maintain_order=True).to_list():
        r = rows.filter(pl.col("ranking") == ranking)
        ax.plot(r["k"].to_numpy(), r["delta"].to_numpy(), marker="o", ms=4, label=f"top k by {ranking}")
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.set_xscale("log", base=2)
    ks = sorted(set(rows["k"].to_list()))
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel(f"number of {kind}s ablated together (k, log scale)")
    ax.set_ylabel("Δ mean log-odds, ablated − none (nats)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{model}: effect of the top-k {kind}s of each ranking vs random {kind} sets\n{n_prompts} prompts",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
