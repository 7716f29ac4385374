"""Native W&B charts of a sweep or discovery: frames shaped for W&B's built-in chart presets.

A chart is a polars frame, the built-in `wandb.plot` preset that draws it (histogram, bar, scatter,
line; effect-vs-k uses the built-in line-series preset through `wandb.plot_table`, with our own
table), which columns the preset's fields read, and a title. Built-in presets need nothing saved on
the W&B server, so the panels appear in the default workspace after `wandb sync`; a custom Vega spec
would need a preset saved there first. Where a built-in cannot draw what a chart means (the layer x
head map has no colour channel in the scatter preset), the table carries the numbers as columns,
which a saved panel or the table view can use. `tracking.log_charts` logs them: W&B stores each
chart's table under "<key>_table" and its panel under `_wandb.visualize.<key>` in the run config.

Limits: a chart's table holds at most `CHART_ROWS` rows (W&B's custom-chart limit per key, and
`wandb.Table.MAX_ROWS`). Charts are built from per-condition aggregates wherever the chart needs no
more (effects, nulls, maps); the per-prompt Yes/No histograms are the only per-row charts. A chart
that would exceed the limit logs a seeded random sample of its rows, always keeping the target's, and
its title says "sample of N of M". Nothing is cut silently.

Builders are pure (frames in, `Chart`s out); only `Chart.to_wandb` imports wandb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import polars as pl

from verif.analysis.effects import EFFECT_METRICS

CHART_ROWS = 10_000  # W&B: 10,000 points per custom-chart key (= wandb.Table.MAX_ROWS)
SAMPLE_SEED = 0
# Columns of conditions.parquet that split a sweep into groups read side by side, each with its own
# effect, null and map charts (an intervention kind's target is judged against its own random sets).
# A new such column is added here; every other column of the conditions rides along in the tables.
GROUP_COLUMNS = ("intervention",)
# Built-in presets: name -> (W&B preset id, the preset's fields).
PRESETS = {
    "histogram": ("wandb/histogram/v0", ("value",)),
    "bar": ("wandb/bar/v0", ("label", "value")),
    "scatter": ("wandb/scatter/v0", ("x", "y")),
    "line": ("wandb/line/v0", ("x", "y")),
    "lineseries": ("wandb/lineseries/v0", ("step", "lineKey", "lineVal")),
}
LABELS = {True: "correct", False: "incorrect"}


@dataclass(frozen=True)
class Chart:
    """One native chart: its history key, preset, frame, the columns its fields read, and its title."""

    key: str
    preset: str
    frame: pl.DataFrame
    fields: dict[str, str]
    title: str
    strings: dict[str, str] = field(default_factory=dict)  # the preset's other string settings (xname)

    def __post_init__(self):
        spec, names = PRESETS[self.preset]
        if set(self.fields) != set(names):
            raise ValueError(f"chart {self.key}: preset {self.preset} has fields {names}, got {sorted(self.fields)}")
        missing = [c for c in self.fields.values() if c not in self.frame.columns]
        if missing:
            raise ValueError(f"chart {self.key}: columns {missing} not in its frame {self.frame.columns}")

    def to_wandb(self):
        """The `wandb.plot` object whose logging writes the table and the panel config."""
        import wandb

        table = to_wandb_table(self.frame)
        f = self.fields
        if self.preset == "histogram":
            return wandb.plot.histogram(table, f["value"], title=self.title)
        if self.preset == "bar":
            return wandb.plot.bar(table, f["label"], f["value"], title=self.title)
        if self.preset == "scatter":
            return wandb.plot.scatter(table, f["x"], f["y"], title=self.title)
        if self.preset == "line":
            return wandb.plot.line(table, f["x"], f["y"], title=self.title)
        return wandb.plot_table(PRESETS["lineseries"][0], table, dict(f), {"title": self.title, **self.strings})


def to_wandb_table(df: pl.DataFrame):
    """A polars frame as a wandb.Table: nested columns (lists, structs) become strings, None stays None."""
    import wandb

    nested = {c for c, t in df.schema.items() if t.is_nested()}
    columns = [
        [None if v is None else str(v) for v in df[c].to_list()] if c in nested else df[c].to_list()
        for c in df.columns
    ]
    return wandb.Table(columns=df.columns, data=[list(r) for r in zip(*columns)] if columns else [])


def limited(frame: pl.DataFrame, what: str, keep: pl.Expr | None = None, limit: int = CHART_ROWS
            ) -> tuple[pl.DataFrame, str]:
    """`frame` if it fits, else the rows `keep` selects plus a seeded random sample of the rest, in the
    original order, and the note a title carries then (" (sample of N of M <what>)"; "" when whole)."""
    if frame.height <= limit:
        return frame, ""
    indexed = frame.with_row_index("_row")
    kept = indexed.filter(keep) if keep is not None else indexed.clear()
    rest = indexed.join(kept.select("_row"), on="_row", how="anti")
    room = max(limit - kept.height, 0)
    sample = pl.concat([kept.head(limit), rest.sample(n=min(room, rest.height), seed=SAMPLE_SEED)])
    return sample.sort("_row").drop("_row"), f" (sample of {sample.height} of {frame.height} {what})"


def _chart(key: str, preset: str, frame: pl.DataFrame, fields: dict[str, str], title: str, what: str,
           keep: pl.Expr | None = None, **strings: str) -> Chart:
    frame, note = limited(frame, what, keep)
    return Chart(key, preset, frame, fields, title + note, strings)


def histogram(key: str, frame: pl.DataFrame, value: str, title: str, what: str = "rows") -> Chart:
    return _chart(key, "histogram", frame, {"value": value}, title, what)


def bar(key: str, frame: pl.DataFrame, label: str, value: str, title: str, what: str = "rows",
        keep: pl.Expr | None = None) -> Chart:
    return _chart(key, "bar", frame, {"label": label, "value": value}, title, what, keep)


def scatter(key: str, frame: pl.DataFrame, x: str, y: str, title: str, what: str = "points",
            keep: pl.Expr | None = None) -> Chart:
    return _chart(key, "scatter", frame, {"x": x, "y": y}, title, what, keep)


def line(key: str, frame: pl.DataFrame, x: str, y: str, title: str, what: str = "points") -> Chart:
    return _chart(key, "line", frame, {"x": x, "y": y}, title, what)


def lines(key: str, frame: pl.DataFrame, step: str, series: str, value: str, title: str, xname: str) -> Chart:
    """Several named lines over one x (long frame: one row per point, `series` naming its line)."""
    return _chart(key, "lineseries", frame, {"step": step, "lineKey": series, "lineVal": value}, title, "points",
                  xname=xname)


# --------------------------------------------------------------------------------------------
# a sweep's charts
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = "+.4f") -> str:
    return "n/a" if v is None else format(v, spec)


def groups(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """(key suffix "/<value>", rows) per value of the GROUP_COLUMNS present, or one group ("", all rows)
    when none varies: a sweep of one intervention kind keeps the keys of a sweep without the column."""
    # The baseline intervenes on nothing ("none"): it is no group of its own and splits nothing.
    varying = frame.filter(pl.col("kind") != "baseline") if "kind" in frame.columns else frame
    cols = [c for c in GROUP_COLUMNS if c in frame.columns and varying[c].n_unique() > 1]
    if not cols:
        return [("", frame)]
    return [("/" + "/".join(str(v) for v in values), part)
            for values, part in varying.group_by(cols, maintain_order=True)]


def tvc_row(tvc: pl.DataFrame | None, model: str, metric: str, target: str) -> dict | None:
    if tvc is None:
        return None
    rows = tvc.filter((pl.col("model") == model) & (pl.col("metric") == metric)
                      & (pl.col("target_condition") == target))
    return rows.row(0, named=True) if rows.height else None


def yes_no_charts(results: pl.DataFrame, prompts: pl.DataFrame, conditions: pl.DataFrame) -> list[Chart]:
    """The study's before/after picture: p_yes_norm of the baseline and of each target, per label."""
    kinds = conditions.select("condition", "kind")
    df = (results.join(kinds, on="condition", how="left").join(prompts.select("prompt_id", "label"), on="prompt_id")
          .filter(pl.col("kind").is_in(["baseline", "target"]) & pl.col("p_yes_norm").is_finite()))
    charts = []
    for (model, cond, label), part in df.sort("model", "condition", "prompt_id").group_by(
            ["model", "condition", "label"], maintain_order=True):
        name = LABELS[label]
        charts.append(histogram(
            f"charts/{model}/p_yes_norm/{cond}/{name}", part.select("prompt_id", "p_yes_norm"), "p_yes_norm",
            f"{model}: P(Yes) / (P(Yes) + P(No)) under {cond}, {name} attempts ({part.height} prompts)", "prompts"))
    return charts


