"""Where work runs: in this process, or on Ray; the one place that starts Ray and waits on it.

Both shard executors yield `(shard, columns, where)` as shards finish, in completion order; `where` is
the node id, host and pid that computed the shard (the manifest keeps it). The Ray executor handles
worker loss itself: a shard whose worker died (process killed, node lost) goes back to the front of
the queue, the actor is restarted by Ray (on any node with room, reloading its model) and the driver
waits for it with cheap probes before handing it work again. So a lost worker costs one shard's time,
never a shard's results, and the driver knows exactly which shard was retried and why. Every wait
here wakes up at least once a second, so SIGINT/SIGTERM handlers in the driver run promptly.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from jobs.errors import ShardFailed
from jobs.runtime.worker import ModelWorker, WorkerSpec

Shard = Any  # any work item with an `id` (a sweep shard, a generation or discovery shard)
Payload = Callable[[Shard], tuple]  # shard -> the worker method's further arguments
Item = TypeVar("Item")
WAIT_S = 1.0  # longest uninterrupted wait on Ray: the driver's signal handlers run between waits
PROBE_AGAIN_S = 1.0  # a worker whose node is not yet known dead is probed again after this


def in_ray_job() -> bool:
    """Whether this driver runs under `ray job submit` (the job already ships code and joins the cluster)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def init_ray(address: str, env_vars: dict[str, str], n_cpus_needed: float, working_dir: str | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS, which `ray job submit` sets), or start a local Ray sized for the work.

    The environment travels to workers; when joining a cluster from outside a Ray job, the code does too
    (`working_dir`, filtered by the repository's .rayignore). Returns whether this call connected or
    started Ray (the caller shuts down only what it started: a sweep that already joined a cluster keeps
    it for the weight diff that follows). The caller's SIGTERM handler survives (`ray.init` replaces it).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no auth token written to the home folder
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    runtime_env: dict = {"env_vars": env_vars}
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            if working_dir and not in_ray_job():  # remote nodes get the code from the driver, not a shared disk
                runtime_env["working_dir"] = working_dir
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",  # a new Ray, never one another program on this machine started
                num_cpus=max(os.cpu_count() or 1, int(n_cpus_needed + 0.999)),
                include_dashboard=False,
                runtime_env=runtime_env,
                log_to_driver=True,
                logging_level=logging.WARNING,  # not "Started a local Ray instance." between the bar's lines
            )
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


