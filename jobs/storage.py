"""The output folder: its paths, atomic file writes and the manifest.

Every file is written under a temporary name and renamed into place, so a crash at any moment leaves
either the whole file or none of it, and `--resume` can trust whatever shard files exist.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import polars as pl

RESULT_SCHEMA = {
    "model": pl.Utf8,
    "prompt_id": pl.Int64,
    "condition": pl.Utf8,
    "p_yes": pl.Float64,
    "p_no": pl.Float64,
    "p_yes_norm": pl.Float64,
    "log_odds": pl.Float64,
}
VERSIONED_PACKAGES = ("verif-sweep", "torch", "transformers", "accelerate", "ray", "wandb", "polars", "numpy")


class OutDir:
    """Paths of one job's output folder (see the README's output layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    prompts = property(lambda self: self.root / "prompts.parquet")
    conditions = property(lambda self: self.root / "conditions.parquet")
    results = property(lambda self: self.root / "results")
    summary = property(lambda self: self.root / "summary.parquet")
    stats = property(lambda self: self.root / "stats")
    manifest = property(lambda self: self.root / "manifest.json")
    figures = property(lambda self: self.root / "figures")
    wandb = property(lambda self: self.root / "wandb")
    # The weight-diff job's outputs (written by jobs.weight_diff, logged by jobs.tracking).
    weight_diff = property(lambda self: self.root / "weight_diff.parquet")
    weight_diff_selection = property(lambda self: self.root / "weight_diff_selection.parquet")
    weight_diff_selected_rows = property(lambda self: self.root / "weight_diff_selected_rows.parquet")
    weight_diff_summary = property(lambda self: self.root / "weight_diff_summary.json")

    @property
    def weight_diff_files(self) -> tuple[Path, ...]:
        return (self.weight_diff, self.weight_diff_selection, self.weight_diff_selected_rows, self.weight_diff_summary)

    def shard(self, shard_id: str) -> Path:
        return self.results / f"{shard_id}.parquet"

    def done_shards(self) -> set[str]:
        """Shards whose result file exists (complete by construction: files appear by rename)."""
        return {p.stem for p in self.results.glob("*.parquet")} if self.results.is_dir() else set()

    def read_results(self) -> pl.DataFrame:
        files = sorted(self.results.glob("*.parquet"))
        if not files:
            return pl.DataFrame(schema=RESULT_SCHEMA)
        return pl.concat([pl.read_parquet(f) for f in files]).sort(["model", "condition", "prompt_id"])


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write to `.name.tmp-<pid>`, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    df.write_parquet(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
