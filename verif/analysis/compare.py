"""Comparing the mechanism of two models (e.g. R1 and its base) on the same prompts, at the last position.

The weights of R1 and base barely differ (`weightdiff`); this asks whether their computation does.
Both models read the same token ids; at the last position (where the answer token is predicted)
it compares, for every layer l:

* the residual streams after layer l: cosine and norm ratio ``|b| / |a|`` (float64). The cosine is
  computed as ``1 - |u - v|^2 / 2`` of the unit vectors, which is exactly 1 for identical vectors
  and keeps differences near 1 visible that ``a.b / (|a||b|)`` would round away;
* the logit lens of each model's residual (its own final norm, then its unembedding): P(Yes), P(No)
  summed over the study's variants (float64 log-softmax, as `verif.model.score`), normalised
  P(Yes), and the top tokens;
* selected neurons: coordinate i of layer l's ``mlp.down_proj`` input (the activation that scales
  value vector i), read by a forward pre-hook.

Residuals come from the model's own forward with ``output_hidden_states=True``. transformers
replaces the last of those with the final-normed state, so the residual after the last layer is
read by a forward hook on the last decoder layer instead; its lens therefore equals the model's own
logits (tested).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from verif.analysis.stats import bootstrap_mean_ci
from verif.model.loading import LoadedModel, decoder_layers
from verif.model.score import DEFAULT_NO, DEFAULT_YES, YesNoIds, left_pad, resolve_yes_no, scores_from_log_probs, yes_no_log_probs

SIDES = ("a", "b")


@dataclass(frozen=True)
class Comparison:
    """Per-prompt results: `residual` (prompt_id, layer: cos, one_minus_cos, norms, norm_ratio,
    max_abs_diff, top1_same), `lens` (side, model, prompt_id, layer: p_yes, p_no, p_yes_norm,
    log_odds, top_ids, top_tokens, top_probs) and `neurons` (prompt_id, layer, neuron: act_a,
    act_b, diff = b - a)."""

    names: tuple[str, str]
    residual: pl.DataFrame
    lens: pl.DataFrame
    neurons: pl.DataFrame


def check_comparable(a: LoadedModel, b: LoadedModel, neurons: Sequence[tuple[int, int]] = ()) -> None:
    """Same vocabulary (token for token), same depth and width; selected neurons inside both."""
    names = f"{a.name!r} and {b.name!r}"
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise ValueError(
            f"compare: models {names} have different tokenizers ({len(va)} vs {len(vb)} tokens; "
            f"e.g. {differ}); the same prompts must be the same token ids in both"
        )
    for field in ("n_layers", "hidden_size", "vocab_size", "intermediate_size"):
        if getattr(a.arch, field) != getattr(b.arch, field):
            raise ValueError(
                f"compare: models {names} differ in {field} ({getattr(a.arch, field)} vs "
                f"{getattr(b.arch, field)}); layers can only be compared between models of one shape"
            )
    for layer, index in neurons:
        if not (0 <= layer < a.arch.n_layers and 0 <= index < a.arch.intermediate_size):
            raise ValueError(
                f"compare.neurons: (layer {layer}, neuron {index}) is outside the models "
                f"(layers 0..{a.arch.n_layers - 1}, neurons 0..{a.arch.intermediate_size - 1})"
            )


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.norm


@torch.inference_mode()
def _last_position(
    lm: LoadedModel, batch: tuple[torch.Tensor, ...], neurons: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals after every layer at the last position [layers, rows, hidden] (model dtype) and the
    selected neurons' activations there [rows, len(neurons)]."""
    model = lm.model
    layers = decoder_layers(model)
    captured: dict[str, torch.Tensor] = {}
    handles = [layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("last", (out[0] if isinstance(out, tuple) else out)[:, -1])
    )]
    for layer in sorted({layer for layer, _ in neurons}):
        handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, layer=layer: captured.__setitem__(f"mlp{layer}", args[0][:, -1])
        ))
    ids, attn, positions = (t.to(next(model.parameters()).device) for t in batch)
    try:
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    # hidden_states: [embeddings, after layer 0, ..., after layer L-2, final-normed]
    resid = torch.stack([h[:, -1] for h in out.hidden_states[1:-1]] + [captured["last"]])
    acts = torch.stack([captured[f"mlp{layer}"][:, i] for layer, i in neurons], dim=1) if neurons else \
        torch.zeros((ids.shape[0], 0))
    return resid, acts


