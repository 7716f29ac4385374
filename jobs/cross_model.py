"""After a sweep of two or more models: the cross-model tables and figures (is it the same mechanism?).

`verif.analysis.cross_model` computes them from the sweep's frames; this writes OUT/cross_model.parquet,
OUT/cross_model_maps.parquet (when both models of a pair ran a single-head or layer sweep) and
OUT/figures/cross/, and says in a few lines what they hold. With `ablation.kind: cross` it also writes
CMAP's tables (`verif.analysis.cmap`): OUT/stats/cmap.parquet (gap_closed per source, receiver and
condition) and OUT/stats/cmap_vs_controls.parquet (the target's gap_closed against the random sets').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from jobs.config import Config
from jobs.runtime.storage import OutDir, write_parquet_atomic, writing
from verif.analysis.cmap import MIN_GAP, cmap_frame, cmap_table, cmap_vs_controls
from verif.analysis.cross_figures import make_cross_figures
from verif.analysis.cross_model import cross_model_table, effect_maps_table, pair_name

HEADLINE_METRIC = "delta_log_odds"


@dataclass
class CrossModel:
    """The cross-model tables of a sweep, and their figures."""

    table: pl.DataFrame
    maps: pl.DataFrame
    figures: list[Path]
    cmap: pl.DataFrame | None = None  # stats/cmap.parquet, with ablation.kind cross
    cmap_vs: pl.DataFrame | None = None  # stats/cmap_vs_controls.parquet (a target and random sets)

    def lines(self, out: OutDir) -> list[str]:
        """Where the tables are, per pair the target's difference and the per-head correlation, and per
        (source, receiver) the target's gap_closed against the random sets'."""
        lines = [f"cross:    {out.cross_model}" + (f", {out.cross_model_maps}" if self.maps.height else "")
                 + f", {out.cross_figures}/ ({len(self.figures)} PNG)"]
        for pair in self.table["pair"].unique(maintain_order=True).to_list():
            rows = self.table.filter((pl.col("pair") == pair) & (pl.col("metric") == HEADLINE_METRIC))
            target = rows.filter(pl.col("kind") == "target")
            text = f"  {pair}:"
            if target.height:
                t = target.row(0, named=True)
                p = t["diff_p_empirical"]
                text += (f" target {HEADLINE_METRIC} {_number(t['effect_a'])} in a, {_number(t['effect_b'])} in b, "
                         f"diff {_number(t['diff'])} [{_number(t['diff_lo'])}, {_number(t['diff_hi'])}]"
                         + ("" if p is None else f", against random sets' diffs p {p:.3g}"))
            maps = self.maps.filter((pl.col("pair") == pair) & (pl.col("metric") == HEADLINE_METRIC))
            for m in maps.iter_rows(named=True):
                if m["spearman"] is not None:
                    text += (f"; {m['sweep']} maps Spearman {_number(m['spearman'])} [{_number(m['spearman_lo'])}, "
                             f"{_number(m['spearman_hi'])}], top-{m['k']} share {m['overlap']} (p {m['p_overlap']:.2g})")
            lines.append(text)
        if self.cmap is not None:
            lines.append(f"cmap:     {out.stats / 'cmap.parquet'}"
                         + (f", {out.stats / 'cmap_vs_controls.parquet'}" if self.cmap_vs is not None else ""))
            lines += cmap_lines(self.cmap, self.cmap_vs)
        return lines


def cmap_lines(cmap: pl.DataFrame, vs: pl.DataFrame | None) -> list[str]:
    """Per (source, receiver): the target's gap_closed with its CI, the prompts it averages and those left
    out, and the random sets' against it."""
    lines = []
    for (source, model), part in cmap.group_by(["source", "model"], maintain_order=True):
        target = part.filter(pl.col("kind") == "target")
        if target.height == 0:
            continue
        t = target.row(0, named=True)
        text = (f"  {pair_name(source, model)}: CMAP of the target from {source} into {model}: gap_closed "
                f"{_number(t['gap_closed'])} [{_number(t['gap_closed_lo'])}, {_number(t['gap_closed_hi'])}] over "
                f"{t['n_prompts']} prompts ({t['n_left_out']} left out: |LD_{source} - LD_{model}| < {MIN_GAP} nats)")
        row = None if vs is None else vs.filter((pl.col("source") == source) & (pl.col("model") == model))
        if row is not None and row.height:
            r = row.row(0, named=True)
            p = "n/a" if r["p_greater"] is None else f"{r['p_greater']:.3g}"
            text += (f"; random sets {_number(r['control_mean'])} +- {_number(r['control_std'])} (n {r['n_controls']}),"
                     f" p_greater {p}")
        lines.append(text)
    return lines


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def cross_model_outputs(cfg: Config, out: OutDir, tables: dict[str, pl.DataFrame],
                        models: Sequence[str], source: str | None = None) -> CrossModel | None:
    """The cross-model tables and figures of a finished sweep of `models` (model.path order), with CMAP's
    when `source` (the cross source's name) is given; None with fewer than two models."""
    if len(models) < 2:
        return None
    results, prompts, conditions = tables["results"], tables["prompts"], tables["conditions"]
    st = cfg.stats
    table = cross_model_table(results, prompts, conditions, models, n_boot=st.n_boot, seed=st.seed)
    maps = effect_maps_table(results, prompts, conditions, models, n_boot=st.n_boot, seed=st.seed)
    write_parquet_atomic(table, out.cross_model)
    if maps.height:
        write_parquet_atomic(maps, out.cross_model_maps)
    cmap, cmap_vs = cmap_outputs(cfg, out, results, conditions, source)
    with writing(out.cross_figures):
        figures = make_cross_figures(table, maps, conditions, out.cross_figures, cmap, cmap_vs)
    return CrossModel(table, maps, figures, cmap, cmap_vs)


def cmap_outputs(cfg: Config, out: OutDir, results: pl.DataFrame, conditions: pl.DataFrame, source: str | None
                 ) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """With cross conditions (`source`: the source model's name): stats/cmap.parquet and, with a target and random
    sets, stats/cmap_vs_controls.parquet."""
    if source is None:
        return None, None
    st = cfg.stats
    table = cmap_table(cmap_frame(results, conditions, source), n_boot=st.n_boot, seed=st.seed)
    write_parquet_atomic(table, out.stats / "cmap.parquet")
    kinds = set(table.filter(pl.col("gap_closed").is_not_null())["kind"].to_list())
    if not {"target", "random"} <= kinds:
        return table, None
    vs = cmap_vs_controls(table)
    write_parquet_atomic(vs, out.stats / "cmap_vs_controls.parquet")
    return table, vs

