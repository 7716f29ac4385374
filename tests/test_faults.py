"""Real faults from outside, on drivers started as a user starts them (`python launch.py --sweep`).

Four drivers run at once, each on its own local Ray and output folder. As soon as one has a shard on
disk its worker process (the pid the manifest records for that shard) is frozen with SIGSTOP: the
sweep is then certainly mid-way, with a shard in flight on a hung worker, when the test delivers its
fault: SIGINT to the driver alone, Ctrl-C to its process group, SIGTERM, or SIGKILL followed by
`--resume`. Every process of the driver's tree, snapshotted before the fault, must be gone afterwards
(pid and start time, so a reused pid does not count): after a SIGKILL too, by the driver's watchdog
(`jobs.runtime.local_ray.Watchdog`), whose mechanism, and the next run's fallback should it be killed
as well, are also tested without Ray.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from jobs.runtime.lock import OutLock, OutLocked
from jobs.runtime.resumable import recover
from jobs.runtime.storage import TMP_MARK, OutDir
from jobs.sweep import run_sweep
from tests.support.processes import kill_all, still_running, tree
from tests.support.sweeps import REPO, N_SHARDS, assert_same_results, done_shards, manifest, start_driver, sweep_cfg

FAULTS = ("sigint", "ctrl_c", "sigterm", "sigkill")
LINE = re.compile(
    r"^interrupted by (SIGINT|SIGTERM): (\d) of 6 shards are on disk in (\S+); continue with: (.+ --resume --out \S+)$"
)


@dataclass
class Frozen:
    """A driver stopped mid-sweep: its process, output folder, the frozen worker and its process tree."""

    proc: subprocess.Popen
    out: Path
    worker: int = 0
    procs: list[psutil.Process] | None = None


@pytest.fixture(scope="module")
def frozen(sweep_model_dir, tmp_path_factory):
    """The four drivers, each frozen mid-sweep (see the module docstring)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    root = tmp_path_factory.mktemp("faults")
    runs = {f: Frozen(start_driver(sweep_model_dir, root / f, ray_tmp, "ray.workers=1"), root / f) for f in FAULTS}
    try:
        deadline = time.monotonic() + 300
        while any(r.procs is None for r in runs.values()):
            assert time.monotonic() < deadline, "drivers did not reach their first shard in 300 s"
            for name, r in runs.items():
                if r.procs is not None:
                    continue
                assert r.proc.poll() is None, f"{name} driver exited early: {r.proc.communicate()}"
                done = done_shards(r.out)
                if done:
                    r.worker = next(iter(done.values()))["pid"]
                    os.kill(r.worker, signal.SIGSTOP)
                    r.procs = tree(r.proc.pid)
                    assert len(done_shards(r.out)) < N_SHARDS, f"{name}: finished before it could be frozen"
            time.sleep(0.05)
        yield runs
    finally:
        for r in runs.values():  # whatever a failed test left behind
            kill_all(tree(r.proc.pid) + (r.procs or []))
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def _stopped(r: Frozen, send) -> tuple[int, str]:
    send()
    _, err = r.proc.communicate(timeout=120)
    return r.proc.returncode, err


def _check_clean_stop(r: Frozen, code: int, err: str, signame: str, want_code: int) -> None:
    assert code == want_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m, last
    assert m.group(1) == signame and Path(m.group(3)) == r.out
    assert int(m.group(2)) == len(done_shards(r.out)) < N_SHARDS
    # The command as started, with --out moved to the end after --resume: pasted, it resumes this sweep.
    started = list(r.proc.args)
    out_at = started.index("--out")
    assert shlex.split(m.group(4)) == [*started[:out_at], *started[out_at + 2:], "--resume", "--out", str(r.out)]
    assert still_running(r.procs) == [], "processes of the stopped driver are still running"
    assert r.worker in {p.pid for p in r.procs}
    out = OutDir(r.out)
    assert not out.lock.exists() and not out.ray_processes.exists()


def test_sigint_to_the_driver_alone(frozen, sweep_model_dir):
    r = frozen["sigint"]
    # While it runs, a second sweep into its folder is refused at once, and changes nothing there.
    before = (r.out / "manifest.json").read_bytes()
    with pytest.raises(OutLocked, match=rf"in use by a sweep job, pid {r.proc.pid} on host "):
        run_sweep(sweep_cfg(sweep_model_dir, r.out, "ray.workers=0"), resume=True)
    assert (r.out / "manifest.json").read_bytes() == before
    _check_clean_stop(r, *_stopped(r, lambda: os.kill(r.proc.pid, signal.SIGINT)), "SIGINT", 130)


def test_ctrl_c_to_the_process_group(frozen):
    r = frozen["ctrl_c"]
    _check_clean_stop(r, *_stopped(r, lambda: os.killpg(r.proc.pid, signal.SIGINT)), "SIGINT", 130)