@torch.inference_mode()
def logit_lens(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Float64 log-probabilities of the next token read from residuals [..., hidden]: the model's
    final norm, then its unembedding (in the model's dtype, as its own last step), then log-softmax."""
    logits = lm.model.get_output_embeddings()(_final_norm(lm.model)(resid))
    return torch.log_softmax(logits.double(), dim=-1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - |a/|a| - b/|b||^2 / 2 along the last axis: exactly 1 for identical rows."""
    u = a / a.norm(dim=-1, keepdim=True)
    v = b / b.norm(dim=-1, keepdim=True)
    return 1.0 - ((u - v) ** 2).sum(-1) / 2.0


def compare_models(
    a: LoadedModel,
    b: LoadedModel,
    prompts: Sequence[str],
    neurons: Sequence[tuple[int, int]] = (),
    yes: Sequence[str] = DEFAULT_YES,
    no: Sequence[str] = DEFAULT_NO,
    top_k: int = 5,
    batch_size: int = 8,
) -> Comparison:
    """Run `prompts` through both models and compare them at the last position (module docstring)."""
    neurons = [(int(layer), int(i)) for layer, i in neurons]
    check_comparable(a, b, neurons)
    ids: YesNoIds = resolve_yes_no(a.tokenizer, yes, no)
    tokens = [a.tokenizer(p)["input_ids"] for p in prompts]
    for p, t in zip(prompts, tokens):
        if b.tokenizer(p)["input_ids"] != t:
            raise ValueError(f"compare: the tokenizers of {a.name!r} and {b.name!r} split {p[:60]!r}... differently")
    res_rows, lens_rows, neuron_rows = [], [], []
    for start in range(0, len(tokens), batch_size):
        batch = left_pad(tokens[start:start + batch_size], a.tokenizer.pad_token_id)
        states = {side: _last_position(lm, batch, neurons) for side, lm in zip(SIDES, (a, b))}
        ra, rb = (states[s][0].double().cpu() for s in SIDES)
        cos, na, nb = _cosine(ra, rb), ra.norm(dim=-1), rb.norm(dim=-1)
        top1 = {}
        for side, lm in zip(SIDES, (a, b)):
            resid = states[side][0]
            for layer in range(resid.shape[0]):
                logp = logit_lens(lm, resid[layer]).cpu()
                log_yes, log_no = yes_no_log_probs(logp, ids)
                sc = scores_from_log_probs(log_yes.numpy(), log_no.numpy())
                top_lp, top_ids = logp.topk(top_k, dim=-1)
                top1[side, layer] = top_ids[:, 0]
                for r in range(resid.shape[1]):
                    row_ids = top_ids[r].tolist()
                    lens_rows.append((side, lm.name, start + r, layer, float(sc.p_yes[r]), float(sc.p_no[r]),
                                      float(sc.p_yes_norm[r]), float(sc.log_odds[r]), row_ids,
                                      [lm.tokenizer.decode([t]) for t in row_ids], top_lp[r].exp().tolist()))
        for layer in range(ra.shape[0]):
            same = (top1["a", layer] == top1["b", layer]).tolist()
            for r in range(ra.shape[1]):
                res_rows.append((start + r, layer, float(cos[layer, r]), float(1.0 - cos[layer, r]),
                                 float(na[layer, r]), float(nb[layer, r]), float(nb[layer, r] / na[layer, r]),
                                 float((ra[layer, r] - rb[layer, r]).abs().max()), same[r]))
        acts_a, acts_b = (states[s][1].double().cpu() for s in SIDES)
        for r in range(acts_a.shape[0]):
            for j, (layer, i) in enumerate(neurons):
                va, vb = float(acts_a[r, j]), float(acts_b[r, j])
                neuron_rows.append((start + r, layer, i, va, vb, vb - va))
    return Comparison(
        (a.name, b.name),
        pl.DataFrame(res_rows, orient="row", schema={
            "prompt_id": pl.Int64, "layer": pl.Int64, "cos": pl.Float64, "one_minus_cos": pl.Float64,
            "norm_a": pl.Float64, "norm_b": pl.Float64, "norm_ratio": pl.Float64, "max_abs_diff": pl.Float64,
            "top1_same": pl.Boolean}),
        pl.DataFrame(lens_rows, orient="row", schema={
            "side": pl.String, "model": pl.String, "prompt_id": pl.Int64, "layer": pl.Int64, "p_yes": pl.Float64,
            "p_no": pl.Float64, "p_yes_norm": pl.Float64, "log_odds": pl.Float64, "top_ids": pl.List(pl.Int64),
            "top_tokens": pl.List(pl.String), "top_probs": pl.List(pl.Float64)}),
        pl.DataFrame(neuron_rows, orient="row", schema={
            "prompt_id": pl.Int64, "layer": pl.Int64, "neuron": pl.Int64, "act_a": pl.Float64,
            "act_b": pl.Float64, "diff": pl.Float64}),
    )


def _ci_columns(df: pl.DataFrame, keys: Sequence[str], metrics: Sequence[str], n_boot: int, seed: int,
                ci: float) -> pl.DataFrame:
    """Per group of `keys`: n and, per metric, the mean with its bootstrap CI (float64)."""
    rows = []
    for group in df.partition_by(list(keys), maintain_order=True):
        key_values = [group[k][0] for k in keys]
        row = dict(zip(keys, key_values), n=group.height)
        ints = [v if isinstance(v, int) else zlib.crc32(str(v).encode()) for v in key_values]
        for j, m in enumerate(metrics):
            mean, lo, hi = bootstrap_mean_ci(group[m].cast(pl.Float64).to_numpy(), n_boot, [seed, j, *ints], ci)
            row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return pl.DataFrame(rows)


def summarize_comparison(c: Comparison, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, pl.DataFrame]:
    """Means over prompts with bootstrap CIs: `residual` per layer, `lens` per (side, layer),
    `neurons` per (layer, neuron)."""
    out = {
        "residual": _ci_columns(c.residual, ["layer"], ["cos", "one_minus_cos", "norm_ratio", "top1_same"], n_boot, seed, ci),
        "lens": _ci_columns(c.lens, ["side", "model", "layer"], ["p_yes_norm", "p_yes", "p_no"], n_boot, seed, ci),
    }
    if c.neurons.height:
        out["neurons"] = _ci_columns(c.neurons, ["layer", "neuron"], ["act_a", "act_b", "diff"], n_boot, seed, ci)
    return out


def plot_comparison(summary: dict[str, pl.DataFrame], names: tuple[str, str], n_prompts: int,
                    path: str | Path) -> Path:
    """Per-layer curves with CI bands: 1 - cos and norm ratio of the residuals, the logit lens's
    normalised P(Yes) of both models, and how often their lens top-1 tokens agree."""
    fig = Figure(figsize=(11, 7.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    res = summary["residual"].sort("layer")

    def curve(ax, frame, metric, label=None, color=None):
        ax.plot(frame["layer"].to_numpy(), frame[metric].to_numpy(), marker=".", label=label, color=color)
        ax.fill_between(frame["layer"].to_numpy(), frame[f"{metric}_lo"].to_numpy(), frame[f"{metric}_hi"].to_numpy(),
                        alpha=0.25, color=color)

    curve(axes[0, 0], res, "one_minus_cos")
    axes[0, 0].set_yscale("symlog", linthresh=1e-9)
    axes[0, 0].set_ylabel("1 − cos(residual a, residual b)")
    curve(axes[0, 1], res, "norm_ratio")
    axes[0, 1].axhline(1.0, color="grey", lw=0.8)
    axes[0, 1].set_ylabel("|residual b| / |residual a|")
    for side, name, color in zip(SIDES, names, ("#5b7fa6", "#e07b39")):
        curve(axes[1, 0], summary["lens"].filter(pl.col("side") == side).sort("layer"), "p_yes_norm",
              f"{side}: {name}", color)
    axes[1, 0].set_ylabel("logit lens: P(Yes) / (P(Yes) + P(No))")
    axes[1, 0].set_ylim(-0.02, 1.02)
    axes[1, 0].legend(fontsize=8)
    curve(axes[1, 1], res, "top1_same")
    axes[1, 1].set_ylabel("fraction of prompts: same lens top-1 token")
    axes[1, 1].set_ylim(-0.02, 1.02)
    for ax in axes[1]:
        ax.set_xlabel("layer (residual stream after it, last position)")
    fig.suptitle(f"{names[0]} (a) vs {names[1]} (b), {n_prompts} prompts: mean over prompts, bootstrap CI bands")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, format="png")
    return p
