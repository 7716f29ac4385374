"""One W&B run per job folder: opened, filled, closed, never lost, never duplicated.

* Folders: offline runs (the default) live entirely under `<job folder>/wandb`: the W&B folders
  (`WANDB_DIR`, cache, data, config, artifact staging) are pointed there for the call and the previous
  environment is restored afterwards, so nothing lands in the home folder (online mode keeps the
  user's WANDB_CONFIG_DIR, which holds the host set by `wandb login`).
* One run per job and folder: the run id is kept in the job's tracking record
  (`jobs.lineage`, `<job folder>/wandb/<job>.json`, written before the run starts), so logging the same
  folder again (`--resume` of a finished job, `--relog`, a job whose driver was killed while logging)
  reuses it, with `resume="allow"`, and every earlier local run folder of that id is replaced once the
  new run has finished: `wandb sync` of the folder uploads one run. The earlier folders are set aside
  while the new run is written and put back if it fails.
* Online mode waits at most `wandb.init_timeout` seconds for the server; a run that cannot start (no
  network, bad key) is logged offline instead, with one warning giving the `wandb sync` command, and
  the folder the failed online start left is removed.
* Failures never cost results: every number is logged from files already on disk, so an error inside
  the run is one warning naming the folder and the `--relog` command, and the job carries on.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import lineage
from jobs.config import Config
from jobs.runtime.storage import OutDir

RUNS = "wandb"  # W&B's own folder inside WANDB_DIR: offline-run-<time>-<id>, run-<time>-<id>
ASIDE = "replaced"  # earlier run folders of the same id, held here until the new run has finished


def _wandb_env(root: Path, mode: str) -> dict[str, str]:
    """W&B's folders under `root`. Online keeps the user's config dir: it holds the login's host."""
    env = {
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB_SILENT": "true",
    }
    if mode == "offline":
        env["WANDB_CONFIG_DIR"] = str(root / "config")
    return env


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values (or absence) after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings(mode: str, init_timeout: float):
    """Keep init fast and the run folder small: no console capture, code, git, stats or machine probe."""
    import wandb

    return wandb.Settings(
        mode=mode, init_timeout=init_timeout, console="off", save_code=False, disable_code=True, disable_git=True,
        x_disable_stats=True, x_disable_machine_info=True, x_disable_meta=True, silent=True,
    )


def safe_name(name: str) -> str:
    """Artifact names allow letters, digits, '-', '_' and '.' only."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def relog_hint(out: OutDir) -> str:
    return f"python launch.py --relog {out.root} [--mode offline|online]"


@dataclass
class Session:
    """An open run and what filling it produced: the artifacts it logged (for the tracking record) and
    lines to say once it is closed (a table cut at W&B's limit, an input without lineage)."""

    run: Any
    offline: bool
    artifacts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def log_artifact(self, name: str, kind: str, root: Path, paths: list[Path]) -> None:
        """Log the files (that exist) as one artifact, each named by its path relative to the job folder."""
        import wandb

        art = wandb.Artifact(safe_name(name), type=kind)
        entries = []
        for path in paths:
            if path.is_file():
                entry = path.relative_to(root).as_posix()
                art.add_file(str(path), name=entry)
                entries.append(entry)
        self.run.log_artifact(art)
        self.artifacts.append(lineage.artifact_entry(art, entries))


class _InitFailed(Exception):
    """wandb.init itself failed (no network, bad key, server down): nothing was logged yet."""


def _folders(root: Path, run_id: str) -> list[Path]:
    """W&B's local folders of this run id (offline-run-*, and run-* an online start leaves)."""
    runs = root / RUNS
    return sorted(p for p in runs.glob(f"*-{run_id}") if p.is_dir()) if runs.is_dir() else []


@contextmanager
def _replacing(root: Path, run_id: str) -> Iterator[None]:
    """Set the earlier folders of `run_id` aside for the block; drop them if it succeeds, or drop what
    the block made (a run that failed half-way: the files it came from are on disk) and put them back
    if it fails."""
    aside = root / ASIDE
    moved = []
    for folder in _folders(root, run_id):
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / folder.name
        shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)
        moved.append(target)
    try:
        yield
    except BaseException:
        for folder in _folders(root, run_id):
            shutil.rmtree(folder, ignore_errors=True)
        for folder in moved:
            folder.rename(root / RUNS / folder.name)
        raise
    for folder in moved:
        shutil.rmtree(folder, ignore_errors=True)
    if aside.is_dir() and not any(aside.iterdir()):
        aside.rmdir()