def test_sigterm(frozen):
    r = frozen["sigterm"]
    _check_clean_stop(r, *_stopped(r, lambda: os.kill(r.proc.pid, signal.SIGTERM)), "SIGTERM", 143)


def test_driver_sigkill_then_resume(frozen, sweep_model_dir, sweep_reference, capsys):
    """After a SIGKILL the driver cleans up nothing, and Ray 2.60's dashboard and runtime-env agents do not
    share its fate (its head processes and workers do: kill-on-parent-death). Its watchdog stops them all
    and removes the record at once, no later run needed; then --resume completes with the same rows."""
    r = frozen["sigkill"]
    out = OutDir(r.out)
    record = json.loads(out.ray_processes.read_text())
    recorded = {e["pid"] for e in record["processes"]}
    assert r.worker in recorded and record["driver_pid"] == r.proc.pid  # workers are recorded too
    names = {p.pid: p.name() for p in r.procs}
    agents = {pid for pid, name in names.items() if "Agent" in name}
    assert agents and agents <= recorded, names  # what would outlive the driver without the watchdog
    os.kill(r.proc.pid, signal.SIGKILL)
    r.proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(r.procs, timeout=60)
    assert still_running(alive) == [], "processes of the killed driver are still running"
    assert not out.ray_processes.exists(), "the watchdog did not stop the recorded processes"
    report = run_sweep(sweep_cfg(sweep_model_dir, r.out, "ray.workers=0"), resume=True)
    assert "Ray processes left running" not in capsys.readouterr().err  # nothing was left for it
    assert report.shards_skipped + report.shards_run == N_SHARDS and report.shards_skipped >= 1
    assert_same_results(out.read_results(), sweep_reference[0])
    assert not [p for p in r.out.rglob(f"*{TMP_MARK}*")], "temporary files left behind"
    assert not out.lock.exists() and not out.ray_processes.exists()
    assert manifest(r.out)["finished"]


# ---------------------------------------------------------------------------------- the watchdog, without Ray

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# A driver as far as the watchdog is concerned: records its "Ray" (the sleeper, pid in argv), starts the
# watchdog, says so, and waits to be killed.
FAKE_DRIVER = (
    "import json, os, sys, time\n"
    "from pathlib import Path\n"
    "import psutil\n"
    "from jobs.runtime import local_ray\n"
    "path, sleeper = Path(sys.argv[1]), psutil.Process(int(sys.argv[2]))\n"
    "path.write_text(json.dumps({'driver_pid': os.getpid(), 'processes': [local_ray._describe(sleeper)]}))\n"
    "local_ray.Watchdog(path)\n"
    "print('watched', flush=True)\n"
    "time.sleep(120)\n"
)


def _entry(proc: subprocess.Popen) -> dict:
    p = psutil.Process(proc.pid)
    return {"pid": p.pid, "create_time": p.create_time(), "cmdline": p.cmdline()}


def test_the_watchdog_stops_what_a_killed_driver_recorded(tmp_path):
    """The mechanism alone: a driver holding a record and a watchdog is SIGKILLed; the recorded process
    (which the driver did not start, so nothing else would stop it) is stopped and the record removed."""
    sleeper = subprocess.Popen(SLEEPER)
    path = tmp_path / ".ray_processes.json"
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, str(path), str(sleeper.pid)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline() == "watched\n"
        watchdog = [p for p in psutil.Process(driver.pid).children() if p.pid != sleeper.pid]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        assert sleeper.wait(timeout=30) is not None
        _, alive = psutil.wait_procs(watchdog, timeout=30)
        assert alive == [] and not path.exists()
    finally:
        kill_all([psutil.Process(sleeper.pid)] if sleeper.poll() is None else [])
        driver.kill()


def test_the_next_run_stops_what_a_killed_watchdog_left(tmp_path, capsys):
    """Should the watchdog be killed with the driver, the next run in the folder stops the recorded processes
    still alive, and only those: a live process whose pid is recorded with another start time (pid reuse)
    is left alone."""
    out = OutDir(tmp_path / "OUT")
    out.root.mkdir()
    left, impostor = subprocess.Popen(SLEEPER), subprocess.Popen(SLEEPER)
    try:
        record = {"driver_pid": 1 << 22, "processes": [_entry(left), {**_entry(impostor), "create_time": 1.0}]}
        out.ray_processes.write_text(json.dumps(record))
        lock = OutLock(out.lock, "sweep").acquire()
        try:
            recover(out, lock)
        finally:
            lock.release()
        assert f"stopped 1 Ray processes left running by an earlier driver (pids {left.pid})" in capsys.readouterr().err
        assert left.wait(timeout=30) is not None and impostor.poll() is None
        assert not out.ray_processes.exists()
    finally:
        for proc in (left, impostor):
            proc.kill()
            proc.wait()
