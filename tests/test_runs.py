"""Re-runs just work (jobs.runs): without --out every run gets a new folder, runs/latest finds the last one,
--resume continues it, and a folder --out names still refuses a second job.

Every test runs in a fresh working folder of its own (conftest), so `runs/` here is the test's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import jobs.sweep
import launch
from jobs.config import load_config
from jobs.errors import InputError
from jobs.runs import choose, next_folder, place, series
from jobs.runtime.storage import OutDir

RUNS = Path("runs")


def test_series_numbers_after_the_highest_and_ignores_other_names():
    assert next_folder("default") == RUNS / "default"  # no runs/ yet: nothing is created to find that out
    assert not RUNS.exists()
    for name in ("default", "default-3", "default-1", "default-x", "default-generate", "defaults-7", "default-02"):
        (RUNS / name).mkdir(parents=True)
    (RUNS / "default-9").write_text("a file, not a run")
    assert series("default") == {1: RUNS / "default", 3: RUNS / "default-3"}
    assert next_folder("default") == RUNS / "default-4"  # after the highest: a deleted run-2 is not reused
    assert next_folder("default-generate") == RUNS / "default-generate-2"
    assert next_folder("other") == RUNS / "other"


def test_resume_takes_the_latest_folder_holding_the_job():
    for name, marker in (("default", "manifest.json"), ("default-2", "discovery/manifest.json"), ("default-3", None)):
        (RUNS / name).mkdir(parents=True)
        if marker:
            (RUNS / name / marker).parent.mkdir(parents=True, exist_ok=True)
            (RUNS / name / marker).write_text("{}")
    sweep = choose("default", "sweep", True, "manifest.json")
    assert (sweep.path, sweep.continued) == (RUNS / "default", True)
    assert choose("default", "discover", True, "discovery/manifest.json").path == RUNS / "default-2"
    assert choose("default", "sweep", False, "manifest.json").path == RUNS / "default-4"
    with pytest.raises(InputError, match=r"^--resume: no generate to continue in runs/default-generate or "
                                         r"runs/default-generate-N \(none holds manifest.json\); drop --resume"):
        choose("default-generate", "generate", True, "manifest.json")


def test_each_job_has_its_series_and_reads_the_config_out_only_where_it_is_its_own():
    cfg = load_config(None, [], default_out=False)  # configs/default.yaml: name default, no out
    assert cfg.out is None
    expected = {"sweep": "runs/default", "discover": "runs/default", "compare": "runs/default",
                "generate": "runs/default-generate", "weight-diff": "runs/weight_diff"}
    for job, out in expected.items():
        placed, folder = place(cfg, None, job)
        assert placed.out == out and folder.path == Path(out), job
        assert place(cfg, "elsewhere", job) == (cfg.replace(out="elsewhere"), None)
    own = cfg.replace(out="mine")
    assert place(own, None, "sweep")[0].out == "mine" and place(own, None, "discover")[0].out == "mine"
    assert place(own, None, "generate")[0].out == "runs/default-generate"  # a sweep's out is not generate's


def test_the_latest_link_follows_the_job_that_made_its_folder():
    first = choose("d", "sweep", False, "manifest.json")
    with first.linked():  # runs/ does not exist until the job makes its folder: the link comes after
        first.path.mkdir(parents=True)
    assert os.readlink(RUNS / "latest") == "d"
    second = choose("d", "sweep", False, "manifest.json")
    with pytest.raises(InputError):
        with second.linked():
            assert os.readlink(RUNS / "latest") == "d-2"  # while it runs
            raise InputError("bad input: the job made no folder")
    assert os.readlink(RUNS / "latest") == "d" and not second.path.exists()  # as it was
    (RUNS / "latest").unlink()
    (RUNS / "latest").mkdir()  # somebody's own folder of that name is not ours to replace
    with second.linked():
        second.path.mkdir()
    assert (RUNS / "latest").is_dir() and not (RUNS / "latest").is_symlink()


class _FakeSweep:
    """`jobs.sweep.run_sweep` as far as the command line sees it: it makes its folder and a sweep's manifest
    (what the sweep itself writes is tested in test_sweep.py); records where it ran."""

    def __init__(self):
        self.ran: list[tuple[str, bool]] = []

    def __call__(self, cfg, resume=False, config_file=None):
        self.ran.append((cfg.out, resume))
        out = OutDir(cfg.out)
        out.root.mkdir(parents=True, exist_ok=True)
        out.manifest.write_text(json.dumps({"job": "sweep", "config": cfg.to_dict(), "shards": {}}))
        return SimpleNamespace(lines=lambda: [f"summary:  {out.summary}"])


def test_the_same_command_twice_then_resume_then_an_explicit_out(monkeypatch, capsys):
    """The README's loop through the command line: run, run again (a new folder, announced, linked),
    --resume (the latest), and an explicit --out holding a finished sweep refused in one line offering
    --resume or a new folder, before the job is called."""
    fake = _FakeSweep()
    monkeypatch.setattr(jobs.sweep, "run_sweep", fake)

    def sweep(*extra: str) -> tuple[int, list[str], str]:
        code = launch.main(["--sweep", "--set", "name=tiny", *extra])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err

    assert sweep() == (0, ["run folder: runs/tiny (a new run folder; runs/latest links to the latest run)",
                           "summary:  runs/tiny/summary.parquet"], "")
    assert sweep() == (0, ["run folder: runs/tiny-2 (a new run folder; runs/latest links to the latest run)",
                           "summary:  runs/tiny-2/summary.parquet"], "")
    assert os.readlink(RUNS / "latest") == "tiny-2"
    code, out, _ = sweep("--resume")
    assert code == 0 and out[0] == ("run folder: runs/tiny-2 (the latest sweep of this name, continued; "
                                    "runs/latest links to the latest run)")
    assert fake.ran == [("runs/tiny", False), ("runs/tiny-2", False), ("runs/tiny-2", True)]
    assert sweep("--out", "runs/tiny") == (2, [], (
        "error: runs/tiny already holds the output of a sweep job; pass --resume to continue it, choose another "
        "--out, or drop --out for a new run folder\n"))
    assert len(fake.ran) == 3 and os.readlink(RUNS / "latest") == "tiny-2"


def test_resume_without_a_run_to_continue_is_one_line_for_every_resumable_job(capsys):
    for job, series_name in (("--sweep", "runs/default"), ("--discover", "runs/default"),
                             ("--generate", "runs/default-generate")):
        assert launch.main([job, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume: no {job[2:]} to continue in {series_name} or {series_name}-N"), err
        assert err.count("\n") == 1
    assert not RUNS.exists()
