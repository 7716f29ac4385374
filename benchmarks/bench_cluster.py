"""What a multi-node run costs: the default sweep on a simulated 3-node Ray cluster vs the same shards in one process.

The cluster is `ray.cluster_utils.Cluster` on this machine: a head and two worker nodes, 1 CPU each and
one `fake_gpu` unit standing in for a GPU; the sweep asks for one per worker
(`ray.resources_per_worker`), so its 2 workers sit on 2 nodes, joined the way a user's driver joins a
cluster (`ray.address`, code shipped as working_dir). The in-process run scores the same shards with
`ray.workers=0` on 1 thread (each worker also computes on 1 thread). Reported:

* startup per node: joining the cluster (`add_node`), and each worker's model load on its node;
* end to end and after startup, both runs; the cluster's worker-seconds beyond the in-process
  compute, per shard (distribution overhead: waiting, transfer, scheduling);
* the driver's own cost per shard (build the frame, write + fsync the parquet, SHA-256, manifest),
  from the manifest's `write_seconds`;
* result bytes per row: what a worker sends back (pickled columns) and what lands on disk (parquet);
* the driver's write rate on a study-sized shard (64 prompts x 102 conditions = 6528 rows).

    python benchmarks/bench_cluster.py                       # the default config (SmolLM2, 768 rows)
    python benchmarks/bench_cluster.py --set prompts.n=16    # quicker; any config override
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's jobs/ and verif/, also when another copy is installed

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.runtime.storage import RESULT_SCHEMA, OutDir, write_json_atomic, write_shard  # noqa: E402
from jobs.sweep import run_sweep  # noqa: E402

STUDY_SHARD = (64, 102)  # prompts x conditions per shard of configs/tinyzero_qwen2.5_3b.yaml


def _run(config: str | None, overrides: list[str], out: Path) -> dict:
    cfg = load_config(config, [*overrides, "wandb.mode=disabled"], str(out))
    start = time.perf_counter()
    report = run_sweep(cfg)
    wall = time.perf_counter() - start
    m = json.loads((out / "manifest.json").read_text())
    shards = [s for s in m["shards"].values() if s["status"] == "done"]
    return {
        "wall_s": wall,
        "startup_s": report.startup_seconds,
        "after_startup_s": wall - report.startup_seconds,
        "rows": report.rows_written,
        "shards": report.shards_run,
        "nodes": len({s["node_id"] for s in shards}),
        "workers": m.get("workers", []),
        "write_s_per_shard": statistics.mean(s["write_seconds"] for s in shards),
        "parquet_bytes_per_row": sum(s["bytes"] for s in shards) / report.rows_written,
    }


def _transfer_bytes_per_row(out: Path) -> float:
    """Pickled size of the columns a worker returns for each shard (what crosses the network), per row."""
    results = OutDir(out)
    total = rows = 0
    for shard_id in sorted(results.shard_files()):
        df = pl.read_parquet(results.shard(shard_id))
        columns = {c: df[c].to_list() for c in df.columns}
        total += len(pickle.dumps(columns, protocol=5))
        rows += df.height
    return total / rows


def _driver_write_rate(tmp: Path, repeats: int = 5) -> dict:
    """Rows/s the driver writes on a study-sized shard: frame, parquet + fsync, SHA-256, manifest + fsync."""
    n_prompts, n_cond = STUDY_SHARD
    rows = n_prompts * n_cond
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (4, rows))
    columns = {"model": ["Qwen2.5-3B"] * rows, "prompt_id": [i for i in range(n_prompts) for _ in range(n_cond)],
               "condition": [f"random-{c:03d}" for c in range(n_cond)] * n_prompts,
               "p_yes": p[0].tolist(), "p_no": p[1].tolist(), "p_yes_norm": p[2].tolist(), "log_odds": p[3].tolist()}
    manifest = {"shards": {f"m0-p{i * 64:06d}-c000": {"status": "pending"} for i in range(16)}}
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        frame = pl.DataFrame(columns, schema=RESULT_SCHEMA)
        record = write_shard(frame, tmp / f"shard{i}.parquet")
        manifest["shards"][f"m0-p{i * 64:06d}-c000"].update(record.entry())
        write_json_atomic(manifest, tmp / "manifest.json")
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"rows_per_shard": rows, "seconds_per_shard_best": best, "seconds_per_shard_median": statistics.median(times),
            "rows_per_s": rows / best, "parquet_bytes_per_row": record.bytes / rows,
            "pickled_bytes_per_row": len(pickle.dumps(columns, protocol=5)) / rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="sweep config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs (repeatable)")
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/cluster.json)")
    args = p.parse_args(argv)
    if any(o.startswith("ray.") for o in args.overrides):
        p.error("the ray section is what this benchmark sets; do not override it")
    benchlib.set_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="bc", dir="/tmp") as tmp:
        tmp = Path(tmp)
        os.environ["RAY_TMPDIR"] = str(tmp / "ray")  # Ray's session files stay in here
        node = {"num_cpus": 1, "resources": {"fake_gpu": 1}, "include_dashboard": False,
                "env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}
        start = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args=node)
        node_start = {"head": time.perf_counter() - start}
        for name in ("worker1", "worker2"):
            start = time.perf_counter()
            cluster.add_node(**node)
            node_start[name] = time.perf_counter() - start
        cluster.wait_for_nodes()
        try:
            ray_sets = [f"ray.address={cluster.address}", "ray.workers=2", "ray.cpus_per_worker=1",
                        "ray.resources_per_worker={fake_gpu: 1}"]
            on_cluster = _run(args.config, [*args.overrides, *ray_sets], tmp / "cluster")
        finally:
            cluster.shutdown()
        in_process = _run(args.config, [*args.overrides, "ray.workers=0"], tmp / "local")
        a, b = OutDir(tmp / "cluster").read_results(), OutDir(tmp / "local").read_results()
        keys = ["model", "prompt_id", "condition"]
        joined = a.join(b, on=keys, suffix="_b")
        assert joined.height == a.height == b.height, "the runs scored different rows"
        max_diff = float((joined["p_yes_norm"] - joined["p_yes_norm_b"]).abs().max())
        transfer = _transfer_bytes_per_row(tmp / "cluster")
        write = _driver_write_rate(tmp)

    shards = on_cluster["shards"]
    overhead = (2 * on_cluster["after_startup_s"] - in_process["after_startup_s"]) / shards
    result = {
        "benchmark": "cluster",
        "machine": benchlib.machine_info(),
        "overrides": args.overrides,
        "node_start_s": node_start,
        "cluster": on_cluster,
        "in_process": in_process,
        "worker_seconds_overhead_per_shard": overhead,
        "result_bytes_per_row": {"transfer_pickled": transfer, "parquet": on_cluster["parquet_bytes_per_row"]},
        "driver_write_study_shard": write,
        "max_abs_diff_p_yes_norm": max_diff,
    }
    benchlib.print_table(
        f"the sweep ({on_cluster['rows']} rows, {shards} shards): 3-node simulated cluster (2 workers) vs in-process",
        ["run", "wall s", "startup s", "after startup s", "nodes used", "driver write s/shard"],
        [[name, r["wall_s"], r["startup_s"], r["after_startup_s"], r["nodes"], r["write_s_per_shard"]]
         for name, r in (("cluster", on_cluster), ("in-process", in_process))],
    )
    print("node start s: " + ", ".join(f"{k} {v:.1f}" for k, v in node_start.items()))
    print("model load s per worker: " + ", ".join(f"{w['node_id'][:8]} {w['load_seconds']:.1f}"
                                                 for w in on_cluster["workers"]))
    print(f"worker-seconds beyond the in-process compute, per shard: {overhead:.2f} s")
    print(f"result bytes per row: {transfer:.0f} pickled (transfer), {on_cluster['parquet_bytes_per_row']:.0f} parquet")
    print(f"driver write, study-sized shard ({write['rows_per_shard']} rows): {write['seconds_per_shard_best'] * 1e3:.1f} ms "
          f"= {write['rows_per_s']:.0f} rows/s")
    print(f"max |diff| p_yes_norm cluster vs in-process: {max_diff:.1e}")
    benchlib.write_json(result, args.out, "cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
