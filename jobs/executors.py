"""Where shards run: in this process, or on Ray actors that each own a model.

Both executors yield `(shard, columns)` as shards finish, in completion order. The Ray executor
re-queues a shard whose worker died (the actor is restarted by Ray and reloads its model), so a
killed process costs one shard's time, never a shard's results.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from jobs.worker import Shard, ShardScorer, WorkerSpec

Payload = Callable[[Shard], tuple]  # shard -> extra arguments of ShardScorer.score


class ShardFailed(RuntimeError):
    """A shard failed on every allowed attempt."""


class LocalExecutor:
    """Scores shards one after another with a single in-process worker."""

    def __init__(self, spec: WorkerSpec):
        start = time.perf_counter()
        self.worker = ShardScorer(spec)
        self.startup_seconds = time.perf_counter() - start
        self.n_workers = 1

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, dict]]:
        for shard in shards:
            columns = self.worker.score(shard, *payload(shard))
            columns.pop("pid")
            yield shard, columns

    def close(self) -> None:
        self.worker = None


def init_ray(address: str, env_vars: dict[str, str], n_cpus_needed: float, working_dir: str | None) -> None:
    """Join `address`, or start a local Ray sized for the workers; environment travels to workers."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env: dict = {"env_vars": env_vars}
    if address:
        if working_dir:  # remote nodes get the code from the driver, not from a shared disk
            runtime_env["working_dir"] = working_dir
            runtime_env["excludes"] = [".venv/", "runs/", ".git/", "benchmarks/results/", "*.parquet"]
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(n_cpus_needed + 0.999)),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )


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
        self.worker_info = ray.get([a.ready.remote() for a in self.actors])  # load errors surface here
        self.pids = [info["pid"] for info in self.worker_info]
        self.startup_seconds = time.perf_counter() - start
        self.n_workers = n_workers
        self.retried: list[str] = []

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, dict]]:
        import ray
        from ray.exceptions import RayActorError

        queue = deque(shards)
        idle = deque(range(len(self.actors)))
        inflight: dict = {}
        while queue or inflight:
            while queue and idle:
                shard, worker = queue.popleft(), idle.popleft()
                inflight[self.actors[worker].score.remote(shard, *payload(shard))] = (shard, worker)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            shard, worker = inflight.pop(ref)
            try:
                columns = ray.get(ref)
            except RayActorError as err:
                raise ShardFailed(f"shard {shard.id} failed on every allowed attempt; last error: {err}") from err
            pid = columns.pop("pid")
            if pid != self.pids[worker]:
                self.pids[worker] = pid
                self.retried.append(shard.id)
            idle.append(worker)
            yield shard, columns

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
