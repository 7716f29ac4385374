"""What every sharded, resumable job (sweep, discover, generate) does with its output folder, written once.

A job holds OUT's lock for its whole run (one driver per folder), turns SIGINT/SIGTERM, and shards that
failed on every attempt, into one exception that says how many shards are on disk and the exact command
that resumes, cleans up after a driver that was killed in the folder (its local Ray, its temp files),
and on `--resume` trusts a shard file only when it matches the manifest's record (size, rows, SHA-256):
any other goes back to pending and is recomputed. What the shards hold, and how a job plans and finishes them, is the job's
own (jobs.sweep, jobs.discover, jobs.generate).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from jobs.runtime import local_ray
from jobs.errors import InputError, ShardFailed
from jobs.runtime.interrupt import Interrupted, signal_number, stop_on_signals
from jobs.runtime.lock import OutLock
from jobs.runtime.storage import OutDir, verify_shards


@dataclass(frozen=True)
class Standing:
    """Where a stopped job stands: its shards on disk in `out`, and the `--out` that continues it."""

    out: OutDir
    on_disk: int
    total: int
    resume_out: Path

    def line(self, argv: list[str]) -> str:
        return (f"{self.on_disk} of {self.total} shards are on disk in {self.out.root}; "
                f"continue with: {resume_command(argv, self.resume_out)}")


class JobInterrupted(Interrupted):
    """SIGINT/SIGTERM stopped the job after cleanup; what is on disk stays, `--resume` continues."""

    def __init__(self, signum: int, standing: Standing):
        super().__init__(signum)
        self.standing = standing

    def line(self, argv: list[str]) -> str:
        """The one line the command line prints: shards on disk and the exact command that resumes."""
        return f"interrupted by {self.args[0]}: {self.standing.line(argv)}"


class JobFailed(RuntimeError):
    """Shards failed on every attempt, or no worker is left (`jobs.errors.ShardFailed`): not bad input
    and not a bug in the job, so one line, not a traceback; what is on disk stays, `--resume` continues."""

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
    """A job's hold on OUT: its lock, and the manifest and shard count once the job knows them."""

    out: OutDir
    lock: OutLock
    manifest: dict = field(default_factory=dict)
    total: int = 0

    @property
    def on_disk(self) -> int:
        return sum(entry.get("status") == "done" for entry in self.manifest.get("shards", {}).values())


@contextmanager
def running(out: OutDir, resume_out: Path | None = None) -> Iterator[JobRun]:
    """Hold OUT's lock for the block, with SIGINT/SIGTERM raising `JobInterrupted` and shards that fail
    past their retries `JobFailed` (both say what is on disk, and resume with `--out resume_out`, default
    OUT).

    A second driver into the same folder is refused at once. An input error that leaves nothing but the
    lock in a folder this call created removes the folder again (a refused job leaves no empty folder).
    """
    existed = out.root.exists()
    run: JobRun | None = None

    def standing() -> Standing:
        return Standing(out, run.on_disk if run else 0, run.total if run else 0, resume_out or out.root)

    with stop_on_signals():
        try:
            with OutLock(out.lock) as lock:
                run = JobRun(out, lock)
                try:
                    yield run
                except InputError:
                    if not existed and all(p.name == out.lock.name for p in out.root.iterdir()):
                        lock.release()
                        out.root.rmdir()
                    raise
        except KeyboardInterrupt as e:
            raise JobInterrupted(signal_number(e), standing()) from None
        except ShardFailed as e:
            raise JobFailed(str(e), standing()) from e


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
