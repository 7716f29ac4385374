"""The processes of a local Ray this driver started, recorded in OUT so that none outlive a killed driver.

Ray's head processes share the driver's fate, but a few grandchildren (the dashboard and runtime-env
agents) do not: after a SIGKILL of the driver they keep running under init (their check of the raylet
waits on the GCS, which died with it). So the driver writes its Ray's processes (pid, start time,
command line: the head processes `ray.init` started and everything below them) to
OUT/.ray_processes.json once they are up, and again once its workers are, and a `Watchdog` stops those
still alive the moment the driver ends, however it ends: a small process in its own session that waits
on a pipe only the driver holds open, which the kernel closes when the driver dies. Should the watchdog
be killed too, whoever next opens that folder (`--resume`, a new run) stops them (`stop_recorded`). A
pid is only signalled while its start time is still the recorded one: pids are reused, and a process
that merely got a recorded number is left alone. (The command line is kept for people reading the
record, not compared: Ray workers rewrite theirs as they take on work.)

This module imports only psutil at the top, so the watchdog (`python -m jobs.runtime.local_ray`)
starts light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

GRACE_S = 2.0  # SIGTERM first; the agents ignore it while their raylet is gone, hence the SIGKILL after


def _describe(proc: psutil.Process) -> dict | None:
    try:
        with proc.oneshot():
            return {"pid": proc.pid, "create_time": proc.create_time(), "cmdline": proc.cmdline()}
    except psutil.Error:
        return None


def local_ray_processes() -> list[dict]:
    """The processes of the Ray this process started (its head processes and all below them), as entries.

    Only those: the driver may have other children (a test runner certainly does) that are not Ray's.
    """
    import ray._private.worker as ray_worker

    node = ray_worker._global_node  # set by ray.init when it started the node itself
    if node is None:
        return []
    found: dict[int, psutil.Process] = {}
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                found.update({p.pid: p for p in (root, *root.children(recursive=True))})
            except psutil.Error:
                continue
    return [d for d in map(_describe, found.values()) if d is not None]


def record(path: Path) -> list[dict]:
    """Add the local Ray's current processes to the record at `path` (workers appear as they start)."""
    from jobs.runtime.storage import write_json_atomic

    entries = {(e["pid"], e["create_time"]): e for e in _read(path)}
    entries.update({(e["pid"], e["create_time"]): e for e in local_ray_processes()})
    found = list(entries.values())
    write_json_atomic({"driver_pid": os.getpid(), "processes": found}, path)
    return found


def _read(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text())["processes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _still_recorded(entry: dict) -> psutil.Process | None:
    """The live process that is exactly the recorded one (same pid and start time), or None."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(proc.create_time() - float(entry["create_time"])) > 0.01:  # ticks are 10 ms
                return None
        return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def stop_recorded(path: Path) -> list[int]:
    """Stop the recorded processes still alive (and only those); delete the record; return their pids."""
    procs = [p for p in map(_still_recorded, _read(path)) if p is not None]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)
    path.unlink(missing_ok=True)
    return [p.pid for p in procs]


class Watchdog:
    """Stops the processes recorded at `path` once this driver ends, even by SIGKILL (module docstring).

    `close()` is for a driver that stopped its Ray itself (the record is gone): the watchdog then finds
    nothing to do and exits; the driver waits for that, so no process of its own outlives it.
    """

    def __init__(self, path: Path):
        read_end, self._pipe = os.pipe()  # not inherited: Ray's processes must not hold the pipe open
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(path), str(os.getpid())],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                cwd=Path(__file__).resolve().parents[2])
        except BaseException:
            os.close(self._pipe)
            raise
        finally:
            os.close(read_end)

    def close(self, timeout: float = 30.0) -> None:
        if self._pipe is None:
            return
        os.close(self._pipe)
        self._pipe = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _watch(path: Path, driver_pid: int) -> None:
    """The watchdog's life: wait for the driver's end (the pipe on stdin closes), then stop what the
    driver recorded, if the record is still the driver's (a later driver in the folder writes its own)."""
    sys.stdin.buffer.read()
    try:
        driver = json.loads(path.read_text()).get("driver_pid")
    except (OSError, ValueError, AttributeError):
        return
    if driver == driver_pid:
        stop_recorded(path)


if __name__ == "__main__":
    _watch(Path(sys.argv[1]), int(sys.argv[2]))
