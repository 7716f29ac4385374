"""The sweep engine end to end: Ray workers, fault tolerance, resume, configuration errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

import launch
from jobs.config import Config, ConfigError, load_config, reference_markdown
from jobs.storage import OutDir
from jobs.sweep import SweepError, SweepInterrupted, prepare, run_sweep
from verif.design.heads import STUDY_HEADS_TEXT, canonical, parse_heads
from tests.tolerances import ScoreTol, assert_scores_close

REPO = Path(__file__).resolve().parent.parent
KEY = ["model", "prompt_id", "condition"]


def sweep_cfg(model_dir, out, *extra: str) -> Config:
    """A small sweep on the seed-shaped model: 6 prompts x 4 conditions in 3 shards."""
    overrides = [
        f"model.path={model_dir}",
        "model.device=cpu",
        "prompts.n=6",
        "ablation.target_heads=L3 H13, L17 H14, L25 H11",
        "ablation.random_controls=2",
        "ablation.match_layers=false",
        "shards.prompts_per_shard=2",
        "engine.max_rows=16",
        "wandb.mode=disabled",
        "stats.n_boot=50",
        *extra,
    ]
    return load_config(None, overrides, str(out))


@pytest.fixture(scope="module")
def reference(seed_model_dir, tmp_path_factory) -> pl.DataFrame:
    """The same shards scored in this process, without Ray."""
    out = tmp_path_factory.mktemp("ref")
    report = run_sweep(sweep_cfg(seed_model_dir, out, "ray.workers=0"))
    assert report.shards_run == 3 and report.rows_written == 6 * 4
    return OutDir(out).read_results()


@pytest.fixture(scope="module")
def tol(seed_model, rounding) -> ScoreTol:
    """Ray workers run one torch thread, this process VERIF_TEST_THREADS: float32 forwards of the seed-shaped
    model that may reduce in different orders (tests/tolerances.py)."""
    return ScoreTol.between_forwards(rounding(seed_model))


def assert_same_results(a: pl.DataFrame, b: pl.DataFrame, tol: ScoreTol) -> None:
    assert a.height == b.height
    joined = a.join(b, on=KEY, suffix="_b")
    assert joined.height == a.height
    cols = ("p_yes", "p_no", "p_yes_norm", "log_odds")
    assert_scores_close({c: joined[c].to_numpy() for c in cols}, {c: joined[f"{c}_b"].to_numpy() for c in cols}, tol)


def assert_each_row_once(df: pl.DataFrame, n: int) -> None:
    assert df.height == n
    assert df.select(KEY).unique().height == n


def test_ray_sweep_equals_single_process(seed_model_dir, tmp_path, reference, tol):
    report = run_sweep(sweep_cfg(seed_model_dir, tmp_path, "ray.workers=2"))
    results = OutDir(tmp_path).read_results()
    assert_each_row_once(results, 24)
    assert_same_results(results, reference, tol)
    assert report.shards_run == 3 and not report.retried
    out = OutDir(tmp_path)
    for path in (out.prompts, out.conditions, out.summary, out.manifest):
        assert path.is_file(), path
    summary = pl.read_parquet(out.summary)
    assert set(summary["condition"]) == {"baseline", "target", "random-000", "random-001"}
    assert pl.read_parquet(out.conditions).filter(pl.col("kind") == "target")["n_heads"].item() == 3


def test_worker_killed_mid_shard_is_rerun(seed_model_dir, tmp_path, reference, tol):
    report = run_sweep(sweep_cfg(seed_model_dir, tmp_path, "ray.workers=2", "testing.crash_worker_once=true"))
    assert report.retried, "the injected crash did not happen"
    assert (tmp_path / ".crash_marker").exists()
    results = OutDir(tmp_path).read_results()
    assert_each_row_once(results, 24)
    assert_same_results(results, reference, tol)


def test_stopped_driver_resumes_without_recomputing(seed_model_dir, tmp_path, reference, tol):
    cfg = sweep_cfg(seed_model_dir, tmp_path, "ray.workers=0", "testing.stop_after_shards=2")
    with pytest.raises(SweepInterrupted):
        run_sweep(cfg)
    out = OutDir(tmp_path)
    first = {p.name: p.stat().st_mtime_ns for p in out.results.glob("*.parquet")}
    assert len(first) == 2
    report = run_sweep(sweep_cfg(seed_model_dir, tmp_path, "ray.workers=0"), resume=True)
    assert report.shards_run == 1 and report.shards_skipped == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.results.glob("*.parquet") if p.name in first} == first
    assert_same_results(out.read_results(), reference, tol)


@pytest.fixture(scope="module")
def stopped_after_one(seed_model_dir, tmp_path_factory) -> Path:
    """A sweep folder interrupted after its first shard; tests work on copies of it."""
    out = tmp_path_factory.mktemp("stopped_after_one")
    with pytest.raises(SweepInterrupted):
        run_sweep(sweep_cfg(seed_model_dir, out, "ray.workers=0", "testing.stop_after_shards=1"))
    assert len(list(OutDir(out).results.glob("*.parquet"))) == 1
    return out


def test_existing_out_needs_resume(seed_model_dir, tmp_path, stopped_after_one):
    shutil.copytree(stopped_after_one, tmp_path, dirs_exist_ok=True)
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(sweep_cfg(seed_model_dir, tmp_path, "ray.workers=0"))


def test_resume_with_changed_config_is_refused(seed_model_dir, tmp_path, stopped_after_one):
    shutil.copytree(stopped_after_one, tmp_path, dirs_exist_ok=True)
    before = sorted(p.name for p in OutDir(tmp_path).results.glob("*.parquet"))
    changed = sweep_cfg(seed_model_dir, tmp_path, "ray.workers=0", "ablation.random_controls=3", "prompts.seed=7")
    with pytest.raises(SweepError, match=r"ablation.random_controls: 2 -> 3.*prompts.seed: 0 -> 7"):
        run_sweep(changed, resume=True)
    assert sorted(p.name for p in OutDir(tmp_path).results.glob("*.parquet")) == before
    # Keys that change no number (workers, engine chunking, W&B) may differ on resume.
    ok = sweep_cfg(seed_model_dir, tmp_path, "ray.workers=0", "engine.max_rows=5")
    assert run_sweep(ok, resume=True).shards_run == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("ablation.random_contols=3", "ablation.random_contols: unknown key; did you mean random_controls?"),
        ("prompts.n=many", "prompts.n: expected int, got str 'many'"),
        ("prompts.n=0", "prompts.n: must be >= 1"),
        ("wandb.mode=cloud", "wandb.mode: must be one of 'offline', 'online', 'disabled'"),
        ("ablation.sweeps=[heads]", "ablation.sweeps: unknown sweep 'heads'"),
        ("model.dtype=true", "model.dtype: expected str, got bool"),
        ("engine.max_rows=0", "engine.max_rows: must be >= 1"),
        ("engine.max_rows=big", "engine.max_rows: must be a whole number >= 1 or 'auto'"),
        ("engine.max_rows=2.5", "engine.max_rows: expected int or str, got float 2.5"),
        ("ablation.target_heads=L-1 H3", "ablation.target_heads: cannot parse head 'L-1'"),
        ("ablation.target_heads=garbage", "ablation.target_heads: cannot parse head 'garbage'"),
    ],
)
def test_config_errors_name_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], str(tmp_path / "out"))
    assert message in str(err.value)


def test_yaml_error_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  n: [1, 2\nablation: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}:3:9: not valid YAML: ") and "\n" not in str(err.value)


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = launch.main(list(args))
    return code, capsys.readouterr().err


def test_cli_errors_before_any_shard(seed_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--sweep", "--out", str(out), "--set", f"model.path={seed_model_dir}", "--set", "model.device=cpu"]
    cases = [
        (["--set", "ablation.target_heads=L17 H16"], "L17 H16: model has 16 heads per layer (0-15)"),
        (["--set", "ablation.target_heads=L36 H0"], "L36 H0: model has 36 layers (0-35)"),
        (["--set", "ablation.target_heads=L3 H1, 3.1"], "duplicate heads: L3 H1"),
        (["--set", "model.path=/no/such/model"], "'/no/such/model': no such file or folder"),
        (["--set", "scoring.yes=[' Yesss']"], "variant ' Yesss' encodes to 3 tokens"),
        (["--set", "ablation.random_contols=3"], "did you mean random_controls?"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--set", "ablation.target_heads=L3 H1", "--set", "ablation.match_layers=true", "--set",
          "ablation.random_controls=20"], "ablation.random_controls: only 15 distinct control sets of 1 heads"),
    ]
    for extra, message in cases:
        code, err = _cli(capsys, *base, *extra)
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert not (out / "results").exists()


def test_tinyzero_config_validates():
    cfg = load_config(REPO / "configs" / "tinyzero_qwen2.5_3b.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-3B"
    assert cfg.ablation.random_controls == 100 and cfg.prompts.n == 1024
    assert cfg.model.dtype == "bfloat16" and cfg.ray.gpus_per_worker == 1
    # The config spells the study's heads out for readers; they must be the study's heads.
    assert canonical(parse_heads(cfg.ablation.target_heads)) == canonical(parse_heads(STUDY_HEADS_TEXT))


def test_tinyzero_config_runs_on_seed_shaped_model(seed_model_dir, tmp_path):
    """The study's config with only the model swapped (and sizes cut for a CPU): 29 heads are valid."""
    overrides = [
        f"model.path={seed_model_dir}", "model.device=cpu", "model.dtype=float32", "ray.address=",
        "ray.workers=0", "prompts.n=4", "ablation.random_controls=2", "wandb.mode=disabled", "stats.n_boot=50",
        "engine.compile=false",
    ]
    cfg = load_config(REPO / "configs" / "tinyzero_qwen2.5_3b.yaml", overrides, str(tmp_path))
    plan = prepare(cfg)
    target = next(c for c in plan.conditions if c.kind == "target")
    assert len(target.heads) == 29
    report = run_sweep(cfg)
    assert report.rows_written == 4 * 4
    figures = report.finalized.figures
    assert all(p.suffix == ".png" for p in figures) and figures


def test_default_config_validates(capsys):
    assert launch.main(["--check"]) == 0
    assert "64 prompts" in capsys.readouterr().out


def test_readme_holds_the_generated_config_reference():
    readme = (REPO / "README.md").read_text()
    missing = [line for line in reference_markdown().splitlines() if line not in readme]
    assert not missing, f"README configuration reference is stale; regenerate it (--config-reference): {missing}"

