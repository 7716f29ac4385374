"""The study's neuron heuristic: per-layer linear probes for "attempt correct", and value vectors
scored by their cosine with the probe's weight vector (`probe_cos`).

Per layer l a logistic-regression probe reads the residual stream after layer l at the last
position (where the verdict is read) and predicts whether the attempt is correct. Its held-out
accuracy says whether layer l separates the labels at all; a one-sided binomial test against the
best constant guess says whether that accuracy is more than chance. The value vectors of layers
<= l are then scored by cosine with the probe's weight vector, and a neuron's `probe_cos` is the
maximum over probe layers (by default only those whose probe separates; no such layer: NaN).

The regression is written here (no scikit-learn): features are centred and divided by one global
scale (their RMS norm), which conditions the problem without changing any direction, and the loss
is the mean log-loss plus `l2 / 2 * |w|^2` on the scaled features (`L2_DEFAULT`: a mild penalty
that keeps the weights finite when the classes are separable, as they always are with fewer
prompts than residual dimensions). It is minimised in float64 with L-BFGS, from zero, so the fit
is deterministic; the only randomness is the stratified train / held-out split, drawn from `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from verif.analysis.discovery.inputs import length_batches, padded
from verif.model.loading import decoder_layers

L2_DEFAULT = 1e-2
TEST_FRACTION = 0.25
ALPHA = 0.05
# Largest |gradient| entry accepted at the solution. The loss is strongly convex with curvature >= l2,
# so the weights are then within |grad| / l2 (<= 1e-4 at the default l2) of the optimum, while a
# separating probe's weights have norm > 1; tighter asks for loss changes below float64 resolution.
GRAD_TOL = 1e-6


@torch.inference_mode()
def last_position_residuals(
    model: nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
) -> np.ndarray:
    """`[n_prompts, L, hidden]` float32: the residual stream after each decoder layer, last position."""
    if not token_ids:
        raise ValueError("last_position_residuals: no prompts given")
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def keep(module: nn.Module, args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, -1].float().cpu()

        return keep

    out = np.zeros((len(token_ids), len(layers), model.config.hidden_size), dtype=np.float32)
    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(layers)]
    try:
        for batch in length_batches(token_ids, batch_size):
            model(**padded([token_ids[i] for i in batch], pad_id, device), logits_to_keep=1, use_cache=False)
            out[batch] = torch.stack([captured[i] for i in range(len(layers))], dim=1).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return out


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices with each class split in the same proportion (at least one of each
    class on each side); a class with fewer than 2 prompts cannot be both trained and tested."""
    labels = np.asarray(labels, dtype=bool)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    counts = {c: int((labels == c).sum()) for c in (True, False)}
    if min(counts.values()) < 2:
        raise ValueError(f"a probe needs >= 2 correct and >= 2 incorrect attempts, got {counts[True]} and {counts[False]}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in (True, False):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2_DEFAULT) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression; returns `(w, b)` with `P(y=1) = sigmoid(x @ w + b)` in the
    units of `x` (the penalty applies on the centred, globally rescaled features, see the module doc)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (separable data has no finite unpenalised solution), got {l2}")
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).sum(1).mean())) or 1.0
    with torch.inference_mode(False), torch.enable_grad():
        xt = torch.from_numpy((x - mean) / scale)
        yt = torch.from_numpy(y)
        params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=1, max_iter=500, history_size=20, tolerance_grad=GRAD_TOL,
                                tolerance_change=0, line_search_fn="strong_wolfe")

        def loss_fn() -> torch.Tensor:
            w, b = params[:-1], params[-1]
            return F.binary_cross_entropy_with_logits(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(10):
            opt.step(closure)
            (grad,) = torch.autograd.grad(loss_fn(), params)
            if float(grad.abs().max()) <= GRAD_TOL:
                break
        else:
            raise RuntimeError(f"logistic regression did not converge (largest gradient {float(grad.abs().max()):.2e})")
    w_scaled = params[:-1].detach().numpy()
    w = w_scaled / scale
    return w, float(params[-1].detach()) - float(mean @ w)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (no overflow for large n)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)
            for j in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class Probe:
    """A fitted probe of one layer and how well it separates held-out prompts."""

    layer: int
    weight: np.ndarray  # [hidden], in residual-stream units; points toward "correct"
    bias: float
    n_train: int
    n_test: int
    train_acc: float
    heldout_acc: float
    chance_acc: float  # accuracy of the best constant guess on the held-out prompts
    p_value: float  # one-sided binomial: P(>= this many held-out hits by chance)
    separates: bool  # p_value < alpha


