"""The processes of a local Ray this driver started, recorded in OUT so that none outlive a killed driver.

Ray's head processes share the driver's fate, but a few grandchildren (the dashboard and runtime-env
agents) do not: after a SIGKILL of the driver they keep running under init. So the driver writes its
Ray's processes (pid, start time, command line: the head processes `ray.init` started and everything
below them) to OUT/.ray_processes.json once they are up, and again once its workers are, and whoever
next opens that folder (`--resume`, a new run) stops those still alive. A pid is only signalled while
its start time is still the recorded one: pids are reused, and a process that merely got a recorded
number is left alone. (The command line is kept for people reading the record, not compared: Ray
workers rewrite theirs as they take on work.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from jobs.runtime.storage import write_json_atomic

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