def _run_once(cfg: Config, root: Path, mode: str, job_type: str, run_id: str, tags: list[str],
              config: dict[str, Any], fill: Callable[[Session], None]) -> tuple[str, Session]:
    """Open one run in `mode`, let `fill` log into it, close it; returns the run folder or URL."""
    w = cfg.wandb
    run = None
    with _environment(_wandb_env(root, mode)):
        import wandb

        try:
            root.mkdir(parents=True, exist_ok=True)
            try:
                run = wandb.init(
                    project=w.project, entity=w.entity, group=cfg.name, job_type=job_type, tags=tags,
                    name=f"{cfg.name}-{job_type}", id=run_id, resume="allow", config=config, dir=str(root),
                    reinit="create_new", settings=_settings(mode, w.init_timeout),
                )
            except Exception as e:  # noqa: BLE001 - any init failure means the same: try offline
                # The first two lines say what failed and where (the server's URL); later ones are W&B's advice.
                said = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
                raise _InitFailed(f"{type(e).__name__}: {said}") from e
            session = Session(run, offline=mode == "offline")
            fill(session)
            where = run.url if mode == "online" else str(Path(run.settings.sync_dir))
            run.finish()
            run = None
            return where, session
        finally:
            if run is not None:
                run.finish(exit_code=1)
            # Stop the W&B service: it keeps the environment it started with, and the next run
            # (another OUT, or the offline fallback) must not inherit this one's folders.
            wandb.teardown()


Inputs = tuple[list[lineage.InputArtifact], list[str]]


def log_run(cfg: Config, out: OutDir, job_type: str, fill: Callable[[Session], None], config: dict[str, Any],
            tags: Callable[[], list[str]], inputs: Callable[[], Inputs] = lambda: ([], [])) -> str | None:
    """Open the job folder's run (module docstring) with `config` and `tags()`, let `fill` log into it,
    declare the artifacts `inputs()` finds (`lineage.find_inputs`: the inputs and a line for each file
    without lineage), close it; never raises.

    Returns the offline run folder, the online URL, or None (disabled, or failed)."""
    mode = cfg.wandb.mode
    if mode == "disabled":
        return None
    root = out.wandb.resolve()
    record = lineage.read_record(out, job_type)
    run_id = record["run_id"] if record and record.get("run_id") else uuid.uuid4().hex[:12]
    found: list[lineage.InputArtifact] = []

    def filled(session: Session) -> None:
        fill(session)
        session.notes += lineage.use_inputs(session.run, found, session.offline)

    try:
        found, notes = inputs()
        tag_list = tags()
        if record is None:  # before the run starts: a driver killed while logging leaves a folder of this id
            lineage.write_record(out, job_type, {"run_id": run_id, "mode": mode, "where": None}, [], [])
        with _replacing(root, run_id):
            used = mode
            if mode == "online":
                started = time.perf_counter()
                try:
                    where, session = _run_once(cfg, root, "online", job_type, run_id, tag_list, config, filled)
                except _InitFailed as e:
                    waited = time.perf_counter() - started
                    for stray in _folders(root, run_id):  # what the failed online start left behind
                        shutil.rmtree(stray, ignore_errors=True)
                    used = "offline"
                    where, session = _run_once(cfg, root, "offline", job_type, run_id, tag_list, config, filled)
                    print(f"WARNING: W&B online run could not start after {waited:.0f} s (wandb.init_timeout = "
                          f"{cfg.wandb.init_timeout:g} s; {e}). Logged it offline instead; upload it with: "
                          f"wandb sync {' '.join(lineage.sync_order(found, where))}", file=sys.stderr)
            else:
                where, session = _run_once(cfg, root, mode, job_type, run_id, tag_list, config, filled)
        lineage.write_record(out, job_type, {"run_id": run_id, "mode": used, "where": where,
                                             "project": cfg.wandb.project, "entity": cfg.wandb.entity},
                             session.artifacts, found)
    except Exception as e:  # noqa: BLE001 - tracking must never cost the computed results
        print(
            f"WARNING: W&B logging failed ({type(e).__name__}: {e}). Nothing is lost: every result is on disk "
            f"in {out.root}. Re-log it with: {relog_hint(out)}",
            file=sys.stderr,
        )
        return None
    for line in dict.fromkeys(notes + session.notes):
        print(line, file=sys.stderr)
    if used == mode:
        hint = f" (upload with: wandb sync {' '.join(lineage.sync_order(found, where))})" if used == "offline" else ""
        print(f"W&B {job_type} run ({used}): {where}{hint}")
    return where
