"""What every job (sweep, discover, generate, compare, weight diff) does with its output folder, written once.

A job holds OUT's lock for its whole run (one driver per folder), turns SIGINT/SIGTERM, shards that
failed on every attempt and an output folder that could not be written (a full disk, a file over the
size limit) into one exception that says what is on disk and the exact command that resumes, cleans
up after a driver that was killed in the folder (its local Ray, its temp files), and on `--resume`
trusts a shard file only when it matches the manifest's record (size, rows, SHA-256): any other goes
back to pending and is recomputed. What the shards hold, and how a job plans and finishes them, is the
job's own (jobs.sweep, jobs.discover, jobs.generate); compare and weight diff have no shards, and
`--resume` computes them again with the configuration their folder was started with.
"""

from __future__ import annotations

import errno
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from jobs import config as config_mod
from jobs.config import Config
from jobs.errors import InputError, ShardFailed, WriteFailed
from jobs.runtime import local_ray
from jobs.runtime.interrupt import Interrupted, signal_number, stop_on_signals
from jobs.runtime.lock import OutLock
from jobs.runtime.storage import OutDir, package_versions, read_manifest, verify_shards, write_json_atomic


# OS errors that are the machine's state, not a bug: a job stopped by one resumes once it is fixed.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


@dataclass(frozen=True)
class Standing:
    """Where a stopped job stands: its shards on disk in `out` (`total` None: a job without shards), and
    the `--out` that continues it."""

    out: OutDir
    on_disk: int
    total: int | None
    resume_out: Path

    def line(self, argv: list[str]) -> str:
        command = resume_command(argv, self.resume_out)
        if self.total is None:
            return f"{self.out.root} holds no finished result (this job has no shards); run it again with: {command}"
        return f"{self.on_disk} of {self.total} shards are on disk in {self.out.root}; continue with: {command}"


class JobInterrupted(Interrupted):
    """SIGINT/SIGTERM stopped the job after cleanup; what is on disk stays, `--resume` continues."""

    def __init__(self, signum: int, standing: Standing):
        super().__init__(signum)
        self.standing = standing

    def line(self, argv: list[str]) -> str:
        """The one line the command line prints: shards on disk and the exact command that resumes."""
        return f"interrupted by {self.args[0]}: {self.standing.line(argv)}"


class JobFailed(RuntimeError):
    """Shards failed on every attempt, no worker is left (`jobs.errors.ShardFailed`), or OUT could not be
    written (`jobs.errors.WriteFailed`, an OS error of MACHINE_ERRNOS): not bad input and not a bug in the
    job, so one line, not a traceback; what is on disk stays, `--resume` continues."""

    exit_code = 1

    def __init__(self, cause: str, standing: Standing):
        super().__init__(cause)
        self.standing = standing

    def line(self, argv: list[str]) -> str:
        return f"{self.args[0]}; {self.standing.line(argv)}"


def resume_command(argv: list[str], out) -> str:
    """`argv` (program first) with `--resume` and `--out OUT`, ready to paste into a shell."""
    args, rest, i = [], list(argv[1:]), 0
    while i < len(rest):  # drop any earlier --out/--resume, then add them back explicitly
        if rest[i] == "--out":
            i += 2
            continue
        if rest[i] != "--resume" and not rest[i].startswith("--out="):
            args.append(rest[i])
        i += 1
    return shlex.join([sys.executable or "python", argv[0], *args, "--resume", "--out", str(out)])


@dataclass
class JobRun:
    """A job's hold on OUT: its lock, and the manifest and shard count once the job knows them (`total`
    stays None for a job without shards)."""

    out: OutDir
    lock: OutLock
    manifest: dict = field(default_factory=dict)
    total: int | None = None

    @property
    def on_disk(self) -> int:
        return sum(entry.get("status") == "done" for entry in self.manifest.get("shards", {}).values())


def _take_lock(out: OutDir, job: str) -> OutLock:
    """OUT's lock; a folder the OS refuses to create (EPERM under /sys, a read-only disk) is bad input."""
    try:
        return OutLock(out.lock, job).acquire()
    except OSError as e:
        raise InputError(f"output folder {out.root} cannot be created: {e.strerror or e}"
                         f"{f' ({e.filename})' if e.filename else ''}; choose another --out") from None


