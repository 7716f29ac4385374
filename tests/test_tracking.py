"""W&B tracking (jobs/tracking.py): every check reads the offline run's files back, without a server.

The `.wandb` record log is parsed with `tests.support.wandb_records.read_run` (LevelDB-style log of
`wandb_internal_pb2.Record`, checksums verified) and tables from `files/media/table/**.table.json`,
then compared with the frames that were logged, so a key, value or file that goes missing fails here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

import launch
from jobs import tracking
from jobs.config import Config, load_config
from tests.support.wandb_records import read_run
from verif.analysis.tables import per_prompt_table
from jobs.runtime.storage import OutDir, write_json_atomic
from verif.analysis import stats

MODELS = ("m1", "org/m2")  # a hub-style name with a slash must survive as one key segment
N_RANDOM = 38  # enough conditions that the summary record spans several 32 KiB log blocks
N_PROMPTS = 8
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR",
              "WANDB_SILENT")


def _conditions() -> pl.DataFrame:
    names = ["baseline", "target"] + [f"random_{i:03d}" for i in range(N_RANDOM)]
    kinds = ["baseline", "target"] + ["random"] * N_RANDOM
    return pl.DataFrame(
        {"condition": names, "kind": kinds, "heads": ["", "L1 H1"] + ["L2 H2"] * N_RANDOM,
         "n_heads": [0] + [1] * (N_RANDOM + 1), "layer": [None] * len(names), "head": [None] * len(names)},
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
    }
    out.results.mkdir(parents=True)
    results.write_parquet(out.shard("m0-p000000-c000"))
    prompts.write_parquet(out.prompts)
    conditions.write_parquet(out.conditions)
    summary.write_parquet(out.summary)
    for name in ("by_error_kind", "paired_change", "target_vs_controls"):
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


def test_config_group_job_type(offline):
    run = offline.run
    assert run["group"] == "syn" and run["job_type"] == "sweep"
    for key, value in offline.cfg.to_dict().items():
        assert run["config"][key] == value, key


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
    assert (s["sweep/n_prompts"], s["sweep/n_conditions"]) == (N_PROMPTS, N_RANDOM + 2)
    assert s["weight_diff/n_rows"] == 6000
    assert s["weight_diff/top_50_value_vectors/max_one_minus_cos"] == 1e-6
    assert s["weight_diff/target_heads/n_rows"] == 10


def test_tables_equal_frames(offline):
    (step,) = offline.run["history"]
    files = sorted((offline.run_dir / "files" / "media" / "table").rglob("*.table.json"))
    assert len(files) == 7  # 5 sweep tables + weight-diff selection + top rows
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
    }


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
    """A failure after init (here: a broken summary frame) finishes the run, warns, restores the env."""
    cfg, out, tables, figures = _write_out(tmp_path / "OUT")
    tables["summary"] = tables["summary"].drop("model")
    before = _env()
    assert tracking.log_sweep(cfg, out, tables, figures, None, None) is None
    assert _env() == before
    err = capsys.readouterr().err
    assert "W&B logging failed" in err and str(out.root) in err and "launch.py --relog" in err
    assert out.summary.is_file() and out.shard("m0-p000000-c000").is_file()


def test_online_without_network_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    """Online mode against a closed port on this machine: after wandb.init_timeout the run is logged
    offline in OUT instead, one warning says how long it waited and gives the `wandb sync` command."""
    import dataclasses
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


def test_relog_from_files(tmp_path):
    """`launch.py --relog OUT` rebuilds the tables from disk and logs the same summary."""
    cfg, out, tables, _ = _write_out(tmp_path / "OUT", mode="disabled")
    assert launch.main(["--relog", str(out.root), "--mode", "offline"]) == 0
    (run_dir,) = (out.wandb / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    _assert_summary_logged(run["summary"], tables["summary"])
    assert [a["type"] for a in run["artifacts"]].count(tracking.ARTIFACT_TYPE) == 1
    assert "figures/m1__before_after" in run["history"][0]


@pytest.mark.parametrize("manifest, message", [
    (None, "no manifest.json there; give the --out folder of a finished sweep"),
    ({"job": "discover", "finished": "x"}, "it holds a discover job's output and --relog re-logs sweeps; run the "
                                           "discover job again with --resume"),
    ({"job": "sweep"}, "the sweep there has not finished; continue it with --sweep --resume --out {out}"),
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


def test_log_weight_diff(tmp_path):
    cfg, out, _, _ = _write_out(tmp_path / "OUT")
    wd, selection = _weight_diff()
    wd.write_parquet(out.root / "weight_diff.parquet")
    selection.write_parquet(out.root / "weight_diff_selection.parquet")
    run = read_run(tracking.log_weight_diff(cfg, out, wd, selection))
    assert (run["group"], run["job_type"]) == ("syn", "weight_diff")
    assert run["summary"]["weight_diff/target_heads/max_one_minus_cos"] == 1e-7
    (art,) = [a for a in run["artifacts"] if a["type"] == tracking.WEIGHT_DIFF_ARTIFACT_TYPE]
    assert set(art["files"]) == {"weight_diff.parquet", "weight_diff_selection.parquet"}


def test_end_to_end_sweep_offline(sweep_model_dir, tmp_path):
    """A real sweep on the seed-shaped model: the run's summary equals OUT/summary.parquet."""
    from jobs.sweep import run_sweep

    cfg = load_config(None, overrides=[
        f"model.path={sweep_model_dir}", "prompts.n=8", 'ablation.target_heads="L3 H13, L17 H14"',
        "ablation.random_controls=3", "ray.workers=0", "wandb.mode=offline", "stats.n_boot=100",
    ], out=str(tmp_path / "OUT"))
    report = run_sweep(cfg)
    assert report.finalized.wandb_dir is not None
    run_dir = Path(report.finalized.wandb_dir)
    assert run_dir.parent == (tmp_path / "OUT" / "wandb" / "wandb").resolve()
    run = read_run(run_dir)
    summary = pl.read_parquet(tmp_path / "OUT" / "summary.parquet")
    assert summary.height == 5  # baseline, target, 3 random sets
    _assert_summary_logged(run["summary"], summary)
    assert run["summary"]["sweep/rows_written"] == 8 * 5
    tvc = pl.read_parquet(tmp_path / "OUT" / "stats" / "target_vs_controls.parquet")
    for row in tvc.iter_rows(named=True):
        assert run["summary"][tracking.tvc_key(row["model"], row["metric"], "n_controls")] == 3
    assert [a["type"] for a in run["artifacts"]].count(tracking.ARTIFACT_TYPE) == 1
