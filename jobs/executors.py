"""Where work runs: in this process, or on Ray; the one place that starts Ray and waits on it.

Both shard executors yield `(shard, columns)` as shards finish, in completion order. The Ray executor
re-queues a shard whose worker died (the actor is restarted by Ray and reloads its model), so a
killed process costs one shard's time, never a shard's results. `in_slots` is the wait loop every
Ray job here shares: items go to free slots (actors, or a cap on tasks in flight) and come back as
they finish.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from jobs.worker import Shard, ShardScorer, WorkerSpec

Payload = Callable[[Shard], tuple]  # shard -> extra arguments of ShardScorer.score
Item = TypeVar("Item")

# Never shipped to a cluster as code: environments, outputs, history, measured results.
WORKING_DIR_EXCLUDES = [".venv/", "runs/", ".git/", "benchmarks/results/", "*.parquet"]


class ShardFailed(RuntimeError):
    """A shard failed on every allowed attempt."""


def init_ray(address: str, env_vars: dict[str, str], n_cpus_needed: float, working_dir: str | None = None) -> bool:
    """Join `address`, or start a local Ray sized for the work; the environment travels to workers.

    Returns whether this call started Ray (the caller shuts down only what it started: a sweep that
    already joined a cluster keeps it for the weight diff that follows).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no auth token written to the home folder
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env: dict = {"env_vars": env_vars}
    if address:
        if working_dir:  # remote nodes get the code from the driver, not from a shared disk
            runtime_env["working_dir"] = working_dir
            runtime_env["excludes"] = WORKING_DIR_EXCLUDES
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a new local Ray even when another one (`ray start`) runs on this machine
            num_cpus=max(os.cpu_count() or 1, int(n_cpus_needed + 0.999)),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    return True


def in_slots(items: Iterable[Item], slots: Sequence[Hashable], submit: Callable[[Item, Any], Any]
             ) -> Iterator[tuple[Item, Any, Any]]:
    """Run `submit(item, slot) -> ObjectRef` with at most one item per slot; yield (item, slot, ref) as
    each finishes. The caller `ray.get`s the ref (and decides what a failure means)."""
    import ray

    queue, idle, inflight = deque(items), deque(slots), {}
    while queue or inflight:
        while queue and idle:
            item, slot = queue.popleft(), idle.popleft()
            inflight[submit(item, slot)] = (item, slot)
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        item, slot = inflight.pop(ref)
        idle.append(slot)
        yield item, slot, ref


class LocalExecutor:
    """Scores shards one after another with a single in-process worker."""

    def __init__(self, spec: WorkerSpec):
        start = time.perf_counter()
        self.worker = ShardScorer(spec)
        self.startup_seconds = time.perf_counter() - start
        self.retried: list[str] = []

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, dict]]:
        for shard in shards:
            columns = self.worker.score(shard, *payload(shard))
            columns.pop("pid")
            yield shard, columns

    def close(self) -> None:
        self.worker = None


class RayExecutor:
    """One actor per worker, each loading the model once; shards are fed as actors free up.

    A worker process that dies is restarted by Ray (reloading its model) and the shard it held is
    retried on it (`max_task_retries`); the driver notices the new process id and records the shard
    as retried. A shard that keeps killing its worker fails the sweep after `max_attempts` tries.
    """

    def __init__(self, spec: WorkerSpec, n_workers: int, cpus: float, gpus: float, max_attempts: int):
        import ray

        start = time.perf_counter()
        actor = ray.remote(ShardScorer).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=max_attempts, max_task_retries=max_attempts - 1
        )
        self.actors = [actor.remote(spec) for _ in range(n_workers)]
        ready = ray.get([a.ready.remote() for a in self.actors])  # load errors surface here
        self.pids = [info["pid"] for info in ready]
        self.startup_seconds = time.perf_counter() - start
        self.retried: list[str] = []

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, dict]]:
        import ray
        from ray.exceptions import RayActorError

        def submit(shard: Shard, worker: int):
            return self.actors[worker].score.remote(shard, *payload(shard))

        for shard, worker, ref in in_slots(shards, range(len(self.actors)), submit):
            try:
                columns = ray.get(ref)
            except RayActorError as err:
                raise ShardFailed(f"shard {shard.id} failed on every allowed attempt; last error: {err}") from err
            pid = columns.pop("pid")
            if pid != self.pids[worker]:
                self.pids[worker] = pid
                self.retried.append(shard.id)
            yield shard, columns

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
