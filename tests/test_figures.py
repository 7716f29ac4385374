"""Figures are written, are valid PNGs of a readable size, and missing sweeps are skipped."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from verif.analysis import figures, stats

PNG_SIG = b"\x89PNG\r\n\x1a\n"
N_LAYERS, N_HEADS = 6, 4


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the file is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIG, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data.rstrip()[-8:-4] == b"IEND" or b"IEND" in data[-16:], f"{path} is truncated"
    return w, h


def assert_png(path: Path | None, min_w: int = 600, min_h: int = 400) -> None:
    assert path is not None and Path(path).is_file()
    w, h = png_size(path)
    assert w >= min_w and h >= min_h, (path, w, h)


def build(
    n: int = 30,
    n_random: int = 19,
    layer_sweep: bool = True,
    head_sweep: bool = True,
    target: bool = True,
    models: tuple[str, ...] = ("Org/Model-A",),
    seed: int = 0,
):
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2 == 0
    prompts = pl.DataFrame(
        {
            "prompt_id": pl.Series(range(n), dtype=pl.Int64),
            "numbers": [[1, 2, 3]] * n,
            "target": pl.Series([6] * n, dtype=pl.Int64),
            "attempt": ["1 + 2 + 3 = 6"] * n,
            "label": label,
            "error_kind": np.where(label, "none", "arithmetic_slip").tolist(),
            "prompt": ["..."] * n,
        }
    )
    conds: list[dict] = [dict(condition="baseline", kind="baseline", heads="", n_heads=0, layer=None, head=None)]
    if target:
        conds.append(dict(condition="target", kind="target", heads="L1 H2, L3 H0, L3 H3", n_heads=3, layer=None, head=None))
    conds += [dict(condition=f"random-{i:03d}", kind="random", heads="L0 H0, L1 H1, L2 H2", n_heads=3, layer=None, head=None)
              for i in range(n_random)]
    if layer_sweep:
        conds += [dict(condition=f"layer-{l}", kind="layer", heads=", ".join(f"L{l} H{h}" for h in range(N_HEADS)),
                       n_heads=N_HEADS, layer=l, head=None) for l in range(N_LAYERS)]
    if head_sweep:
        conds += [dict(condition=f"head-L{l}H{h}", kind="single_head", heads=f"L{l} H{h}", n_heads=1, layer=l, head=h)
                  for l in range(N_LAYERS) for h in range(N_HEADS)]
    conditions = pl.DataFrame(
        conds,
        schema={"condition": pl.Utf8, "kind": pl.Utf8, "heads": pl.Utf8, "n_heads": pl.Int64, "layer": pl.Int64, "head": pl.Int64},
    )
    rows = []
    for model in models:
        base = np.clip(np.where(label, rng.uniform(0.6, 0.95, n), rng.uniform(0.3, 0.8, n)), 0.01, 0.99)
        for c in conditions.iter_rows(named=True):
            k = c["kind"]
            shift = {"baseline": 0.0, "target": -0.25, "random": rng.normal(0, 0.02), "layer": rng.normal(-0.05, 0.05),
                     "single_head": rng.normal(0, 0.03)}[k]
            p = np.clip(base + shift + (rng.normal(0, 0.02, n) if k != "baseline" else 0), 0.001, 0.999)
            for i in range(n):
                rows.append(dict(model=model, prompt_id=i, condition=c["condition"], p_yes=0.9 * p[i], p_no=0.9 * (1 - p[i]),
                                 p_yes_norm=p[i], log_odds=float(np.log(p[i]) - np.log(1 - p[i]))))
    results = pl.DataFrame(rows)
    return results, prompts, conditions, stats.summarize(results, prompts, conditions)


@pytest.fixture(scope="module")
def full():
    return build(models=("Org/Model-A", "tiny"))


def test_png_helper_rejects_non_png(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png at all, just bytes" * 3)
    with pytest.raises(AssertionError):
        png_size(bad)


def test_make_figures_full_sweep(full, tmp_path):
    results, prompts, conditions, summary = full
    paths = figures.make_figures(results, prompts, conditions, summary, tmp_path, n_layers=N_LAYERS, n_heads=N_HEADS, n_boot=200)
    names = {p.name for p in paths}
    for stem in ("Org_Model-A", "tiny"):
        expected = {
            f"{stem}__before_after.png",
            f"{stem}__null__delta_correct.png",
            f"{stem}__null__delta_incorrect.png",
            f"{stem}__null__delta_auroc.png",
            f"{stem}__head_heatmap__delta_correct.png",
            f"{stem}__layer_bars__delta_correct.png",
            f"{stem}__p_yes_hist.png",
        }
        assert expected <= names, expected - names
    assert len(paths) == len(set(paths))
    for p in paths:
        assert p.parent == tmp_path
        assert_png(p)


def test_each_plot_function_directly(full, tmp_path):
    results, prompts, conditions, summary = full
    m = "Org/Model-A"
    p = figures.plot_before_after(results, prompts, m, path=tmp_path / "ba.png", n_boot=300, seed=1, conditions=conditions)
    assert p == tmp_path / "ba.png"
    assert_png(p)
    assert_png(figures.plot_null_distribution(summary, m, "delta_correct", tmp_path / "null.png"))
    assert_png(figures.plot_head_heatmap(summary, conditions, m, N_LAYERS, N_HEADS, "delta_correct", tmp_path / "hm.png"))
    assert_png(figures.plot_layer_bars(summary, m, N_LAYERS, "delta_incorrect", tmp_path / "lb.png"))
    assert_png(figures.plot_p_yes_hist(results, prompts, m, path=tmp_path / "hist.png"))
    # nested output folders are created
    assert_png(figures.plot_null_distribution(summary, m, "delta_auroc", tmp_path / "a" / "b" / "null.png"))


def test_heatmap_infers_grid_without_sizes(full, tmp_path):
    results, prompts, conditions, summary = full
    # no n_layers / n_heads: inferred from the layer and head columns of the sweep's conditions
    p = figures.plot_head_heatmap(summary, conditions, "tiny", path=tmp_path / "hm.png")
    assert_png(p)


def test_missing_sweeps_are_skipped(tmp_path):
    results, prompts, conditions, summary = build(layer_sweep=False, head_sweep=False, models=("m",))
    assert figures.plot_head_heatmap(summary, conditions, "m", N_LAYERS, N_HEADS, path=tmp_path / "hm.png") is None
    assert figures.plot_layer_bars(summary, "m", N_LAYERS, path=tmp_path / "lb.png") is None
    assert not (tmp_path / "hm.png").exists() and not (tmp_path / "lb.png").exists()
    paths = figures.make_figures(results, prompts, conditions, summary, tmp_path / "out", n_boot=100)
    names = {p.name for p in paths}
    assert "m__before_after.png" in names and "m__null__delta_correct.png" in names
    assert not any("heatmap" in n or "layer_bars" in n for n in names)
    for p in paths:
        assert_png(p)


def test_no_random_controls_no_null_figure(tmp_path):
    results, prompts, conditions, summary = build(n_random=0, layer_sweep=False, head_sweep=False, models=("m",))
    with pytest.raises(ValueError, match="random"):
        figures.plot_null_distribution(summary, "m", "delta_correct", tmp_path / "null.png")
    names = {p.name for p in figures.make_figures(results, prompts, conditions, None, tmp_path, n_boot=100)}
    assert names == {"m__before_after.png", "m__p_yes_hist.png"}


def test_no_target_no_study_figure(tmp_path):
    results, prompts, conditions, summary = build(target=False, layer_sweep=True, head_sweep=False, models=("m",))
    names = {p.name for p in figures.make_figures(results, prompts, conditions, summary, tmp_path, n_boot=100)}
    assert not any("before_after" in n or "null" in n for n in names)
    assert "m__layer_bars__delta_correct.png" in names
    assert "m__p_yes_hist.png" in names  # baseline alone still gets its histogram
    with pytest.raises(ValueError, match="target"):
        figures.plot_before_after(results, prompts, "m", path=tmp_path / "ba.png")


def test_only_correct_attempts_still_plots(tmp_path):
    results, prompts, conditions, _ = build(layer_sweep=False, head_sweep=False, models=("m",))
    prompts = prompts.with_columns(pl.lit(True).alias("label"), pl.lit("none").alias("error_kind"))
    summary = stats.summarize(results, prompts, conditions)
    paths = figures.make_figures(results, prompts, conditions, summary, tmp_path, n_boot=100)
    names = {p.name for p in paths}
    assert "m__before_after.png" in names
    assert "m__null__delta_auroc.png" not in names  # AUROC undefined with one class: skipped, not drawn as NaN
    for p in paths:
        assert_png(p)


def test_path_is_required(full):
    results, prompts, conditions, summary = full
    with pytest.raises(ValueError, match="path"):
        figures.plot_before_after(results, prompts, "tiny", n_boot=50)
