"""The output folder: its paths, atomic file writes, and the manifest that says which shard files to trust.

Every file is written under a temporary name, fsynced and renamed into place, so a crash at any moment
leaves either the whole file or none of it. That alone does not make a file trustworthy (a disk can
truncate it, a user can copy half of it), so the manifest records each finished shard's size, row count
and SHA-256, and `--resume` reads only files that still match them (`verify_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import polars as pl

from jobs.errors import InputError, WriteFailed

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
TMP_MARK = ".tmp-"  # temporary files are `.<name>.tmp-<pid>`


class ManifestError(InputError):
    """OUT/manifest.json cannot be read as a manifest; the message names the file and what to do."""


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
    # With two or more models: the cross-model tables (jobs.cross_model) and their figures.
    cross_model = property(lambda self: self.root / "cross_model.parquet")
    cross_model_maps = property(lambda self: self.root / "cross_model_maps.parquet")
    cross_figures = property(lambda self: self.root / "figures" / "cross")
    # With ablation.kind cross: the source model's activations on the prompts (jobs.cross).
    cross_cache = property(lambda self: self.root / "cross")
    wandb = property(lambda self: self.root / "wandb")
    # Held while a driver writes here (jobs.runtime.lock), and the local Ray it started (jobs.runtime.local_ray).
    lock = property(lambda self: self.root / ".lock")
    ray_processes = property(lambda self: self.root / ".ray_processes.json")
    # The weight-diff job's outputs (written by jobs.weight_diff, logged by jobs.tracking).
    weight_diff = property(lambda self: self.root / "weight_diff.parquet")
    weight_diff_selection = property(lambda self: self.root / "weight_diff_selection.parquet")
    weight_diff_selected_rows = property(lambda self: self.root / "weight_diff_selected_rows.parquet")
    weight_diff_summary = property(lambda self: self.root / "weight_diff_summary.json")
    weight_diff_rows = property(lambda self: self.root / "weight_diff_rows.parquet")
    weight_diff_rows_summary = property(lambda self: self.root / "weight_diff_rows_summary.parquet")
    # The generate job's outputs (jobs.generate; its shards are results/) and the compare job's folder.
    generations = property(lambda self: self.root / "generations.parquet")
    attempts = property(lambda self: self.root / "attempts.parquet")
    compare = property(lambda self: self.root / "compare")
    # The discovery job's own folder inside OUT (jobs.discover), laid out like any job's.
    discovery = property(lambda self: OutDir(self.root / "discovery"))

    @property
    def weight_diff_files(self) -> tuple[Path, ...]:
        return (self.weight_diff, self.weight_diff_selection, self.weight_diff_selected_rows, self.weight_diff_summary,
                self.weight_diff_rows, self.weight_diff_rows_summary)

    def shard(self, shard_id: str) -> Path:
        return self.results / f"{shard_id}.parquet"

    def shard_files(self) -> set[str]:
        """Ids of the shard files present (trusted or not: see `verify_shards`)."""
        return {p.stem for p in self.results.glob("*.parquet")} if self.results.is_dir() else set()

    def read_results(self, shard_ids: list[str] | None = None) -> pl.DataFrame:
        """The given shards' rows (default: every shard file), sorted by model, condition, prompt."""
        ids = sorted(self.shard_files() if shard_ids is None else shard_ids)
        if not ids:
            return pl.DataFrame(schema=RESULT_SCHEMA)
        return pl.concat([pl.read_parquet(self.shard(i)) for i in ids]).sort(["model", "condition", "prompt_id"])

    def remove_temp_files(self) -> list[Path]:
        """Delete the `.name.tmp-<pid>` files a killed writer left behind (call while holding the lock)."""
        found = [p for d in (self.root, self.results, self.stats) if d.is_dir()
                 for p in d.glob(f".*{TMP_MARK}*") if p.is_file()]
        for p in found:
            p.unlink(missing_ok=True)
        return found


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def writing(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OS error while the block writes `path` (a file, or a folder of figures), such as a full disk or
    a file over the size limit, is `WriteFailed` naming it; the half-written temporary file `tmp` goes."""
    try:
        yield
    except OSError as e:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the next run's cleanup (`OutDir.remove_temp_files`) takes it
        raise WriteFailed(path, e.strerror or str(e)) from e


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write to `.name.tmp-<pid>`, fsync, then rename: readers never see a partial file."""
    tmp = _tmp_name(path)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            df.write_parquet(tmp)
        except pl.exceptions.ComputeError as e:  # how polars reports an OS error writing the file
            raise OSError(str(e).rsplit("IO error: ", 1)[-1]) from e
        _fsync_replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = _tmp_name(path)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
        _fsync_replace(tmp, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """As `write_parquet_atomic`, for a file already serialised (the cross-model source cache)."""
    tmp = _tmp_name(path)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        _fsync_replace(tmp, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest keeps about a finished shard: enough to recognise its file, and where it ran."""

    rows: int
    bytes: int
    sha256: str

    def entry(self) -> dict:
        return {"status": "done", "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def write_shard(df: pl.DataFrame, path: Path) -> ShardRecord:
    """Write a shard file atomically and return the record that later proves it intact."""
    write_parquet_atomic(df, path)
    return ShardRecord(df.height, path.stat().st_size, file_digest(path))


# --------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------


def read_manifest(out: OutDir) -> dict:
    """The manifest, or a ManifestError naming the file and what to do (never a JSON traceback)."""
    path = out.manifest
    advice = (f"it cannot tell which shard files in {out.results} are complete, so none can be trusted. "
              f"Start the sweep again in a new --out (or delete {out.root})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is unreadable or not valid JSON ({e}); {advice}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict) or "config" not in manifest:
        raise ManifestError(f"{path} is not a sweep manifest (no 'config' and 'shards' entries); {advice}")
    return manifest


def shard_problem(out: OutDir, shard_id: str, entry: dict) -> str | None:
    """Why the shard's file cannot be trusted, or None when it matches its manifest record."""
    path = out.shard(shard_id)
    if entry.get("status") != "done":
        return "not recorded as finished (the driver stopped before recording it)" if path.exists() else None
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{size} bytes, the manifest recorded {entry.get('bytes')} (truncated or replaced)"
    if file_digest(path) != entry.get("sha256"):
        return "checksum differs from the manifest's (corrupt)"
    try:
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()  # from the footer only
    except Exception as e:  # noqa: BLE001 - any read failure means the same: not usable
        return f"unreadable ({type(e).__name__})"
    if rows != entry.get("rows"):
        return f"{rows} rows, the manifest recorded {entry.get('rows')}"
    return None


def verify_shards(out: OutDir, manifest: dict) -> tuple[set[str], dict[str, str]]:
    """(ids whose files match their records, {id: problem} for every file that does not)."""
    good, bad = set(), {}
    for shard_id, entry in manifest["shards"].items():
        problem = shard_problem(out, shard_id, entry)
        if problem:
            bad[shard_id] = problem
        elif entry.get("status") == "done":
            good.add(shard_id)
    return good, bad


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
