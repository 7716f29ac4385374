"""A job's workers: the Ray session they live in, their executors, and shard results recorded as they land.

Every sharded job (sweep, generate, discover) runs the same way: start or join Ray as `ray` says (or
none with `ray.workers: 0`), give each model to workers that load it once, feed them shards, and write
each shard's result atomically the moment it returns, recording its row count, size and checksum in
the manifest, so `--resume` trusts exactly what it can verify (`jobs.runtime.storage.verify_shards`). A local
Ray started here has its processes recorded in OUT and is shut down, its processes checked gone,
however the job ends, and a watchdog stops them should the driver be killed (`jobs.runtime.local_ray`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from jobs import config as config_mod
from jobs.runtime import local_ray
from jobs.config import RayConfig
from jobs.errors import InputError
from jobs.runtime.executors import LocalExecutor, RayExecutor, init_ray, started_local_ray
from jobs.runtime.storage import OutDir, write_json_atomic, write_shard
from jobs.runtime.worker import ModelWorker, WorkerSpec
from verif.model.devicemap import DoesNotFitError
from verif.model.selfcheck import SelfCheckError


def worker_env() -> dict[str, str]:
    """Environment every worker needs, shipped through Ray's runtime_env."""
    # Not HF_HOME: a cache path is a fact about one node; each node's own environment (`ray start`) sets it.
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "CUDA_LAUNCH_BLOCKING")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["TQDM_DISABLE"] = "1"  # no loading bars from workers (GGUF conversion): the driver has the one bar
    return env


def workers_for(node_gpus: Sequence[float], gpus_per_worker: float) -> int:
    """How many workers of `gpus_per_worker` GPUs the nodes hold: a worker's GPUs are all on one node."""
    return sum(int(g // gpus_per_worker) for g in node_gpus) if gpus_per_worker > 0 else 0


def resolve_workers(r: RayConfig) -> int:
    """`ray.workers: auto` is one worker per `ray.gpus_per_worker` GPUs of a node, on every node of the (already
    joined) cluster."""
    if r.workers != "auto":
        return r.workers
    import ray

    node_gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    n = workers_for(node_gpus, r.gpus_per_worker)
    if n == 0:
        raise InputError(f"ray.workers: auto needs a node with ray.gpus_per_worker = {r.gpus_per_worker:g} GPUs "
                         f"(GPUs per node: {', '.join(f'{g:g}' for g in node_gpus) or 'no node'})")
    return n


def check_room(r: RayConfig) -> None:
    """Some node of the cluster can hold a worker; Ray would otherwise wait for one forever (a GPU asked
    for on a machine without one, a resource no node was started with)."""
    import ray

    need = {k: v for k, v in {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, **r.resources_per_worker}.items()
            if v}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0) >= v for k, v in need.items()) for res in nodes):
        return
    have = "; ".join(", ".join(f"{k} {res.get(k, 0):g}" for k in need) for res in nodes)
    wants = ", ".join(f"{k} {v:g}" for k, v in need.items())
    raise InputError(f"ray: no node of the cluster can hold a worker, which needs {wants} (ray.cpus_per_worker, "
                     f"ray.gpus_per_worker, ray.resources_per_worker); its {len(nodes)} node(s) have: {have}")


class WorkerStartError(InputError):
    """Workers could not start: the model did not load, or its fast path failed the self-check."""


def _start_failure(model: str, err: Exception) -> WorkerStartError:
    """The one line that says why (a Ray actor's creation error carries the remote traceback)."""
    text = str(err).strip().splitlines()
    reason = next((line.strip() for line in reversed(text) if "Error" in line), text[-1] if text else repr(err))
    return WorkerStartError(f"the workers for {model} could not start: {reason}")