@contextmanager
def running(out: OutDir, job: str, resume_out: Path | None = None) -> Iterator[JobRun]:
    """Hold OUT's lock for the block as a `job` driver, with SIGINT/SIGTERM raising `JobInterrupted`, and
    shards that fail past their retries or an OS error writing OUT `JobFailed` (both say what is on disk,
    and resume with `--out resume_out`, default OUT).

    A second driver into the same folder is refused at once. An input error that leaves nothing but the
    lock in a folder this call created removes the folder again (a refused job leaves no empty folder).
    """
    existed = out.root.exists()
    run: JobRun | None = None

    def standing() -> Standing:
        return Standing(out, run.on_disk if run else 0, run.total if run else None, resume_out or out.root)

    with stop_on_signals():
        try:
            lock = _take_lock(out, job)
            try:
                run = JobRun(out, lock)
                yield run
            except InputError:
                if not existed and all(p.name == out.lock.name for p in out.root.iterdir()):
                    lock.release()
                    out.root.rmdir()
                raise
            finally:
                lock.release()
        except KeyboardInterrupt as e:
            raise JobInterrupted(signal_number(e), standing()) from None
        except (ShardFailed, WriteFailed) as e:
            raise JobFailed(str(e), standing()) from e
        except OSError as e:
            if e.errno not in MACHINE_ERRNOS:
                raise
            raise JobFailed(f"{e.strerror}{f': {e.filename}' if e.filename else ''}", standing()) from e


def recover(out: OutDir, lock: OutLock) -> None:
    """Clean up after a driver that was killed in this folder: its lock, its local Ray, its temp files."""
    if lock.stale:
        print(f"{out.root}: taking over the lock of {lock.stale}, which no longer runs", file=sys.stderr)
    stopped = local_ray.stop_recorded(out.ray_processes)
    if stopped:
        print(f"{out.root}: stopped {len(stopped)} Ray processes left running by an earlier driver "
              f"(pids {' '.join(map(str, stopped))})", file=sys.stderr)
    out.remove_temp_files()


def reset_untrusted(out: OutDir, manifest: dict, keep: Sequence[str]) -> dict[str, str]:
    """Shard files that do not match their manifest record go back to pending (their file deleted).

    `keep` names the planning keys of a shard entry that stay; returns {shard id: what was wrong}.
    """
    _, bad = verify_shards(out, manifest)
    for shard_id, problem in bad.items():
        print(f"shard {shard_id}: {problem}; it will be recomputed", file=sys.stderr)
        entry = manifest["shards"][shard_id]
        manifest["shards"][shard_id] = {k: v for k, v in entry.items() if k in keep} | {"status": "pending"}
        out.shard(shard_id).unlink(missing_ok=True)
    return bad


# --------------------------------------------------------------------------------------------
# jobs without shards (compare, weight diff)
# --------------------------------------------------------------------------------------------


def refuse_changed_config(out: OutDir, cfg: Config, neutral: tuple[str, ...]) -> None:
    """On --resume the config must be the one OUT was started with, in every key not `neutral`: a job
    resumed with other settings would leave OUT holding results of two configs (or replace one's)."""
    if not out.manifest.exists():
        return
    diffs = config_mod.config_differences(read_manifest(out)["config"], cfg, neutral)
    if diffs:
        raise InputError(f"--resume: the config differs from the one {out.root} was started with: " + "; ".join(diffs))


def open_unsharded(out: OutDir, job: str, cfg: Config) -> dict:
    """The manifest of a job without shards: the folder's (on --resume; the job computes everything
    again, with the same config: `refuse_changed_config`), or a new one, written before any result."""
    if out.manifest.exists():
        manifest = read_manifest(out)
        manifest.pop("finished", None)
        return manifest
    manifest = {"job": job, "config": cfg.to_dict(), "versions": package_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": {}}
    write_json_atomic(manifest, out.manifest)
    return manifest


def finish(out: OutDir, manifest: dict, **timing: object) -> None:
    """Mark a job's manifest finished, with this run's timings, once everything it writes is written."""
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["timing"] = timing
    write_json_atomic(manifest, out.manifest)
