"""W&B tracking (jobs/tracking.py, jobs/charts.py, jobs/lineage.py, jobs/wandb_run.py): every check reads the
offline run's files back, without a server.

The `.wandb` record log is parsed with `tests.support.wandb_records.read_run` (LevelDB-style log of
`wandb_internal_pb2.Record`, checksums verified) and tables from `files/media/table/**.table.json`,
then compared with the frames that were logged, so a key, value, chart, panel or file that goes missing
fails here. Each module fixture logs one run and several tests read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

import launch
from jobs import charts, lineage, tracking
from jobs.config import Config, load_config, reference_markdown
from jobs.wandb_run import Session
from tests.support.sweeps import sweep_overrides
from tests.support.wandb_records import chart, read_run
from verif.analysis.effects import EFFECT_METRICS, condition_effects
from verif.analysis.tables import per_prompt_table
from jobs.runtime.storage import OutDir, write_json_atomic
from verif.analysis import stats

MODELS = ("m1", "org/m2")  # a hub-style name with a slash must survive as one key segment
N_RANDOM = 38  # enough conditions that the summary record spans several 32 KiB log blocks
N_PROMPTS = 8
SWEEP_LAYERS = (0, 1, 2)  # a layer sweep over 3 layers and a single-head sweep of 3 layers x 2 heads
SWEEP_HEADS = [(layer, head) for layer in SWEEP_LAYERS for head in (0, 1)]
BUILT_IN = {"wandb/histogram/v0", "wandb/bar/v0", "wandb/scatter/v0", "wandb/line/v0", "wandb/lineseries/v0"}
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR",
              "WANDB_SILENT")


def _conditions() -> pl.DataFrame:
    """baseline, a target of two heads, random sets, a layer sweep and a single-head sweep."""
    names = (["baseline", "target"] + [f"random_{i:03d}" for i in range(N_RANDOM)]
             + [f"layer-{layer:02d}" for layer in SWEEP_LAYERS] + [f"head-L{a:02d}H{b:02d}" for a, b in SWEEP_HEADS])
    kinds = ["baseline", "target"] + ["random"] * N_RANDOM + ["layer"] * len(SWEEP_LAYERS) + ["single_head"] * len(SWEEP_HEADS)
    heads = (["", "L1 H1, L2 H0"] + ["L2 H2, L0 H1"] * N_RANDOM + [f"L{a} H0, L{a} H1" for a in SWEEP_LAYERS]
             + [f"L{a} H{b}" for a, b in SWEEP_HEADS])
    layer = [None] * (N_RANDOM + 2) + list(SWEEP_LAYERS) + [a for a, _ in SWEEP_HEADS]
    head = [None] * (N_RANDOM + 2 + len(SWEEP_LAYERS)) + [b for _, b in SWEEP_HEADS]
    return pl.DataFrame(
        {"condition": names, "kind": kinds, "heads": heads, "n_heads": [0] + [2] * (N_RANDOM + 1 + len(SWEEP_LAYERS))
         + [1] * len(SWEEP_HEADS), "layer": layer, "head": head},
        schema_overrides={"layer": pl.Int64, "head": pl.Int64},
    )


def _prompts() -> pl.DataFrame:
    return pl.DataFrame(
        {"prompt_id": list(range(N_PROMPTS)), "numbers": [[79, 17, 60], [3, 5, 7]] * (N_PROMPTS // 2),
         "target": [36, 22] * (N_PROMPTS // 2), "attempt": ["a"] * N_PROMPTS,
         "label": [True, False] * (N_PROMPTS // 2), "error_kind": [None, "wrong_target"] * (N_PROMPTS // 2),
         "prompt": [f"prompt {i}" for i in range(N_PROMPTS)]},
        schema_overrides={"numbers": pl.List(pl.Int64), "error_kind": pl.Utf8},
    )


def _results(conditions: pl.DataFrame) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model in MODELS:
        for cond in conditions["condition"]:
            for i in range(N_PROMPTS):
                p = float(rng.uniform(0.02, 0.98))
                rows.append((model, i, cond, 0.9 * p, 0.9 * (1 - p), p, math.log(p / (1 - p))))
    return pl.DataFrame(rows, schema=["model", "prompt_id", "condition", "p_yes", "p_no", "p_yes_norm", "log_odds"],
                        orient="row")


def _weight_diff() -> tuple[pl.DataFrame, pl.DataFrame]:
    n = 6000
    table = pl.DataFrame({"layer": np.arange(n) % 36, "component": ["mlp.down_proj"] * n, "index": np.arange(n),
                          "one_minus_cos": np.linspace(0, 1e-6, n)[np.random.default_rng(1).permutation(n)]})
    selection = pl.DataFrame({"selection": ["target_heads", "top_50_value_vectors"], "n_rows": [10, 50],
                              "max_one_minus_cos": [1e-7, 1e-6], "verdict": ["fine", "also fine"]})
    return table, selection


def _write_out(root: Path, mode: str = "offline") -> tuple[Config, OutDir, dict[str, pl.DataFrame], list[Path]]:
    """A finished-looking sweep folder (the files the driver writes) and the frames finalize would pass."""
    cfg = load_config(None, overrides=["name=syn", f"wandb.mode={mode}"], out=str(root))
    out = OutDir(root)
    conditions, prompts = _conditions(), _prompts()
    results = _results(conditions)
    summary = stats.summarize(results, prompts, conditions)
    tables = {
        "results": results, "prompts": prompts, "conditions": conditions, "summary": summary,
        "by_error_kind": stats.by_error_kind(results, prompts),
        "per_prompt": per_prompt_table(results, prompts),
        "paired_change": stats.paired_change(results, prompts, "target", n_boot=20),
        "target_vs_controls": stats.target_vs_controls(summary, list(stats.DEFAULT_CONTROL_METRICS)),
        "condition_effects": condition_effects(results, prompts, conditions, n_boot=20),
    }
    out.results.mkdir(parents=True)
    results.write_parquet(out.shard("m0-p000000-c000"))
    prompts.write_parquet(out.prompts)
    conditions.write_parquet(out.conditions)
    summary.write_parquet(out.summary)
    for name in ("by_error_kind", "paired_change", "target_vs_controls", "condition_effects"):
        (root / "stats").mkdir(exist_ok=True)
        tables[name].write_parquet(root / "stats" / f"{name}.parquet")
    out.figures.mkdir()
    figures = []
    for i, name in enumerate(("m1__before_after", "m1__null__delta_correct")):
        path = out.figures / f"{name}.png"
        Image.new("RGB", (8 + i, 8), (i * 100, 0, 0)).save(path)
        figures.append(path)
    write_json_atomic({"job": "sweep", "config": cfg.to_dict(), "shards": {}, "finished": "2026-11-27T06:00:00+0000"},
                      out.manifest)
    return cfg, out, tables, figures


def _env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in WANDB_VARS}


def _isolated_home(mp: pytest.MonkeyPatch, home: Path) -> None:
    """HOME at an empty folder, and no XDG overrides, so any home-folder write would show up there."""
    mp.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        mp.delenv(var, raising=False)


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _table_json(run_dir: Path, history: dict, key: str) -> dict:
    return json.loads((run_dir / "files" / history[key]["path"]).read_text())


def _frame_rows(df: pl.DataFrame) -> list[list]:
    """The frame as tracking must log it: nested values as their str(), None as None."""
    nested = {c for c, t in df.schema.items() if t.is_nested()}
    cols = [[None if v is None else str(v) for v in df[c].to_list()] if c in nested else df[c].to_list()
            for c in df.columns]
    return [list(r) for r in zip(*cols)]


def _assert_summary_logged(logged: dict, summary: pl.DataFrame) -> int:
    """Every numeric summary cell is in run.summary under its key, the same float64."""
    n = 0
    for row in summary.iter_rows(named=True):
        for col, dtype in summary.schema.items():
            if not dtype.is_numeric():
                continue
            key = tracking.summary_key(row["model"], row["condition"], col)
            assert key in logged, key
            want = row[col]
            if want is None or (isinstance(want, float) and not math.isfinite(want)):
                assert logged[key] is None, key
            else:
                assert logged[key] == want, key  # JSON text holds a float's repr, which reads back exactly
            n += 1
    return n


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """One offline sweep run (with a weight diff) logged while HOME is an empty folder."""
    root = tmp_path_factory.mktemp("track") / "OUT"
    home = tmp_path_factory.mktemp("home")
    cfg, out, tables, figures = _write_out(root)
    wd, selection = _weight_diff()
    tables["weight_diff_selection"] = selection
    bookkeeping = {"rows_written": 640, "shards_run": 2, "shards_skipped": 1, "startup_seconds": 1.5, "n_retried": 1}
    with pytest.MonkeyPatch.context() as mp:
        _isolated_home(mp, home)
        env_before = _env()
        run_dir = tracking.log_sweep(cfg, out, tables, figures, wd, bookkeeping)
        env_after = _env()
    assert run_dir is not None
    run_dir = Path(run_dir)
    return SimpleNamespace(cfg=cfg, out=out, tables=tables, figures=figures, wd=wd, selection=selection,
                           run_dir=run_dir, run=read_run(run_dir), home=home,
                           env_before=env_before, env_after=env_after)


def test_offline_run_lives_in_out_and_home_is_untouched(offline):
    assert offline.run_dir.parent == offline.out.wandb.resolve() / "wandb"
    assert offline.run_dir.name.startswith("offline-run-")
    assert sorted(offline.home.rglob("*")) == []  # nothing under ~/.config/wandb, ~/.cache/wandb, ~/.netrc ...
    assert offline.env_after == offline.env_before  # WANDB_* restored after the call


def test_record_log_spans_blocks(offline):
    """The summary record alone is larger than one 32 KiB block: the FIRST/MIDDLE/LAST path is exercised."""
    (log,) = offline.run_dir.glob("*.wandb")
    assert log.stat().st_size > 2 * 32768


def _reference_keys() -> list[str]:
    """Every key of the configuration reference (the README's table), read from its Markdown."""
    return [line.split("`")[1] for line in reference_markdown().splitlines() if line.startswith("| `")]


def _value(cfg: Config, key: str):
    value = cfg.to_dict()
    for part in key.split("."):
        value = value[part]
    return value


def test_config_is_every_resolved_key_flattened_group_job_type_tags(offline):
    run = offline.run
    assert run["group"] == "syn" and run["job_type"] == "sweep" and run["resume"]
    keys = _reference_keys()
    assert len(keys) > 70 and "model.path" in keys and "ray.resources_per_worker" in keys
    assert sorted(k for k in run["config"] if k != "_wandb") == sorted(keys)
    for key in keys:
        assert run["config"][key] == _value(offline.cfg, key), key
    assert run["tags"] == ["m1", "org/m2", "baseline", "target", "random", "layer", "single_head"]


def test_run_tags_fit_w_and_b_and_models_go_in_model_path_order(tmp_path):
    long = "/data/models/" + "x" * 80 + "/Qwen2.5-3B-Instruct"
    tags = tracking.run_tags([long, "a", None, ""], ["a", "b"])
    assert tags == ["..." + long[-61:], "a", "b"] and len(tags[0]) == tracking.TAG_CHARS
    (tmp_path / "base").mkdir()
    cfg = load_config(None, [f"model.path=[org/r1, packaged:smollm2-135m, {tmp_path / 'base'}]"], file_default=False)
    assert tracking.model_order(cfg, ["base", "other", "org/r1", "smollm2-135m"]) == [
        "org/r1", "smollm2-135m", "base", "other"]


def test_headline_keys(offline):
    """The stable keys a panel over many runs reads, equal to the frames they come from."""
    s, eff, tvc = offline.run["summary"], offline.tables["condition_effects"], offline.tables["target_vs_controls"]
    assert (s["headline/model"], s["headline_1/model"], s["headline/n_prompts"]) == ("m1", "org/m2", N_PROMPTS)
    for prefix, model in (("headline", "m1"), ("headline_1", "org/m2")):
        target = eff.filter((pl.col("model") == model) & (pl.col("condition") == "target")).row(0, named=True)
        base = offline.tables["summary"].filter((pl.col("model") == model) & (pl.col("condition") == "baseline"))
        assert s[f"{prefix}/baseline/auroc"] == base["auroc"][0]
        for metric in EFFECT_METRICS:
            for col in (metric, f"{metric}_lo", f"{metric}_hi"):
                assert s[f"{prefix}/target/{col}"] == target[col], col
            row = tvc.filter((pl.col("model") == model) & (pl.col("metric") == metric)).row(0, named=True)
            assert s[f"{prefix}/target/{metric}/p_empirical"] == row["p_empirical"]
            assert s[f"{prefix}/target/{metric}/n_controls"] == N_RANDOM


def test_summary_metrics_equal_summary_frame(offline):
    summary = offline.tables["summary"]
    n = _assert_summary_logged(offline.run["summary"], summary)
    assert n == summary.height * 18  # 18 numeric columns per (model, condition)
    assert offline.run["summary"]["org/m2/baseline/n_heads"] == 0


def test_target_vs_controls_keys(offline):
    tvc = offline.tables["target_vs_controls"]
    assert tvc.height == len(MODELS) * 3
    for row in tvc.iter_rows(named=True):
        for stat in ("p_empirical", "z", "target_effect", "control_mean", "control_std"):
            got = offline.run["summary"][tracking.tvc_key(row["model"], row["metric"], stat)]
            assert (got is None) if row[stat] is None else got == row[stat]  # exact through JSON, as above


def test_job_bookkeeping_and_weight_diff_metrics(offline):
    s = offline.run["summary"]
    assert (s["sweep/rows_written"], s["sweep/shards_run"], s["sweep/n_retried"]) == (640, 2, 1)
    assert (s["sweep/n_prompts"], s["sweep/n_conditions"]) == (N_PROMPTS, N_RANDOM + 2 + len(SWEEP_LAYERS) + len(SWEEP_HEADS))
    assert s["weight_diff/n_rows"] == 6000
    assert s["weight_diff/top_50_value_vectors/max_one_minus_cos"] == 1e-6
    assert s["weight_diff/target_heads/n_rows"] == 10


def test_tables_equal_frames(offline):
    (step,) = offline.run["history"]
    files = sorted((offline.run_dir / "files" / "media" / "table" / "tables").rglob("*.table.json"))
    assert len(files) == 8  # 6 sweep tables + weight-diff selection + top rows
    effects = _table_json(offline.run_dir, step, "tables/condition_effects")
    assert effects["data"] == _frame_rows(offline.tables["condition_effects"])
    summary = _table_json(offline.run_dir, step, "tables/summary")
    assert summary["columns"] == offline.tables["summary"].columns
    assert summary["data"] == _frame_rows(offline.tables["summary"])
    per_prompt = _table_json(offline.run_dir, step, "tables/per_prompt")
    frame = offline.tables["per_prompt"]
    assert {"prompt", "label", "error_kind", "p_yes_norm_baseline", "p_yes_norm_target"} <= set(per_prompt["columns"])
    assert per_prompt["data"] == _frame_rows(frame)
    numbers = per_prompt["data"][0][per_prompt["columns"].index("numbers")]
    assert numbers == "[79, 17, 60]"  # list column as a string
    assert None in [r[per_prompt["columns"].index("error_kind")] for r in per_prompt["data"]]  # None stays None


def test_weight_diff_tables(offline):
    (step,) = offline.run["history"]
    top = _table_json(offline.run_dir, step, "tables/weight_diff_top")
    col = top["columns"].index("one_minus_cos")
    values = [r[col] for r in top["data"]]
    assert len(values) == tracking.WEIGHT_DIFF_MAX_ROWS
    assert values == sorted(offline.wd["one_minus_cos"].to_list(), reverse=True)[: len(values)]
    selection = _table_json(offline.run_dir, step, "tables/weight_diff_selection")
    assert selection["data"] == _frame_rows(offline.selection)


def test_histograms_match_results(offline):
    (step,) = offline.run["history"]
    res = offline.tables["results"].join(offline.tables["prompts"].select("prompt_id", "label"), on="prompt_id")
    for model in MODELS:
        for label, name in ((True, "correct"), (False, "incorrect")):
            for group, cond in (("baseline", pl.col("condition") == "baseline"),
                                ("target", pl.col("condition") == "target"),
                                ("random_pooled", pl.col("condition").str.starts_with("random_"))):
                values = res.filter(cond & (pl.col("model") == model) & (pl.col("label") == label))["p_yes_norm"]
                hist = step[f"{model}/p_yes_norm/{group}/{name}"]
                assert hist["_type"] == "histogram"
                want, _ = np.histogram(values.to_numpy(), bins=tracking.HIST_BINS, range=(0, 1))
                assert hist["values"] == want.tolist()
    assert not any("/p_yes_norm/random_000/" in k for k in step)  # random sets are pooled, not one each


def test_figures_logged_as_images(offline):
    (step,) = offline.run["history"]
    images = sorted((offline.run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(offline.figures)
    for fig in offline.figures:
        entry = step[f"figures/{fig.stem}"]
        assert entry["_type"] == "image-file"
        assert (offline.run_dir / "files" / entry["path"]).is_file()


def test_results_artifact(offline):
    arts = [a for a in offline.run["artifacts"] if a["type"] == tracking.ARTIFACT_TYPE]
    assert [a["name"] for a in arts] == ["syn-results"]
    assert set(arts[0]["files"]) == {
        "summary.parquet", "prompts.parquet", "conditions.parquet", "results/m0-p000000-c000.parquet",
        "stats/by_error_kind.parquet", "stats/paired_change.parquet", "stats/target_vs_controls.parquet",
        "stats/condition_effects.parquet",
    }


def _expected_charts() -> dict[str, tuple[str, int]]:
    """Every native chart of the synthetic sweep: key -> (built-in preset, rows of its table)."""
    keys = {}
    n_label = N_PROMPTS // 2  # half the prompts are correct
    for m in MODELS:
        for cond in ("baseline", "target"):
            for label in ("correct", "incorrect"):
                keys[f"charts/{m}/p_yes_norm/{cond}/{label}"] = ("wandb/histogram/v0", n_label)
        for metric in EFFECT_METRICS:
            keys[f"charts/{m}/null/{metric}"] = ("wandb/histogram/v0", N_RANDOM)
            keys[f"charts/{m}/effects/{metric}"] = ("wandb/bar/v0", N_RANDOM + 1)
            keys[f"charts/{m}/layers/{metric}"] = ("wandb/line/v0", len(SWEEP_LAYERS))
            keys[f"charts/{m}/heads/{metric}"] = ("wandb/scatter/v0", len(SWEEP_HEADS))
        keys[f"charts/{m}/heads/map"] = ("wandb/scatter/v0", len(SWEEP_HEADS))
    for metric in EFFECT_METRICS:
        keys[f"charts/cross_model/m1__org/m2/{metric}"] = ("wandb/scatter/v0", len(SWEEP_HEADS))
    return keys


def _fields(panel: dict) -> dict[str, str]:
    """The preset fields a chart sets (wandb.plot.line leaves its optional `stroke` unset: None)."""
    return {k: v for k, v in panel["panel_config"]["fieldSettings"].items() if v is not None}


def _columns(table: dict, *names: str) -> list[tuple]:
    idx = [table["columns"].index(n) for n in names]
    return [tuple(row[i] for i in idx) for row in table["data"]]


def test_every_chart_has_its_table_and_built_in_panel(offline):
    """W&B's custom-chart records: the panel under _wandb.visualize.<key> (a built-in preset whose fields
    name columns of the table) and the table under <key>_table, with one row per point."""
    expected = _expected_charts()
    assert set(offline.run["config"]["_wandb"]["visualize"]) == set(expected)
    for key, (preset, rows) in expected.items():
        panel, table = chart(offline.run_dir, offline.run, key)
        config = panel["panel_config"]
        assert panel["panel_type"] == "Vega2" and config["panelDefId"] == preset in BUILT_IN, key
        assert set(_fields(panel).values()) <= set(table["columns"]), key
        assert config["stringSettings"]["title"] and "sample of" not in config["stringSettings"]["title"], key
        assert len(table["data"]) == rows, key


def test_yes_no_histograms_hold_each_prompt(offline):
    res = offline.tables["results"].join(offline.tables["prompts"].select("prompt_id", "label"), on="prompt_id")
    for model in MODELS:
        for cond in ("baseline", "target"):
            for label, name in ((True, "correct"), (False, "incorrect")):
                panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/p_yes_norm/{cond}/{name}")
                want = res.filter((pl.col("model") == model) & (pl.col("condition") == cond) & (pl.col("label") == label))
                assert _fields(panel) == {"value": "p_yes_norm"}
                assert sorted(_columns(table, "prompt_id", "p_yes_norm")) == sorted(
                    want.select("prompt_id", "p_yes_norm").rows())


def test_effects_and_null_charts_show_the_target_against_the_random_sets(offline):
    eff, tvc = offline.tables["condition_effects"], offline.tables["target_vs_controls"]
    for model in MODELS:
        mine = eff.filter(pl.col("model") == model)
        target = mine.filter(pl.col("kind") == "target").row(0, named=True)
        for metric in EFFECT_METRICS:
            p = tvc.filter((pl.col("model") == model) & (pl.col("metric") == metric))["p_empirical"][0]
            panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/effects/{metric}")
            assert _fields(panel) == {"label": "condition", "value": metric}
            rows = _columns(table, "condition", "kind", metric, f"{metric}_lo", f"{metric}_hi")
            want = mine.filter(pl.col("kind").is_in(["target", "random"])).select(
                "condition", "kind", metric, f"{metric}_lo", f"{metric}_hi")
            assert sorted(rows) == sorted(want.rows())
            assert [r[2] for r in rows] == sorted(r[2] for r in rows)  # sorted by the effect
            title = panel["panel_config"]["stringSettings"]["title"]
            assert f"target {target[metric]:+.4f} [{target[metric + '_lo']:+.4f}, {target[metric + '_hi']:+.4f}]" in title
            assert title.endswith(f"against {N_RANDOM} random sets: p_empirical {p:.3g} (95% CI as columns)")
            panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/null/{metric}")
            assert _fields(panel) == {"value": metric}
            assert sorted(_columns(table, metric)) == sorted(mine.filter(pl.col("kind") == "random").select(metric).rows())
            assert f"target {target[metric]:+.4f}" in panel["panel_config"]["stringSettings"]["title"]


def test_layer_line_head_map_and_cross_model_scatter(offline):
    eff = offline.tables["condition_effects"]
    for model in MODELS:
        panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/layers/delta_correct")
        assert _fields(panel) == {"x": "layer", "y": "delta_correct"}
        layers = eff.filter((pl.col("model") == model) & (pl.col("kind") == "layer")).sort("layer")
        assert _columns(table, "layer", "delta_correct") == layers.select("layer", "delta_correct").rows()
        panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/heads/map")
        assert _fields(panel) == {"x": "head", "y": "layer"}
        assert sorted(_columns(table, "layer", "head")) == SWEEP_HEADS and set(EFFECT_METRICS) <= set(table["columns"])
        panel, table = chart(offline.run_dir, offline.run, f"charts/{model}/heads/delta_auroc")
        assert sorted(_columns(table, "position")) == sorted((a + b / 2,) for a, b in SWEEP_HEADS)  # 2 heads a layer
    single = eff.filter(pl.col("kind") == "single_head")
    a, b = (single.filter(pl.col("model") == m).select("layer", "head", "delta_incorrect") for m in MODELS)
    want = a.join(b, on=["layer", "head"], suffix="_b").sort("layer", "head").rows()
    panel, table = chart(offline.run_dir, offline.run, "charts/cross_model/m1__org/m2/delta_incorrect")
    assert _fields(panel) == {"x": "effect_a", "y": "effect_b"}
    assert _columns(table, "layer", "head", "effect_a", "effect_b") == want
    in_target = {(layer, head) for layer, head, t in _columns(table, "layer", "head", "in_target") if t}
    assert in_target == {(1, 1), (2, 0)}  # the target is "L1 H1, L2 H0"


def test_intervention_kinds_get_their_own_charts_and_headline_keys(offline):
    """A conditions column in charts.GROUP_COLUMNS (intervention, from ablation.kind) splits the charts and
    headline keys by its value when it varies, and changes no key when it does not."""
    eff = offline.tables["condition_effects"].filter(pl.col("model") == "m1")
    both = pl.concat([eff.with_columns(pl.lit(kind).alias("intervention")) for kind in ("zero", "mean")])
    keys = {c.key for c in charts.effect_charts(both, None)}
    assert {"charts/m1/zero/effects/delta_correct", "charts/m1/mean/null/delta_auroc",
            "charts/m1/mean/heads/map"} <= keys and not any(k.startswith("charts/m1/effects/") for k in keys)
    one = eff.with_columns(pl.lit("zero").alias("intervention"))
    assert {c.key for c in charts.effect_charts(one, None)} == {c.key for c in charts.effect_charts(eff, None)}
    summary = offline.tables["summary"].filter(pl.col("model") == "m1")
    headline = tracking.headline_metrics(summary, both, None, N_PROMPTS, ["m1"])
    assert headline["headline/mean/target/delta_correct"] == eff.filter(pl.col("kind") == "target")["delta_correct"][0]
    assert "headline/target/delta_correct" not in headline


def test_a_chart_or_table_over_the_limit_logs_a_sample_and_says_so():
    import wandb

    assert charts.CHART_ROWS == tracking.TABLE_ROWS == wandb.Table.MAX_ROWS
    n = charts.CHART_ROWS + 5
    frame = pl.DataFrame({"condition": [f"c{i}" for i in range(n)], "kind": ["random"] * (n - 1) + ["target"],
                          "v": np.arange(n, dtype=float)})
    big = charts.bar("k", frame, "condition", "v", "T", "sets", keep=pl.col("kind") == "target")
    assert big.frame.height == charts.CHART_ROWS and big.title == f"T (sample of {charts.CHART_ROWS} of {n} sets)"
    assert "target" in big.frame["kind"].to_list()  # the target is always kept
    assert big.frame["v"].to_list() == sorted(big.frame["v"].to_list())  # in the frame's order
    again = charts.bar("k", frame, "condition", "v", "T", "sets", keep=pl.col("kind") == "target")
    assert again.frame.equals(big.frame)  # a seeded sample: the same rows every time
    assert charts.histogram("k", frame.head(10), "v", "T").title == "T"  # whole: nothing said
    session = Session(run=None, offline=True)
    items, cut = tracking.logged_tables(session, {"big": frame, "small": frame.head(3)})
    assert len(items["tables/big"].data) == tracking.TABLE_ROWS and len(items["tables/small"].data) == 3
    assert cut == {"tables/big/n_rows": n}
    assert session.notes == [f"W&B: tables/big holds the first {tracking.TABLE_ROWS} of its {n} rows (W&B's table "
                             "limit); every row is in the job's files and the run's artifact"]


def test_to_wandb_table_keeps_none_and_stringifies_lists():
    df = pl.DataFrame({"numbers": [[1, 2], None], "x": [1.5, None], "s": ["a", None]})
    table = tracking.to_wandb_table(df)
    assert table.columns == ["numbers", "x", "s"]
    assert table.data == [["[1, 2]", 1.5, "a"], [None, None, None]]


def test_disabled_writes_nothing(tmp_path, capsys):
    cfg, out, tables, figures = _write_out(tmp_path / "OUT", mode="disabled")
    before = _files(tmp_path)
    assert tracking.log_sweep(cfg, out, tables, figures, None, None) is None
    assert _files(tmp_path) == before
    assert not out.wandb.exists()
    assert capsys.readouterr().out == ""


def test_failure_inside_run_warns_and_keeps_results(tmp_path, capsys):
    """A failure after init (here: a broken effects frame) finishes the run, warns, restores the env."""
    cfg, out, tables, figures = _write_out(tmp_path / "OUT")
    tables["condition_effects"] = tables["condition_effects"].drop("kind")
    before = _env()
    assert tracking.log_sweep(cfg, out, tables, figures, None, None) is None
    assert _env() == before
    err = capsys.readouterr().err
    assert "W&B logging failed" in err and str(out.root) in err and "launch.py --relog" in err
    assert out.summary.is_file() and out.shard("m0-p000000-c000").is_file()
    assert not list((out.wandb / "wandb").glob("*run-*"))  # no half run; the record keeps the id for a re-log
    assert json.loads((out.wandb / "sweep.json").read_text())["where"] is None


def test_online_without_network_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    """Online mode against a closed port on this machine: after wandb.init_timeout the run is logged
    offline in OUT instead, one warning says how long it waited and gives the `wandb sync` command."""
    import socket

    cfg, out, tables, figures = _write_out(tmp_path / "OUT", mode="online")
    cfg = cfg.replace(wandb=dataclasses.replace(cfg.wandb, init_timeout=3))
    _isolated_home(monkeypatch, tmp_path / "home")
    with socket.socket() as s:  # a port nobody listens on: connections are refused, nothing leaves the host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 86)
    where = tracking.log_sweep(cfg, out, tables, figures, None, None)
    assert where is not None and Path(where).parent == (out.wandb / "wandb").resolve()
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, err
    assert "wandb.init_timeout = 3 s" in warnings[0] and warnings[0].endswith(f"wandb sync {where}")
    assert f"127.0.0.1:{port}" in warnings[0]
    _assert_summary_logged(read_run(Path(where))["summary"], tables["summary"])
    assert not any((tmp_path / "home").rglob("*"))
    # The failed online start's run-* folder is gone: the offline run is the only one `wandb sync` finds.
    assert [p.name for p in (out.wandb / "wandb").iterdir() if p.is_dir() and not p.is_symlink()] == [Path(where).name]
    assert json.loads((out.wandb / "sweep.json").read_text())["mode"] == "offline"


@pytest.mark.parametrize("manifest, message", [
    (None, "no manifest.json there; give the --out folder of a finished sweep"),
    ({"job": "discover", "finished": "x"}, "it holds a discover job's output and --relog re-logs sweeps; run the "
                                           "discover job again with --resume"),
    ({"job": "sweep"}, "the sweep there has not finished; continue it with --sweep --resume --out {out}"),
    ({"job": "sweep", "finished": "x",
      "config": Config().replace(wandb=dataclasses.replace(Config().wandb, mode="disabled")).to_dict()},
     "the sweep there ran with wandb.mode=disabled, so there is no run to log again; choose one with --mode "
     "offline or --mode online"),
])
def test_relog_refuses_what_it_cannot_log(tmp_path, capsys, manifest, message):
    out = OutDir(tmp_path / "OUT")
    out.root.mkdir()
    if manifest is not None:
        write_json_atomic({"config": Config().to_dict(), "shards": {}, **manifest}, out.manifest)
    assert launch.main(["--relog", str(out.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --relog {out.root}: {message.format(out=out.root)}") and err.count("\n") == 1
    assert not (out.root / "wandb").exists()


def test_weight_diff_and_compare_runs_name_their_inputs(tmp_path, lineage_runs):
    """--weight-diff with a target.yaml as --config, and --compare with the generations as prompts.file and
    the target.yaml as compare.neurons_from: each run logs its own artifact and uses the producers'."""
    cfg, out, _, _ = _write_out(tmp_path / "OUT")
    wd, selection = _weight_diff()
    wd.write_parquet(out.root / "weight_diff.parquet")
    selection.write_parquet(out.root / "weight_diff_selection.parquet")
    cfg = cfg.replace(weight_diff=dataclasses.replace(cfg.weight_diff, base="org/base", tuned=str(tmp_path)))
    run = read_run(tracking.log_weight_diff(cfg, out, wd, selection, str(lineage_runs.target)))
    assert (run["group"], run["job_type"], run["tags"]) == ("syn", "weight_diff", ["org/base", tmp_path.name])
    assert run["summary"]["weight_diff/target_heads/max_one_minus_cos"] == 1e-7
    art = _output(run, tracking.WEIGHT_DIFF_ARTIFACT_TYPE)
    assert set(art["files"]) == {"weight_diff.parquet", "weight_diff_selection.parquet"}
    assert [a["name"] for a in run["artifacts"] if a["use_after_commit"]] == ["disc-discovery"]

    (out.compare / "figures").mkdir(parents=True)
    per_layer = pl.DataFrame({"layer": [0, 1], "one_minus_cos": [0.0, 1e-3]})
    per_layer.write_parquet(out.compare / "residual.parquet")
    cfg = cfg.replace(prompts=dataclasses.replace(cfg.prompts, file=str(lineage_runs.gen_out.attempts)),
                      compare=dataclasses.replace(cfg.compare, neurons_from=str(lineage_runs.target)))
    run = read_run(tracking.log_compare(cfg, out, per_layer, {"per_layer": per_layer}, [], {"n_layers": 2}))
    assert run["job_type"] == "compare" and run["summary"]["compare/n_layers"] == 2
    assert _output(run, tracking.COMPARE_ARTIFACT_TYPE)["files"] == ["compare/residual.parquet"]
    assert sorted(a["name"] for a in run["artifacts"] if a["use_after_commit"]) == ["disc-discovery", "gen-generations"]


TARGET = "L3 H13, L17 H14, L25 H11"  # tests.support.sweeps' target: the reference sweep can resume with it


def _producers(root: Path) -> SimpleNamespace:
    """A generate job's and a discovery's folders as those jobs leave them, each logged offline."""
    gen_out = OutDir(root / "gen")
    gen_out.root.mkdir(parents=True)
    generations = pl.DataFrame({"problem_id": [0, 1], "nums": [[3, 5, 7], [79, 17, 60]], "target": [22, 36],
                                "output_text": ["- 3 * 5 + 7 = 22", "- 79 - 60 + 17 = 36"]})
    attempts = pl.DataFrame({"numbers": [[3, 5, 7], [79, 17, 60]], "target": [22, 36],
                             "attempt": ["3 * 5 + 7 = 22", "79 - 60 + 17 = 36"], "label": [True, True]})
    generations.write_parquet(gen_out.generations)
    attempts.write_parquet(gen_out.attempts)
    gen_cfg = load_config(None, ["name=gen", "wandb.mode=offline"], str(gen_out.root), file_default=False)
    gen_run = tracking.log_generate(gen_cfg, gen_out, generations, attempts, {"n_samples": 2})
    disc = OutDir(root / "sweep_and_discovery").discovery
    disc.root.mkdir(parents=True)
    heads = pl.DataFrame({"model": ["m1"] * 4, "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                          "atp": [0.5, -0.1, 0.2, 0.0], "exact": [0.4, None, 0.3, -0.05],
                          "attn_to_target": [0.1, 0.2, 0.3, 0.4]})
    sets = pl.DataFrame({"model": ["m1"] * 4, "ranking": ["atp", "atp", "exact", "exact"], "kind": ["head"] * 4,
                         "k": [1, 2, 1, 2], "components": ["L0 H0", "L0 H0, L1 H0", "L0 H0", "L0 H0, L1 H0"],
                         "delta": [0.4, 0.6, 0.4, 0.6], "null_mean": [0.01, 0.02, 0.01, 0.02],
                         "null_std": [0.1, 0.15, 0.1, 0.15], "p_empirical": [0.05, 0.05, 0.05, 0.05]})
    files = []
    for name, frame in (("heads", heads), ("sets", sets)):
        files.append(disc.root / f"{name}.parquet")
        frame.write_parquet(files[-1])
    target = disc.root / "target.yaml"
    target.write_text(f"{lineage.TARGET_HEADER} on m1; test them with --sweep and its random controls.\n"
                      f'ablation:\n  target_heads: "{TARGET}"\n')
    files.append(target)
    disc_cfg = load_config(None, ["name=disc", "wandb.mode=offline"], str(disc.root.parent), file_default=False)
    disc_run = tracking.log_discovery(disc_cfg, disc, {"heads": heads, "sets": sets}, [], files, {"m1/discover/x": 1})
    return SimpleNamespace(gen_out=gen_out, gen_run=Path(gen_run), disc=disc, disc_run=Path(disc_run), target=target,
                           heads=heads, sets=sets)


@pytest.fixture(scope="module")
def lineage_runs(tmp_path_factory):
    """Producers (a generate job, a discovery) and a sweep fed by both: prompts.file is the generations,
    the --config the discovery's target.yaml."""
    root = tmp_path_factory.mktemp("lineage")
    made = _producers(root)
    cfg, out, tables, figures = _write_out(root / "sweep", mode="offline")
    cfg = cfg.replace(prompts=dataclasses.replace(cfg.prompts, file=str(made.gen_out.generations)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        where = tracking.log_sweep(cfg, out, tables, figures, None, None, config_file=str(made.target))
    made.sweep_run = Path(where)
    made.printed = printed.getvalue()
    return made


def _output(run: dict, kind: str) -> dict:
    (art,) = [a for a in run["artifacts"] if a["type"] == kind and not a["use_after_commit"]]
    return art


def test_producers_record_their_run_and_artifacts(lineage_runs):
    for out, job, run_dir, kind in ((lineage_runs.gen_out, "generate", lineage_runs.gen_run,
                                     tracking.GENERATIONS_ARTIFACT_TYPE),
                                    (lineage_runs.disc, "discover", lineage_runs.disc_run,
                                     tracking.DISCOVERY_ARTIFACT_TYPE)):
        record = lineage.read_record(out, job)
        art = _output(read_run(run_dir), kind)
        assert (record["where"], record["mode"], record["run_id"]) == (str(run_dir), "offline", read_run(run_dir)["id"])
        assert [{**a, "files": sorted(a["files"])} for a in record["artifacts"]] == [
            {"name": art["name"], "type": kind, "digest": art["digest"], "files": sorted(art["files"])}]
    assert sorted(lineage.read_record(lineage_runs.disc, "discover")["artifacts"][0]["files"]) == [
        "heads.parquet", "sets.parquet", "target.yaml"]


def test_sweep_declares_the_producers_artifacts_as_inputs(lineage_runs):
    """The sweep's run holds each producer's artifact (same name, type, digest and files), marked
    use_after_commit: what `wandb sync` turns into the server's record that this run used it."""
    run = read_run(lineage_runs.sweep_run)
    used = sorted((a for a in run["artifacts"] if a["use_after_commit"]), key=lambda a: a["name"])
    produced = [_output(read_run(lineage_runs.disc_run), tracking.DISCOVERY_ARTIFACT_TYPE),
                _output(read_run(lineage_runs.gen_run), tracking.GENERATIONS_ARTIFACT_TYPE)]
    assert [a["name"] for a in used] == ["disc-discovery", "gen-generations"]
    for got, want in zip(used, produced):
        assert (got["type"], got["digest"], sorted(got["files"])) == (want["type"], want["digest"], sorted(want["files"]))
    assert not _output(run, tracking.ARTIFACT_TYPE)["use_after_commit"]  # its own results are an output
    record = lineage.read_record(OutDir(lineage_runs.sweep_run.parents[2]), "sweep")
    assert [(i["via"], i["name"]) for i in record["inputs"]] == [("prompts.file", "gen-generations"),
                                                                   ("--config", "disc-discovery")]
    # Producers upload first, so the server knows their artifacts as theirs when the sweep uses them.
    assert (f"upload with: wandb sync {lineage_runs.gen_run} {lineage_runs.disc_run} {lineage_runs.sweep_run}"
            in lineage_runs.printed)


def test_discovery_charts(lineage_runs):
    run = read_run(lineage_runs.disc_run)
    panel, table = chart(lineage_runs.disc_run, run, "charts/m1/atp_vs_exact")
    assert _fields(panel) == {"x": "atp", "y": "exact"}
    assert sorted(_columns(table, "atp", "exact")) == sorted(
        lineage_runs.heads.drop_nulls("exact").select("atp", "exact").rows())
    panel, table = chart(lineage_runs.disc_run, run, "charts/m1/effect_vs_k/head")
    assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert _fields(panel) == {"step": "k", "lineKey": "series", "lineVal": "value"}
    points = {(k, series): v for k, series, v in _columns(table, "k", "series", "value")}
    assert points[(2, "top k by exact")] == 0.6 and points[(1, "random sets: mean")] == 0.01
    assert points[(2, "random sets: mean + 2 sd")] == pytest.approx(0.02 + 2 * 0.15, abs=1e-15)
    assert len(points) == 2 * 2 + 3 * 2  # two rankings and the band's three lines, at k = 1 and 2


def test_an_input_copied_elsewhere_or_changed_has_no_lineage_said_once(lineage_runs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(lineage_runs.gen_out.generations, elsewhere / "gen.parquet")
    shutil.copy(lineage_runs.target, elsewhere / "target.yaml")
    (elsewhere / "mine.yaml").write_text("prompts:\n  n: 4\n")  # a hand-written config: no input, no word
    found, notes = lineage.find_inputs(prompts_file=str(elsewhere / "gen.parquet"),
                                       config_file=str(elsewhere / "target.yaml"))
    assert found == [] and len(notes) == 2
    assert notes[0].startswith(f"W&B lineage: prompts.file {elsewhere / 'gen.parquet'} has no generate job's record")
    assert notes[1].startswith(f"W&B lineage: --config {elsewhere / 'target.yaml'} has no discover job's record")
    assert lineage.find_inputs(config_file=str(elsewhere / "mine.yaml")) == ([], [])
    # A producer's file changed after its run logged it: the rebuilt artifact's digest differs.
    copy = tmp_path / "gen"
    shutil.copytree(lineage_runs.gen_out.root, copy)
    pl.DataFrame({"attempt": ["changed"]}).write_parquet(copy / "attempts.parquet")
    (changed,), [] = lineage.find_inputs(prompts_file=str(copy / "generations.parquet"))
    (line,) = lineage.use_inputs(None, [changed], offline=True)  # no run needed: nothing is logged
    assert line.startswith(f"W&B lineage: prompts.file {copy / 'generations.parquet'}: the files of gen-generations "
                           "changed since its generate run logged them")


def _sweep_argv(out: Path, config: Path, sweep_model_dir: Path) -> list[str]:
    argv = ["--sweep", "--resume", "--config", str(config), "--out", str(out)]
    for item in sweep_overrides(sweep_model_dir, "ray.workers=0", "wandb.mode=offline"):
        argv += ["--set", item]
    return argv


def test_resumed_and_relogged_sweep_is_one_run_using_the_discovery(sweep_reference, lineage_runs, sweep_model_dir,
                                                                   tmp_path, capsys):
    """The finished reference sweep resumed with --config the discovery's target.yaml (every shard is on
    disk, so only its outputs and W&B run are made again), then re-logged from its files as a folder from
    before the charts (no stats/condition_effects.parquet) with the leftover of a killed log beside its
    run: both logs are one run (one id, one folder: `wandb sync` of OUT/wandb uploads one run, not one
    per log), the summary equals summary.parquet, the charts are made again, and the run names the
    discovery's artifact as its input (the re-log reads the --config from the manifest)."""
    out = tmp_path / "OUT"
    runs = out / "wandb" / "wandb"
    shutil.copytree(sweep_reference[1], out)
    assert launch.main(_sweep_argv(out, lineage_runs.target, sweep_model_dir)) == 0, capsys.readouterr().err
    (first,) = runs.glob("offline-run-*")
    first_run = read_run(first)
    assert json.loads((out / "manifest.json").read_text())["config_file"] == str(lineage_runs.target.resolve())
    (out / "stats" / "condition_effects.parquet").unlink()
    shutil.copytree(first, runs / f"offline-run-19990101_000000-{first_run['id']}")  # what a killed log leaves
    capsys.readouterr()
    assert launch.main(["--relog", str(out), "--mode", "offline"]) == 0, capsys.readouterr().err
    (run_dir,) = runs.glob("offline-run-*")
    run = read_run(run_dir)
    assert run["id"] == first_run["id"] and run["resume"]
    assert not (out / "wandb" / "replaced").exists() and not list(runs.glob("run-*"))
    record = json.loads((out / "wandb" / "sweep.json").read_text())
    assert (record["run_id"], record["where"], record["mode"]) == (run["id"], str(run_dir), "offline")
    own = _output(run, tracking.ARTIFACT_TYPE)
    assert [{**a, "files": sorted(a["files"])} for a in record["artifacts"]] == [
        {"name": own["name"], "type": own["type"], "digest": own["digest"], "files": sorted(own["files"])}]
    assert f"upload with: wandb sync {lineage_runs.disc_run} {run_dir}" in capsys.readouterr().out
    summary = pl.read_parquet(out / "summary.parquet")
    _assert_summary_logged(run["summary"], summary)
    assert run["summary"]["sweep/n_prompts"] == 6 and "sweep/shards_run" not in run["summary"]  # a re-log ran none
    for logged in (first_run, run):
        (used,) = [a for a in logged["artifacts"] if a["use_after_commit"]]
        assert (used["name"], used["type"]) == ("disc-discovery", tracking.DISCOVERY_ARTIFACT_TYPE)
    assert len(_table_json(run_dir, run["history"][0], "tables/condition_effects")["data"]) == summary.height == 4
    model = summary["model"][0]
    assert {f"charts/{model}/effects/delta_correct", f"charts/{model}/null/delta_auroc"} <= set(
        run["config"]["_wandb"]["visualize"])
