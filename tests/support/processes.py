"""Which processes a test saw, and whether any of them is still running (by pid and start time)."""

from __future__ import annotations

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """`pid` and every process below it, as they are now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def still_running(procs: list[psutil.Process]) -> list[str]:
    """The processes of `procs` still alive: same pid and start time (psutil checks both), not a zombie."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return alive


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
