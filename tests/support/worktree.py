"""What a test session may not do: write into the checkout it tests.

A test that runs a job on a default path (`runs/<name>`), or leaves a file beside the code, makes the
next command depend on it (the README's main command and then the suite, in either order). The session
records what git sees before and after (changed, untracked and ignored paths, with their newest
modification time) and fails if anything differs. Ignored paths count too: `runs/` is ignored, and a
job that wrote there is the bug this guards against. Environments and caches are left out (.venv,
__pycache__, .pytest_cache, *.egg-info): running the tests legitimately touches them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

EXEMPT = {".venv", "__pycache__", ".pytest_cache"}


def _exempt(rel: str) -> bool:
    return any(part in EXEMPT or part.endswith(".egg-info") for part in Path(rel).parts)


def _newest(path: Path) -> int:
    """The newest modification time at or below `path` (a folder git lists as one entry), exempt parts skipped."""
    try:
        newest = path.lstat().st_mtime_ns
    except OSError:
        return -1  # listed by git, gone since: still a difference from a state where it was not listed
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in EXEMPT and not d.endswith(".egg-info")]
            for name in [*dirs, *files]:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime_ns)
                except OSError:
                    pass
    return newest


def repo_state(root: Path) -> dict[str, tuple[str, int]] | None:
    """{path: (git's status code, newest modification time)} of every changed, untracked or ignored path of
    the checkout at `root` (ignored and untracked folders as one entry each); None outside a git checkout."""
    proc = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--ignored", "--untracked-files=normal"],
                          cwd=root, capture_output=True)
    if proc.returncode != 0:
        return None
    entries = proc.stdout.decode(errors="surrogateescape").split("\0")
    state, i = {}, 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, rel = entry[:2], entry[3:]
        if code[0] in "RC":
            i += 1  # a rename's or copy's source path follows it
        if not _exempt(rel):
            state[rel] = (code, _newest(root / rel))
    return state


def writes(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> list[str]:
    """The paths whose git status or contents changed between two `repo_state`s, each with what happened."""
    found = []
    for rel in sorted(set(before) | set(after)):
        if rel not in before:
            found.append(f"{rel} (new or edited)")
        elif rel not in after:
            found.append(f"{rel} (no longer listed: removed or restored)")
        elif before[rel] != after[rel]:
            found.append(f"{rel} (changed)")
    return found
