"""One small sweep shared by the sweep, fault and cluster tests, and the checks they make on its results.

6 prompts x 4 conditions (baseline, a 3-head target, 2 random sets) on the seed-shaped model with the small
vocabulary (conftest `sweep_model_dir`), one prompt per shard: 6 shards of 4 rows. Every run of it (in this process, on a local Ray, on the simulated
cluster, resumed after a fault) must give the same 24 rows. They are compared bit for bit: the same
shard layout gives every worker the same batches, and every worker computes with one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from jobs.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
KEY = ["model", "prompt_id", "condition"]
N_SHARDS, N_ROWS = 6, 24
SWEEP_SETTINGS = (
    "model.device=cpu",
    "model.dtype=float32",
    "prompts.n=6",
    "ablation.target_heads=L3 H13, L17 H14, L25 H11",
    "ablation.random_controls=2",
    "ablation.match_layers=false",
    "shards.prompts_per_shard=1",
    "engine.max_rows=16",
    "wandb.mode=disabled",
    "stats.n_boot=50",
)


def sweep_overrides(model_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model_dir}", *SWEEP_SETTINGS, *extra]


def sweep_cfg(model_dir: Path, out: Path, *extra: str, config: Path | None = None) -> Config:
    return load_config(config, sweep_overrides(model_dir, *extra), str(out))


def assert_same_results(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Every row once and bit-equal values (same shards, same batches, one thread everywhere)."""
    assert got.height == want.height == N_ROWS
    assert got.select(KEY).unique().height == N_ROWS
    assert_frame_equal(got.sort(KEY), want.sort(KEY), check_exact=True)


def manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def done_shards(out: Path) -> dict[str, dict]:
    """Finished shards of the manifest as the driver last wrote it ({} while there is none)."""
    try:
        return {k: v for k, v in manifest(out)["shards"].items() if v["status"] == "done"}
    except (OSError, ValueError, KeyError):
        return {}


def driver_env(ray_tmp: Path) -> dict[str, str]:
    """Environment of a driver subprocess: this checkout's code, one thread, Ray's files under `ray_tmp`."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp), "TQDM_DISABLE": "1"}


def start_driver(model_dir: Path, out: Path, ray_tmp: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    """`python launch.py --sweep` as a user starts it, in its own process group (so it can get a Ctrl-C)."""
    cmd = [sys.executable, "launch.py", "--sweep", "--out", str(out)]
    for item in sweep_overrides(model_dir, *extra):
        cmd += ["--set", item]
    cmd += ["--resume"] if resume else []
    return subprocess.Popen(cmd, cwd=REPO, env=driver_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 180.0):
    """Poll `predicate()` until it returns something truthy; fail with `what` (and the driver's output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
