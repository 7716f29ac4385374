"""The per-component output tables: `heads.parquet` and `neurons.parquet`.

One row per component; a score that was not computed for a component (a head outside the exact
screen, a neuron no separating probe reads) is null, never 0.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def _long(model: str, index_name: str, scores: dict[str, np.ndarray]) -> pl.DataFrame:
    shapes = {name: np.shape(v) for name, v in scores.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"score maps must all be [layers, {index_name}s] of one shape, got {shapes}")
    n_layers, width = next(iter(shapes.values()))
    columns: dict[str, object] = {
        "model": [model] * (n_layers * width),
        "layer": np.repeat(np.arange(n_layers), width),
        index_name: np.tile(np.arange(width), n_layers),
    }
    frame = pl.DataFrame(columns, schema={"model": pl.Utf8, "layer": pl.Int64, index_name: pl.Int64})
    return frame.with_columns(
        pl.Series(name, np.asarray(v, dtype=np.float64).ravel(), dtype=pl.Float64, nan_to_null=True)
        for name, v in scores.items()
    )


def heads_table(model: str, atp: np.ndarray, exact: np.ndarray, attn_to_target: np.ndarray,
                **patching: np.ndarray) -> pl.DataFrame:
    """`model, layer, head, atp, exact, attn_to_target` from `[L, H]` maps (NaN -> null), then any `patching`
    maps (`patch_noising`, `patch_denoising`: a discovery under resample)."""
    return _long(model, "head", {"atp": atp, "exact": exact, "attn_to_target": attn_to_target, **patching})


def neurons_table(model: str, atp: np.ndarray, logit_yes_no: np.ndarray, probe_cos: np.ndarray) -> pl.DataFrame:
    """`model, layer, neuron, atp, logit_yes_no, probe_cos` from `[L, I]` maps (NaN -> null)."""
    return _long(model, "neuron", {"atp": atp, "logit_yes_no": logit_yes_no, "probe_cos": probe_cos})


def exact_map(shape: tuple[int, int], heads: list[tuple[int, int]], deltas: np.ndarray) -> np.ndarray:
    """`[L, H]` map of exact effects: the screened heads' deltas, NaN elsewhere."""
    if len(heads) != len(deltas):
        raise ValueError(f"{len(heads)} screened heads but {len(deltas)} deltas")
    out = np.full(shape, np.nan)
    for (layer, head), delta in zip(heads, deltas):
        out[layer, head] = delta
    return out