def _effect_columns(metric: str) -> list[str]:
    return [metric, f"{metric}_lo", f"{metric}_hi"]


def _versus(rows: pl.DataFrame, n_random: int, tvc: pl.DataFrame | None, model: str, metric: str) -> str:
    """'target +0.0123 [-0.0100, +0.0300] against 19 random sets: p_empirical 0.05' for each target."""
    parts = []
    for t in rows.filter(pl.col("kind") == "target").iter_rows(named=True):
        stats = tvc_row(tvc, model, metric, t["condition"])
        p = f": p_empirical {_fmt(stats['p_empirical'], '.3g')}" if stats else ""
        parts.append(f"{t['condition']} {_fmt(t[metric])} [{_fmt(t[metric + '_lo'])}, {_fmt(t[metric + '_hi'])}] "
                     f"against {n_random} random sets{p}")
    return "; ".join(parts) or f"no target, {n_random} random sets"


def effect_charts(effects: pl.DataFrame, tvc: pl.DataFrame | None) -> list[Chart]:
    """Per model and group: each metric over the target and random sets (bar, sorted, with the interval
    as columns), the random sets' null (histogram, the target's value and p in the title), the layer
    sweep (line over layers) and the single-head map (layer x head scatter, and the effect by position)."""
    charts = []
    meta = [c for c in ("kind", *GROUP_COLUMNS, "n_heads", "n_neurons", "layer", "head") if c in effects.columns]
    for model in effects["model"].unique(maintain_order=True).to_list():
        for suffix, rows in groups(effects.filter(pl.col("model") == model)):
            sets = rows.filter(pl.col("kind").is_in(["target", "random"]))
            n_random = sets.filter(pl.col("kind") == "random").height
            layers = rows.filter(pl.col("kind") == "layer").sort("layer")
            heads = rows.filter(pl.col("kind") == "single_head").sort("layer", "head")
            where = f"charts/{model}{suffix}"
            for metric in EFFECT_METRICS:
                cols = ["condition", *meta, *_effect_columns(metric)]
                head = f"{model}{suffix}: {metric}"
                versus = _versus(rows, n_random, tvc, model, metric)
                if n_random:
                    charts.append(histogram(
                        f"{where}/null/{metric}", sets.filter(pl.col("kind") == "random").select(cols), metric,
                        f"{head} of the random sets (the null); {versus}", "random sets"))
                    charts.append(bar(
                        f"{where}/effects/{metric}", sets.select(cols).sort(metric, nulls_last=True), "condition",
                        metric, f"{head}, {versus} (95% CI as columns)", "sets", keep=pl.col("kind") == "target"))
                if layers.height:
                    charts.append(line(f"{where}/layers/{metric}", layers.select(cols), "layer", metric,
                                       f"{head} of ablating each whole layer (95% CI as columns)", "layers"))
                if heads.height:
                    n_heads = int(heads["head"].max()) + 1
                    by_position = heads.select(cols).with_columns(
                        (pl.col("layer") + pl.col("head") / n_heads).alias("position"))
                    charts.append(scatter(
                        f"{where}/heads/{metric}", by_position, "position", metric,
                        f"{head} of ablating each head alone, at layer + head / {n_heads} (95% CI as columns)", "heads"))
            if heads.height:
                charts.append(scatter(
                    f"{where}/heads/map", heads.select("condition", *meta, *EFFECT_METRICS), "head", "layer",
                    f"{model}{suffix}: layer x head map of the single-head effects (the effects are columns: colour "
                    "by one in a saved panel, or sort the table view)", "heads"))
    return charts


