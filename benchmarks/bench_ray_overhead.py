"""What the distributed path costs: the default sweep on Ray against the same shards in-process.

Runs `python launch.py --sweep` with the same configuration (default: configs/default.yaml,
SmolLM2 on the CPU) on a local Ray and with `ray.workers=0` (the same shards, scored one after
another in the driver process), timed end to end as a user runs them (process start to exit:
planning, scoring, statistics, figures, tracking). Two pairs: as configured (2 Ray workers against
the driver with torch's default threads), and 1 Ray worker against the driver on 1 thread (same
compute: the difference is the cost of distributing). Reported per pair:

* end-to-end wall time of both and the overhead of the Ray path as % of its wall time;
* startup separately: a bare `ray.init` + first task, and each run's startup as its manifest records
  it (Ray: init + actor start + model load in the workers; in-process: the model load);
* the same comparison with startup taken out (the scoring path itself);
* the largest difference between the two runs' results (must be 0: same engine, same shards).

    python benchmarks/bench_ray_overhead.py
    python benchmarks/bench_ray_overhead.py --set prompts.n=16      # quicker, any config override
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

import benchlib

REPO = Path(__file__).resolve().parent.parent

RAY_INIT = """
import os, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
start = time.perf_counter()
import ray
ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
ray.get(ray.remote(lambda: 1).remote())
print(time.perf_counter() - start)
ray.shutdown()
"""


def sweep(out: Path, overrides: list[str], config: str | None, threads: int | None = None) -> dict:
    """One `launch.py --sweep` as a subprocess: wall seconds and the manifest's own timing.

    `threads` pins the driver's torch threads (OMP_NUM_THREADS), for an in-process run that should
    compute with what one Ray worker gets."""
    cmd = [sys.executable, "launch.py", "--sweep", "--out", str(out)]
    cmd += ["--config", config] if config else []
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    return {
        "wall_s": wall,
        "sweep_s": timing["seconds"],
        "startup_s": timing["startup_seconds"],
        "rows": timing["rows_written"],
        "after_startup_s": wall - timing["startup_seconds"],
    }


def results_diff(a: Path, b: Path) -> float:
    import polars as pl

    def read(root: Path) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(f) for f in sorted((root / "results").glob("*.parquet"))])

    keys = ["model", "prompt_id", "condition"]
    joined = read(a).join(read(b), on=keys, suffix="_b")
    if joined.height != read(a).height:
        raise RuntimeError("the two runs scored different (model, prompt, condition) rows")
    return float((joined["p_yes_norm"] - joined["p_yes_norm_b"]).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="sweep config (default: launch.py's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs (repeatable)")
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/ray_overhead.json)")
    p.add_argument("--skip-one-worker", action="store_true", help="only the configured pair (half the time)")
    args = p.parse_args(argv)
    if any(o.startswith("ray.workers=") for o in args.overrides):
        p.error("ray.workers is what this benchmark varies; do not override it")

    init = subprocess.run([sys.executable, "-c", RAY_INIT], cwd=REPO, capture_output=True, text=True)
    ray_init_s = float(init.stdout.strip().splitlines()[-1]) if init.returncode == 0 else None
    # Pair "configured": the sweep as configured (default: 2 workers x 1 thread) against the same
    # shards in-process with torch's default threads, as a user would run either.
    # Pair "one worker": 1 Ray worker against the in-process run on 1 thread: the same compute, so
    # the difference is what distributing costs.
    pairs = {"configured": ([], None)}
    if not args.skip_one_worker:
        pairs["one worker"] = (["ray.workers=1", "ray.cpus_per_worker=1"], 1)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ray_sets, local_threads) in pairs.items():
            ray_dir, local_dir = Path(tmp) / f"{name}-ray", Path(tmp) / f"{name}-local"
            ray_run = sweep(ray_dir, [*args.overrides, *ray_sets], args.config)
            local_run = sweep(local_dir, [*args.overrides, "ray.workers=0"], args.config, local_threads)
            runs[name] = {
                "ray": ray_run,
                "in_process": local_run,
                "in_process_threads": local_threads or "torch default",
                "overhead_pct_of_ray_wall": 100 * (ray_run["wall_s"] - local_run["wall_s"]) / ray_run["wall_s"],
                "overhead_pct_after_startup": 100 * (ray_run["after_startup_s"] - local_run["after_startup_s"])
                / ray_run["after_startup_s"],
                "max_abs_diff_p_yes_norm": results_diff(ray_dir, local_dir),
            }
            print(f"{name}: ray {ray_run['wall_s']:.1f}s, in-process {local_run['wall_s']:.1f}s", flush=True)

    result = {
        "benchmark": "ray_overhead",
        "machine": benchlib.machine_info(),
        "overrides": args.overrides,
        "ray_bare_init_and_first_task_s": ray_init_s,
        "pairs": runs,
    }
    rows = next(iter(runs.values()))["ray"]["rows"]
    benchlib.print_table(
        f"sweep end to end ({rows} rows); overhead = (ray - in-process) / ray",
        ["pair", "path", "wall s", "startup s", "wall - startup s", "overhead %", "after startup %"],
        [[name, path, r[key]["wall_s"], r[key]["startup_s"], r[key]["after_startup_s"],
          r["overhead_pct_of_ray_wall"] if key == "ray" else "", r["overhead_pct_after_startup"] if key == "ray" else ""]
         for name, r in runs.items() for path, key in (("ray", "ray"), ("in-process", "in_process"))],
    )
    print(f"bare ray.init + first task: {ray_init_s if ray_init_s is None else round(ray_init_s, 2)} s")
    print("max |diff| p_yes_norm ray vs in-process: "
          + ", ".join(f"{k} {r['max_abs_diff_p_yes_norm']:.1e}" for k, r in runs.items()))
    benchlib.write_json(result, args.out, "ray_overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