def fit_probes(
    residuals: np.ndarray,
    labels: Sequence[bool],
    layers: Sequence[int] | None = None,
    l2: float = L2_DEFAULT,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    alpha: float = ALPHA,
) -> list[Probe]:
    """One probe per layer (all by default) on `[n, L, hidden]` residuals, label = attempt correct.

    Every layer uses the same split. The probe's weight is the one fitted on the training prompts,
    the one whose held-out accuracy is reported.
    """
    residuals = np.asarray(residuals)
    y = np.asarray(labels, dtype=bool)
    if residuals.ndim != 3 or residuals.shape[0] != len(y):
        raise ValueError(f"residuals {residuals.shape} must be [n_prompts={len(y)}, layers, hidden]")
    n_layers = residuals.shape[1]
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"probe layers {bad}: the model has layers 0-{n_layers - 1}")
    train, test = stratified_split(y, test_fraction, seed)
    probes = []
    for layer in layers:
        x = residuals[:, layer].astype(np.float64)
        w, b = fit_logistic(x[train], y[train], l2)
        hits = ((x @ w + b) > 0) == y
        n_hit = int(hits[test].sum())
        chance = max(float(y[test].mean()), 1 - float(y[test].mean()))
        p = binomial_tail(n_hit, len(test), chance)
        probes.append(Probe(layer, w, b, len(train), len(test), float(hits[train].mean()), n_hit / len(test),
                            chance, p, p < alpha))
    return probes


def probe_table(model: str, probes: Sequence[Probe]) -> pl.DataFrame:
    """`probes.parquet`: one row per probe layer with its accuracies and whether it separates."""
    return pl.DataFrame(
        [{"model": model, "layer": p.layer, "n_train": p.n_train, "n_test": p.n_test, "train_acc": p.train_acc,
          "heldout_acc": p.heldout_acc, "chance_acc": p.chance_acc, "p_value": p.p_value, "separates": p.separates}
         for p in probes],
        schema={"model": pl.Utf8, "layer": pl.Int64, "n_train": pl.Int64, "n_test": pl.Int64, "train_acc": pl.Float64,
                "heldout_acc": pl.Float64, "chance_acc": pl.Float64, "p_value": pl.Float64, "separates": pl.Boolean},
    )


def probe_cosines(values: Sequence[torch.Tensor | np.ndarray], probes: Sequence[Probe], only_separating: bool = True) -> np.ndarray:
    """`[L, I]`: each value vector's largest cosine with the weight of a probe at its layer or above.

    `values[l]` is layer l's `[hidden, I]` down_proj weight. NaN where no (separating) probe reads
    the layer, so an unscored neuron is never mistaken for an unaligned one.
    """
    used = [p for p in probes if p.separates or not only_separating]
    out = np.full((len(values), values[0].shape[1]), np.nan)  # .shape: a CUDA tensor has no numpy view
    for layer, weight in enumerate(values):
        above = [p for p in used if p.layer >= layer]
        if not above:
            continue
        v = torch.as_tensor(weight).detach().double().cpu().numpy()
        v = v / np.maximum(np.linalg.norm(v, axis=0, keepdims=True), np.finfo(np.float64).tiny)
        directions = np.stack([p.weight / np.linalg.norm(p.weight) for p in above])  # [probes, hidden]
        out[layer] = (directions @ v).max(0)
    return out
