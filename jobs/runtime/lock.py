"""One writer per output folder: OUT/.lock names the driver (its job, pid, host) and holds an OS lock while
it runs.

The OS lock (`flock`) is what excludes a second driver, and the kernel drops it when its holder dies
however it dies, so a lock file left by a killed driver is recognised as stale by simply being lockable
again. The job, pid and host inside are for the message a refused second driver prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jobs.errors import InputError


class OutLocked(InputError):
    """Another live process is writing the same output folder."""


def _holder(text: str) -> str:
    """Who wrote a lock file: 'a sweep job, pid 12 on host h (started ...)' (lock files of drivers before
    the job was recorded name no job)."""
    try:
        info = json.loads(text)
        who = f"pid {info['pid']} on host {info['host']} (started {info['started']})"
        return f"a {info['job']} job, {who}" if info.get("job") else who
    except (ValueError, KeyError, TypeError, AttributeError):
        return "another process"


def _locked(path: Path, fd: int) -> OutLocked:
    held_by = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    return OutLocked(f"{path.parent} is in use by {held_by}, lock file {path}. "
                     "Wait for it to finish (or stop it), or choose another --out")


def refuse_if_locked(path: Path) -> None:
    """Raise OutLocked at once when a live process holds the lock at `path`; creates nothing.

    For checks made before a job takes its lock (which it does only once its inputs are valid), so a
    second driver is refused before it spends any work. Taking the lock stays the real exclusion.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none we can open): nobody holds it, or acquire() will say why
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _locked(Path(path), fd) from None
    finally:
        os.close(fd)


class OutLock:
    """`with OutLock(path, job):` holds the folder's lock for a `job` driver, or raises OutLocked at once
    (never waits).

    `stale` is the holder description of a lock file found from a process that no longer runs.
    """

    def __init__(self, path: Path, job: str):
        self.path = Path(path)
        self.job = job
        self.fd: int | None = None
        self.stale: str | None = None

    def acquire(self) -> OutLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = _locked(self.path, fd)
                os.close(fd)
                raise error from None
            # The holder we waited on may have unlinked the file before we locked it: retry on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        self.stale = _holder(old) if old else None
        info = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a fresh file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
