"""The session's guard against tests that write into the checkout (tests.support.worktree), on a scratch git
repository laid out like this one: it must see an ignored run folder, a new file and an edited one, and
must not count caches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.worktree import repo_state, writes


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def test_ignored_new_and_edited_paths_count_caches_do_not(tmp_path):
    root = tmp_path / "checkout"
    (root / "jobs").mkdir(parents=True)
    (root / ".gitignore").write_text("/runs/\n__pycache__/\n.venv/\n")
    (root / "jobs" / "sweep.py").write_text("x = 1\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    (root / "runs" / "default").mkdir(parents=True)  # a run folder from before: not a test's doing
    (root / "runs" / "default" / "manifest.json").write_text("{}")
    before = repo_state(root)
    assert writes(before, repo_state(root)) == []

    (root / "jobs" / "__pycache__").mkdir()
    (root / "jobs" / "__pycache__" / "sweep.pyc").write_bytes(b"\0")
    (root / ".venv").mkdir()
    (root / ".venv" / "x").write_text("x")
    assert writes(before, repo_state(root)) == []

    new = root / "runs" / "default-2" / "manifest.json"  # ignored, inside a listed ignored folder
    new.parent.mkdir()
    new.write_text("{}")
    os.utime(new, ns=(1, 2**62))  # a later time than anything above, whatever the file system's clock grain
    assert writes(before, repo_state(root)) == ["runs/ (changed)"]

    (root / "jobs" / "sweep.py").write_text("x = 2\n")
    (root / "notes.txt").write_text("mine\n")
    assert writes(before, repo_state(root)) == ["jobs/sweep.py (new or edited)", "notes.txt (new or edited)", "runs/ (changed)"]


def test_outside_a_checkout_there_is_nothing_to_compare(tmp_path):
    assert repo_state(tmp_path) is None