@dataclass
class WorkerPool:
    """Where a job's workers run: `n_workers` Ray actors per model, or 0 (in this process)."""

    ray: RayConfig
    out: OutDir
    n_workers: int = 0
    local: bool = False  # a local Ray started by this job (its processes are recorded in OUT)
    startup_seconds: float = 0.0

    def spec(self, **fields: Any) -> WorkerSpec:
        """A WorkerSpec with this pool's per-worker threads and GPUs (a whole number: what the model is split over)."""
        return WorkerSpec(threads=max(1, int(self.ray.cpus_per_worker)) if self.n_workers else None,
                          gpus=max(1, int(self.ray.gpus_per_worker)), **fields)

    def share(self, obj: Any) -> Any:
        """An object every shard's call reads (reference means): put in Ray's object store once, so each call
        passes a reference that Ray resolves on the worker's node; in this process, the object itself."""
        if self.n_workers == 0 or obj is None:
            return obj
        import ray

        return ray.put(obj)

    def executor(self, worker_cls: type[ModelWorker], method: str, spec: WorkerSpec, max_attempts: int):
        """Workers of `worker_cls` (model loaded, fast path checked) that run `method` on shards."""
        t = time.perf_counter()
        try:
            if self.n_workers == 0:
                executor = LocalExecutor(worker_cls, spec, method)
            else:
                from ray.exceptions import RayActorError

                r = self.ray
                try:
                    executor = RayExecutor(worker_cls, spec, method, self.n_workers, r.cpus_per_worker,
                                           r.gpus_per_worker, r.resources_per_worker, max_attempts,
                                           r.restart_timeout)
                except RayActorError as e:
                    raise _start_failure(spec.model, e) from e
        except (SelfCheckError, DoesNotFitError, OSError) as e:
            raise _start_failure(spec.model, e) from e
        if self.local:
            local_ray.record(self.out.ray_processes)  # now with the workers
        self.startup_seconds += time.perf_counter() - t
        return executor


@contextmanager
def worker_pool(r: RayConfig, out: OutDir) -> Iterator[WorkerPool]:
    """Start or join Ray for a job (nothing with `ray.workers: 0`); shut down what was started."""
    pool = WorkerPool(r, out)
    started = False
    watchdog: local_ray.Watchdog | None = None
    try:
        if r.workers != 0:
            t = time.perf_counter()
            local = started_local_ray(r.address)
            wanted = r.workers if isinstance(r.workers, int) else 1
            started = init_ray(r.address, worker_env(), wanted * r.cpus_per_worker,
                               str(config_mod.REPO_ROOT))
            pool.local = local and started
            if pool.local:
                local_ray.record(out.ray_processes)
                watchdog = local_ray.Watchdog(out.ray_processes)  # stops them should this driver be killed
            pool.startup_seconds += time.perf_counter() - t
            pool.n_workers = resolve_workers(r)
            check_room(r)
        yield pool
    finally:
        if started:
            import ray

            ray.shutdown()
        if pool.local:
            local_ray.stop_recorded(out.ray_processes)
        if watchdog is not None:
            watchdog.close()


@dataclass
class Recorded:
    """What `run_recorded` wrote: rows, shards, and the shards retried after a worker was lost."""

    rows: int = 0
    shards: int = 0
    retried: list[dict] = field(default_factory=list)


def run_recorded(
    executor, shards: Sequence[Any], payload: Callable[[Any], tuple], out: OutDir, manifest: dict,
    to_frame: Callable[[Any], pl.DataFrame], on_shard: Callable[[pl.DataFrame], None] | None = None,
) -> Recorded:
    """Run `shards` on `executor`; write each result (`to_frame(result)`) to `out.shard(id)` and record it.

    The manifest entry of each shard gets its file record (rows, bytes, SHA-256), where it ran and the
    driver's write time; the manifest is rewritten after every shard. `on_shard` sees each frame (for a
    progress bar). The executor is closed whatever happens.
    """
    done = Recorded()
    try:
        for shard, result, where in executor.run(shards, payload):
            t_write = time.perf_counter()
            frame = to_frame(result)
            record = write_shard(frame, out.shard(shard.id))
            entry = manifest["shards"][shard.id]
            entry.update(record.entry(), **where)
            write_json_atomic(manifest, out.manifest)
            entry["write_seconds"] = time.perf_counter() - t_write  # the driver's cost of a shard
            done.rows += frame.height
            done.shards += 1
            if on_shard is not None:
                on_shard(frame)
    finally:
        done.retried += executor.retried
        manifest.setdefault("retried", []).extend(executor.retried)
        executor.close()
    return done