def _target_heads(effects: pl.DataFrame, model: str) -> pl.DataFrame:
    """(layer, head) of every head in the model's target sets."""
    from verif.design.heads import parse_heads

    rows = effects.filter((pl.col("model") == model) & (pl.col("kind") == "target"))
    found = {h for text in (rows["heads"].drop_nulls().to_list() if "heads" in rows.columns else [])
             for h in parse_heads(text)}
    return pl.DataFrame(sorted(found), schema={"layer": pl.Int64, "head": pl.Int64}, orient="row")


def cross_model_frame(effects: pl.DataFrame, a: str, b: str, metric: str) -> pl.DataFrame:
    """One row per head both models' single-head sweeps scored: its layer, head, the effect in a and b
    (and their intervals), and whether the head is in a's target set."""
    keys = ["condition", *[c for c in ("layer", "head", *GROUP_COLUMNS) if c in effects.columns]]

    def side(model: str, tag: str) -> pl.DataFrame:
        rows = effects.filter((pl.col("model") == model) & (pl.col("kind") == "single_head"))
        return rows.select(*keys, *[pl.col(c).alias(c.replace(metric, f"effect_{tag}")) for c in _effect_columns(metric)])

    target = _target_heads(effects, a).with_columns(pl.lit(True).alias("in_target"))
    return (side(a, "a").join(side(b, "b"), on=keys, how="inner")
            .join(target, on=["layer", "head"], how="left")
            .with_columns(pl.col("in_target").fill_null(False)).sort("layer", "head"))


