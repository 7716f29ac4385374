"""What every job does with OUT (`jobs.runtime.resumable.running`), without a model or Ray.

The real faults (signals, killed workers, lost nodes) are in test_faults.py and test_cluster.py, and a
real full disk in test_bad_input.py; here, the lines the command line prints when a job stops, which OS
errors are such a stop and which stay a traceback, and the folder a refused job leaves behind.
"""

from __future__ import annotations

import errno
import sys

import pytest

import jobs.sweep
import launch
from jobs.errors import InputError, ShardFailed, WriteFailed
from jobs.runtime.resumable import JobFailed, running
from jobs.runtime.storage import OutDir

ARGV = ["launch.py", "--sweep", "--set", "prompts.n=8"]


def _half_done(job, total: int = 4, done: int = 2) -> None:
    job.total = total
    job.manifest = {"shards": {f"s{i}": {"status": "done" if i < done else "pending"} for i in range(total)}}


def test_shards_that_fail_every_attempt_end_with_one_line_and_the_resume_command(tmp_path):
    out = OutDir(tmp_path / "OUT")
    with pytest.raises(JobFailed) as info:
        with running(out, "sweep") as job:
            _half_done(job)
            raise ShardFailed("shard s2 failed on all 3 attempts; last on node ab12 (host h): worker died")
    line = info.value.line(ARGV)
    assert line == (f"shard s2 failed on all 3 attempts; last on node ab12 (host h): worker died; 2 of 4 shards are on "
                    f"disk in {out.root}; continue with: {sys.executable} launch.py --sweep --set prompts.n=8 "
                    f"--resume --out {out.root}")
    assert info.value.exit_code == 1
    with running(out, "sweep") as again:  # the lock was released: the resume can take it
        assert again.lock


def test_a_discovery_resumes_with_the_folder_above_its_own(tmp_path):
    out = OutDir(tmp_path / "OUT" / "discovery")
    with pytest.raises(JobFailed) as info:
        with running(out, "discover", resume_out=out.root.parent) as job:
            _half_done(job, 5, 1)
            raise ShardFailed("no worker left to run 4 shards (every actor is dead)")
    assert info.value.line(ARGV).endswith(f"1 of 5 shards are on disk in {out.root}; continue with: {sys.executable} "
                                          f"launch.py --sweep --set prompts.n=8 --resume --out {out.root.parent}")


def test_a_refused_job_leaves_no_folder_it_created_and_keeps_one_that_existed(tmp_path):
    new, old = OutDir(tmp_path / "new"), OutDir(tmp_path / "old")
    old.root.mkdir()
    for out in (new, old):
        with pytest.raises(InputError):
            with running(out, "sweep"):
                raise InputError("model.path 'x': no such folder")
    assert not new.root.exists()
    assert old.root.is_dir()


def test_the_command_line_prints_a_failed_job_as_one_line(tmp_path, monkeypatch, capsys):
    out = OutDir(tmp_path / "OUT")

    def fails(cfg, resume=False, config_file=None):
        with running(out, "sweep") as job:
            _half_done(job, 6, 3)
            raise ShardFailed("shard m0-p1-c0 failed on all 2 attempts; last on node n (host h): died")

    monkeypatch.setattr(jobs.sweep, "run_sweep", fails)
    code = launch.main(["--sweep", "--set", "wandb.mode=disabled", "--out", str(out.root)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("shard m0-p1-c0 failed on all 2 attempts") and "3 of 6 shards are on disk" in err
    assert err.rstrip().endswith(f"--resume --out {out.root}")


@pytest.mark.parametrize("error", [
    WriteFailed("OUT/figures", "File too large"),
    OSError(errno.ENOSPC, "No space left on device", "OUT/results/s2.parquet"),
])
def test_a_folder_that_cannot_be_written_ends_like_failed_shards(tmp_path, error):
    """A full disk or a file over the size limit is the machine's doing: one line, what is on disk, the
    command that resumes; a job without shards says that nothing of it is kept."""
    out = OutDir(tmp_path / "OUT")
    with pytest.raises(JobFailed) as info:
        with running(out, "sweep") as job:
            _half_done(job)
            raise error
    line = info.value.line(ARGV)
    assert line.startswith("cannot write OUT/figures: File too large; " if isinstance(error, WriteFailed)
                           else "No space left on device: OUT/results/s2.parquet; ")
    assert line.endswith(f"2 of 4 shards are on disk in {out.root}; continue with: {sys.executable} launch.py --sweep "
                         f"--set prompts.n=8 --resume --out {out.root}")
    with pytest.raises(JobFailed) as info:
        with running(OutDir(tmp_path / "OUT" / "compare"), "compare", resume_out=out.root):
            raise error
    assert f"{out.root}/compare holds no finished result (this job has no shards); run it again with: " in \
        info.value.line(ARGV)


def test_other_os_errors_stay_tracebacks(tmp_path):
    """A missing file is no state of the machine a resume could fix: it may be a bug, so it is not hidden."""
    with pytest.raises(FileNotFoundError):
        with running(OutDir(tmp_path / "OUT"), "sweep"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "somewhere")


def test_a_folder_the_os_refuses_to_create_is_bad_input(tmp_path, monkeypatch):
    """EPERM at mkdir (as under /sys, which os.access calls writable for root) is one line, and nothing made."""
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = OutDir(tmp_path / "OUT")
    with pytest.raises(InputError, match=rf"^output folder {out.root} cannot be created: Operation not permitted "
                                         rf"\({out.root}\); choose another --out$"):
        with running(out, "sweep"):
            pass
    assert not out.root.exists()