def started_local_ray(address: str) -> bool:
    """Whether `init_ray(address, ...)` starts Ray's processes here (rather than joining a cluster)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


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
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_S)
        for ref in done:
            item, slot = inflight.pop(ref)
            idle.append(slot)
            yield item, slot, ref


def here() -> dict:
    """Where this process runs: Ray node id (None outside Ray), host name and pid."""
    node_id = None
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "host": socket.gethostname(), "pid": os.getpid()}


class LocalExecutor:
    """Runs shards one after another on a single in-process worker (`worker_cls(spec)`)."""

    def __init__(self, worker_cls: type[ModelWorker], spec: WorkerSpec, method: str):
        start = time.perf_counter()
        self.worker = worker_cls(spec)
        self.method = getattr(self.worker, method)
        self.startup_seconds = time.perf_counter() - start
        self.retried: list[dict] = []
        self.where = here()
        self.workers = [{**self.where, **self.worker.ready()}]  # as loaded, for the manifest

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, Any, dict]]:
        for shard in shards:
            yield shard, self.method(shard, *payload(shard)), self.where

    def close(self) -> None:
        self.worker = self.method = None


class Remote:
    """Mixed into a worker class to run it as a Ray actor: every answer also says where it ran."""

    def ready(self) -> dict:
        return {**super().ready(), **here()}

    def call(self, method: str, *args) -> dict:
        return {"result": getattr(self, method)(*args), "where": here()}


@functools.cache
def _remote(worker_cls: type[ModelWorker]) -> type:
    return type(f"Remote{worker_cls.__name__}", (Remote, worker_cls), {"__module__": worker_cls.__module__})


class RayExecutor:
    """One actor per worker, each loading the model once; shards are fed as actors free up.

    A shard whose actor fails is retried (up to `max_attempts` tries in all) once Ray has restarted the
    actor; `retried` says which shard, and whether its worker's process died or its whole node was lost.
    Shards are anything with an `id`; each runs as `worker.<method>(shard, *payload(shard))`.
    """

    def __init__(self, worker_cls: type[ModelWorker], spec: WorkerSpec, method: str, n_workers: int, cpus: float,
                 gpus: float, resources: dict[str, float], max_attempts: int, restart_timeout: float):
        import ray

        start = time.perf_counter()
        actor = ray.remote(_remote(worker_cls)).options(
            num_cpus=cpus, num_gpus=gpus, resources=resources or None, max_restarts=max_attempts, max_task_retries=0
        )
        self.method = method
        self.actors = [actor.remote(spec) for _ in range(n_workers)]
        self.workers = self._wait_all([a.ready.remote() for a in self.actors])  # load errors surface here
        self.startup_seconds = time.perf_counter() - start
        self.where = [{k: w[k] for k in ("node_id", "host", "pid")} for w in self.workers]
        self.max_attempts = max_attempts
        self.restart_timeout = restart_timeout
        self.retried: list[dict] = []  # one record per retried shard (see _retry_record)

    @staticmethod
    def _wait_all(refs: list) -> list[dict]:
        """Each actor's `ready()` answer (where it runs, its model load seconds), waiting interruptibly."""
        import ray

        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
        return ray.get(refs)

    def _retry_record(self, shard: Shard, old: dict, err: Exception) -> dict:
        """Which shard was retried and why: its worker's node is gone, or only its process died."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        cause = "node lost" if old["node_id"] not in alive else "worker process died"
        return {"shard": shard.id, "cause": cause, **old, "error": type(err).__name__}

    def run(self, shards: Sequence[Shard], payload: Payload) -> Iterator[tuple[Shard, dict, dict]]:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        queue = deque(shards)
        idle = deque(range(len(self.actors)))
        attempts = dict.fromkeys((s.id for s in shards), 0)
        scoring: dict = {}  # ref -> (shard, worker)
        probing: dict = {}  # ref -> worker: waiting for a restarted actor to answer
        later: list[tuple[float, int]] = []  # (time, worker): probe again then
        failed: dict[int, tuple] = {}  # worker -> (shard, where it was, error), described once it is back
        stalled = None  # since when every worker is lost and waiting for Ray to restart it
        while queue or scoring:
            now = time.monotonic()
            if scoring or idle:
                stalled = None
            elif stalled is None:
                stalled = now
            elif now - stalled > self.restart_timeout:  # a restart with no node to go to waits forever
                raise ShardFailed(f"no worker left to run {len(queue)} shards: Ray has not restarted a lost worker "
                                  f"in {self.restart_timeout:g} s (ray.restart_timeout); `ray status` shows whether "
                                  "a node has room for one")
            for t, w in [x for x in later if x[0] <= now]:
                later.remove((t, w))
                probing[self.actors[w].ready.remote()] = w
            while queue and idle:
                shard, w = queue.popleft(), idle.popleft()
                attempts[shard.id] += 1
                scoring[self.actors[w].call.remote(self.method, shard, *payload(shard))] = (shard, w)
            if not (scoring or probing):
                if not later:
                    raise ShardFailed(f"no worker left to run {len(queue)} shards (every actor is dead)")
                time.sleep(min(WAIT_S, max(0.0, min(t for t, _ in later) - now)))
                continue
            done, _ = ray.wait([*scoring, *probing], num_returns=1, timeout=WAIT_S)
            for ref in done:
                if ref in probing:
                    w = probing.pop(ref)
                    try:
                        back = ray.get(ref)
                    except ActorUnavailableError:  # its node is not yet known to be dead: ask again soon
                        later.append((time.monotonic() + PROBE_AGAIN_S, w))
                        continue
                    except RayActorError:  # restarts used up: this worker is gone for good
                        back = None
                    if w in failed:  # by now Ray has decided whether the old node is dead
                        self.retried.append(self._retry_record(*failed.pop(w)))
                    if back is not None:
                        self.where[w] = {k: back[k] for k in ("node_id", "host", "pid")}
                        idle.append(w)
                    continue
                shard, w = scoring.pop(ref)
                try:
                    answer = ray.get(ref)
                except RayActorError as err:
                    if attempts[shard.id] >= self.max_attempts:
                        raise ShardFailed(
                            f"shard {shard.id} failed on all {self.max_attempts} attempts; last on node "
                            f"{self.where[w]['node_id']} (host {self.where[w]['host']}): {err}"
                        ) from err
                    failed[w] = (shard, self.where[w], err)
                    queue.appendleft(shard)
                    probing[self.actors[w].ready.remote()] = w
                    continue
                self.where[w] = answer["where"]
                idle.append(w)
                yield shard, answer["result"], self.where[w]
        self.retried += [self._retry_record(*f) for f in failed.values()]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