def cross_model_charts(effects: pl.DataFrame) -> list[Chart]:
    """Where a sweep ran single-head conditions on several models: effect in a against effect in b, one
    point per head, for each pair of models (in model.path order) and metric."""
    models = effects.filter(pl.col("kind") == "single_head")["model"].unique(maintain_order=True).to_list()
    charts = []
    for a, b in combinations(models, 2):
        for metric in EFFECT_METRICS:
            frame = cross_model_frame(effects, a, b, metric)
            for suffix, part in groups(frame):
                charts.append(scatter(
                    f"charts/cross_model/{a}__{b}{suffix}/{metric}", part, "effect_a", "effect_b",
                    f"{metric} of each head ablated alone{suffix}: {a} (x) against {b} (y), {part.height} heads "
                    "(in_target marks the target's)", "heads", keep=pl.col("in_target")))
    return charts


def sweep_charts(tables: dict[str, pl.DataFrame | None]) -> list[Chart]:
    """Every native chart of a finished sweep, from `jobs.finalize.compute_tables`' frames."""
    effects = tables["condition_effects"]
    return (yes_no_charts(tables["results"], tables["prompts"], tables["conditions"])
            + effect_charts(effects, tables.get("target_vs_controls"))
            + cross_model_charts(effects))


# --------------------------------------------------------------------------------------------
# a discovery's charts
# --------------------------------------------------------------------------------------------


def discovery_charts(heads: pl.DataFrame, sets: pl.DataFrame) -> list[Chart]:
    """Per model: atp against the exact effect of each screened head (scatter), and each ranking's
    top-k effect against k with the random sets' null band, mean +- 2 sd (line series)."""
    charts = []
    for model in heads["model"].unique(maintain_order=True).to_list():
        screened = heads.filter((pl.col("model") == model) & pl.col("exact").is_not_null()).drop("model")
        if screened.height:
            charts.append(scatter(
                f"charts/{model}/atp_vs_exact", screened, "atp", "exact",
                f"{model}: attribution patching (atp, x) against the exact effect of ablating each head (y), "
                f"{screened.height} heads scored exactly (nats)", "heads"))
        for kind in sets.filter(pl.col("model") == model)["kind"].unique(maintain_order=True).to_list():
            rows = sets.filter((pl.col("model") == model) & (pl.col("kind") == kind)).sort("k")
            top = rows.select("k", ("top k by " + pl.col("ranking")).alias("series"), pl.col("delta").alias("value"))
            null = rows.group_by("k", maintain_order=True).agg(pl.col("null_mean").first(), pl.col("null_std").first())
            null = null.drop_nulls()
            band = [null.select("k", pl.lit(name).alias("series"), expr.alias("value")) for name, expr in (
                ("random sets: mean", pl.col("null_mean")),
                ("random sets: mean - 2 sd", pl.col("null_mean") - 2 * pl.col("null_std")),
                ("random sets: mean + 2 sd", pl.col("null_mean") + 2 * pl.col("null_std")))]
            charts.append(lines(
                f"charts/{model}/effect_vs_k/{kind}", pl.concat([top, *band]), "k", "series", "value",
                f"{model}: effect of ablating each ranking's top k {kind}s together (delta mean log-odds, nats) "
                "against random sets of the same size (mean +- 2 sd)", f"k ({kind}s ablated together)"))
    return charts
