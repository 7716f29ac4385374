"""After a sweep of two or more models: the cross-model tables and figures (is it the same mechanism?).

`verif.analysis.cross_model` computes them from the sweep's frames; this writes OUT/cross_model.parquet,
OUT/cross_model_maps.parquet (when both models of a pair ran a single-head or layer sweep) and
OUT/figures/cross/, and says in a few lines what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from jobs.config import Config
from jobs.runtime.storage import OutDir, write_parquet_atomic, writing
from verif.analysis.cross_figures import make_cross_figures
from verif.analysis.cross_model import cross_model_table, effect_maps_table

HEADLINE_METRIC = "delta_log_odds"


@dataclass
class CrossModel:
    """The cross-model tables of a sweep, and their figures."""

    table: pl.DataFrame
    maps: pl.DataFrame
    figures: list[Path]

    def lines(self, out: OutDir) -> list[str]:
        """Where the tables are, and per pair the target's difference and the per-head correlation."""
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
        return lines


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def cross_model_outputs(cfg: Config, out: OutDir, tables: dict[str, pl.DataFrame],
                        models: Sequence[str]) -> CrossModel | None:
    """The cross-model tables and figures of a finished sweep of `models` (model.path order); None
    with fewer than two models."""
    if len(models) < 2:
        return None
    results, prompts, conditions = tables["results"], tables["prompts"], tables["conditions"]
    st = cfg.stats
    table = cross_model_table(results, prompts, conditions, models, n_boot=st.n_boot, seed=st.seed)
    maps = effect_maps_table(results, prompts, conditions, models, n_boot=st.n_boot, seed=st.seed)
    write_parquet_atomic(table, out.cross_model)
    if maps.height:
        write_parquet_atomic(maps, out.cross_model_maps)
    with writing(out.cross_figures):
        figures = make_cross_figures(table, maps, conditions, out.cross_figures)
    return CrossModel(table, maps, figures)

