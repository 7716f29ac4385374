"""How long `python launch.py --discover` takes on the default config, end to end, and where the time goes.

Runs the command as a user does (a subprocess: `configs/default.yaml`, 2 local Ray workers, offline
W&B) into a fresh folder, samples the machine's 1-minute load average every 5 s while it runs (on a
shared machine every step slows down with it), and reads the seconds per step that the job records
in OUT/discovery/manifest.json. The goal (issue 12): under 10 minutes on 2 cores.

    python benchmarks/bench_discover_job.py                    # ~6 minutes on 2 cores
    python benchmarks/bench_discover_job.py --set discover.exact=32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

import benchlib
from verif.analysis.discovery.ranking import pearson, spearman

REPO = Path(__file__).resolve().parent.parent
LOAD_EVERY_S = 5.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed on to launch.py (the default config otherwise)")
    p.add_argument("--keep", help="run into this folder and keep it (default: a temporary folder)")
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/discover_job_cpu.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "OUT")
        cmd = [sys.executable, "launch.py", "--discover", "--out", str(out)]
        cmd += [a for item in args.overrides for a in ("--set", item)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        loads = [os.getloadavg()[0]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            time.sleep(LOAD_EVERY_S)
            loads.append(os.getloadavg()[0])
        wall = time.perf_counter() - start
        stdout, stderr = proc.communicate()
        if proc.returncode:
            print(stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"launch.py --discover exited with {proc.returncode}")
        manifest = json.loads((out / "discovery" / "manifest.json").read_text())
        heads = pl.read_parquet(out / "discovery" / "heads.parquet")
    timing = manifest["timing"]
    result = {
        "benchmark": "discover_job_cpu",
        "machine": benchlib.machine_info() | {"cpu_threads": "1 per Ray worker (ray.cpus_per_worker)"},
        "command": " ".join(["python launch.py --discover", *(f"--set {o}" for o in args.overrides)]),
        "discover": manifest["config"]["discover"],
        "n_prompts": manifest["prompts"].get("n_objective"),
        "wall_s": wall,
        "job_seconds": timing["seconds"],
        "startup_s": timing["startup_seconds"],
        "steps_s": timing["steps"],
        "load_avg_1min": {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads), "samples": len(loads)},
        "spearman_atp_exact_screened": spearman(heads["atp"].to_numpy(), heads["exact"].fill_null(float("nan")).to_numpy()),
        "pearson_atp_exact_screened": pearson(heads["atp"].to_numpy(), heads["exact"].fill_null(float("nan")).to_numpy()),
        "n_screened": heads["exact"].is_not_null().sum(),
        "report": stdout.splitlines(),
    }
    rows = [["end to end (wall)", wall], ["startup (Ray, workers)", timing["startup_seconds"]]]
    rows += [[f"{model}: {step}", t] for model, steps in timing["steps"].items() for step, t in steps.items()]
    benchlib.print_table(f"python launch.py --discover (load average {result['load_avg_1min']['mean']:.1f} on "
                         f"{os.cpu_count()} cores)", ["part", "s"], rows)
    benchlib.write_json(result, args.out, "discover_job_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
