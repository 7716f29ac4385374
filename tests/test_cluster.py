"""Multi-node Ray on one machine: a simulated cluster (`ray.cluster_utils.Cluster`) and `ray job submit`.

The cluster is a head and two worker nodes, each with 1 CPU and one unit of a custom resource,
`fake_gpu`, standing in for a GPU: the sweep asks for it per worker (`ray.resources_per_worker`), so
its two actors must sit on two different nodes. Each node has its own environment, as real nodes do:
its own Hugging Face cache (HF_HOME) and an audit hook (tests/support/audit) that logs the files its
Python processes open. The driver is this test process, joining the cluster the way a user's driver
does (`ray.address`), which ships the code as Ray's working_dir. Faults come from outside: SIGKILL of
the pid an actor reported, `Cluster.remove_node` of the node an actor ran on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import psutil
import pytest
import torch
import yaml
from polars.testing import assert_frame_equal
from transformers import Qwen2Config, Qwen2ForCausalLM

from jobs.config import load_config
from jobs.errors import InputError
from jobs.runtime.resumable import JobFailed
from jobs.runtime.storage import OutDir
from jobs.sweep import run_sweep
from jobs.weight_diff import CheckpointNotOnNode, run_weight_diff
from tests.support.processes import kill_all, still_running, tree
from tests.support.sweeps import (
    N_SHARDS,
    REPO,
    SWEEP_SETTINGS,
    assert_same_results,
    done_shards,
    manifest,
    sweep_overrides,
    wait_for,
)
from verif.analysis.weightdiff import diff_checkpoints, plan_diff

AUDIT_SITE = REPO / "tests" / "support" / "audit"
HUB_ID = "test-org/tuned"  # resolved by each node in its own cache
DRIVER_ONLY_HUB_ID = "test-org/only-on-the-driver"


# ---------------------------------------------------------------------------------------------- checkpoints


def _tiny_checkpoint(folder: Path, seed: int) -> Path:
    """A 2-layer Qwen2 safetensors folder (no tokenizer: the weight diff reads config and tensors only)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _into_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as the Hugging Face cache does after a download of `repo_id` (revision "r0")."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("r0")
    shutil.copytree(folder, repo / "snapshots" / "r0")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return SimpleNamespace(base=_tiny_checkpoint(root / "base", 0), driver_tuned=_tiny_checkpoint(root / "t1", 1),
                           node_tuned=_tiny_checkpoint(root / "t2", 2))


# ---------------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, sweep_model_dir, checkpoints):
    """The simulated 3-node cluster (see the module docstring), torn down with every process it started."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    driver_only, audit = root / "driver_only", root / "audit"
    driver_only.mkdir()
    audit.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes

    def node_env(name: str) -> dict[str, str]:
        hf_home = root / f"hf_{name}"
        _into_hub_cache(hf_home, HUB_ID, checkpoints.node_tuned)
        return {"PYTHONPATH": f"{AUDIT_SITE}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
                "VERIF_AUDIT_LOG": str(audit), "VERIF_AUDIT_WATCH": f"{driver_only}{os.pathsep}{sweep_model_dir}",
                "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}

    node = {"num_cpus": 1, "resources": {"fake_gpu": 1}, "include_dashboard": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(ray_tmp))  # Ray's session files and its address file stay in here
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        c = Cluster(initialize_head=True, head_node_args={**node, "env_vars": node_env("head")})
        workers = [c.add_node(**node, env_vars=node_env(f"w{i}")) for i in (1, 2)]
        c.wait_for_nodes()
        started = [p for n in (c.head_node, *workers) for p in _node_processes(n)]
        try:
            yield SimpleNamespace(cluster=c, address=c.address, head=c.head_node, workers=workers,
                                  driver_only=driver_only, audit=audit, root=root, node_env=node_env)
        finally:
            import ray

            ray.shutdown()
            later = [p for n in (c.head_node, *c.worker_nodes) for p in _node_processes(n)]
            c.shutdown()
            leftover = psutil_wait(started + later)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftover, f"Ray processes outlived Cluster.shutdown (killed now): {leftover}"


def _node_processes(node) -> list[psutil.Process]:
    found = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
    return found


def psutil_wait(procs: list[psutil.Process]) -> list[str]:
    """Give `procs` 10 s to exit; kill and name any that did not."""
    _, alive = psutil.wait_procs(procs, timeout=10)
    names = still_running(alive)
    kill_all(alive)
    return names


def _cluster_cfg(env, out: Path, *extra: str):
    """The shared small sweep, its settings and prompts read from files only the driver has."""
    settings: dict = {}
    for item in SWEEP_SETTINGS:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        settings.setdefault(section, {})[name] = yaml.safe_load(value)
    config_file = env.driver_only / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    prompts = pl.read_parquet(env.reference_out / "prompts.parquet")
    (env.driver_only / "attempts.jsonl").write_text("".join(
        json.dumps({"numbers": r["numbers"], "target": r["target"], "attempt": r["attempt"]}) + "\n"
        for r in prompts.iter_rows(named=True)))
    return load_config(config_file, [
        *sweep_overrides(env.model_dir)[:1], f"prompts.file={env.driver_only / 'attempts.jsonl'}",
        f"ray.address={env.address}", "ray.workers=2", "ray.resources_per_worker={fake_gpu: 1}", *extra,
    ], str(out))


@pytest.fixture
def env(cluster, sweep_reference, sweep_model_dir):
    return SimpleNamespace(**vars(cluster), reference=sweep_reference[0], reference_out=sweep_reference[1],
                           model_dir=sweep_model_dir)


def _audit_log(env) -> dict[int, set[str]]:
    logs = {}
    for f in env.audit.glob("*.log"):
        logs[int(f.stem)] = set(f.read_text().split())
    return logs


def _node_ids(env) -> dict[str, str]:
    return {n.node_id: name for name, n in [("head", env.head), *((f"w{i}", w) for i, w in enumerate(env.workers))]}


# ---------------------------------------------------------------------------------------------- the tests


def _in_thread(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test through .errors
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors
    t.start()
    return t


def test_sweep_spans_nodes_survives_a_killed_worker_and_equals_in_process(env, tmp_path):
    """Shards ran on two nodes; SIGKILL of the worker pid the manifest reports for the first shard gets its
    next shard retried; every row is there once with exactly the in-process numbers; no worker opened a
    file only the driver has (config and prompts travel through Ray), while the model was read on the nodes."""
    out = tmp_path / "OUT"
    killed = {}

    def kill_first_worker():
        first = wait_for(lambda: done_shards(out), "the first shard")
        killed.update(next(iter(first.values())))
        os.kill(killed["pid"], signal.SIGKILL)

    watcher = _in_thread(kill_first_worker)
    report = run_sweep(_cluster_cfg(env, out))
    watcher.join()
    assert not watcher.errors, watcher.errors
    assert report.shards_run == N_SHARDS
    assert_same_results(OutDir(out).read_results(), env.reference)

    (retried,) = report.retried
    assert retried["cause"] == "worker process died"
    assert (retried["pid"], retried["node_id"]) == (killed["pid"], killed["node_id"])
    assert manifest(out)["retried"] == [retried]
    assert any(line.startswith(f"shard {retried['shard']} retried: worker process died") for line in report.lines())

    shards = manifest(out)["shards"].values()
    nodes = {s["node_id"] for s in shards}
    assert len(nodes) >= 2 and nodes <= set(_node_ids(env)), nodes
    assert {s["host"] for s in shards} == {socket.gethostname()}
    pids = {s["pid"] for s in shards}
    assert len(pids) >= 2 and os.getpid() not in pids

    logs = _audit_log(env)
    opened_by_workers = set().union(*(logs.get(p, set()) for p in pids))
    assert str(env.model_dir / "config.json") in opened_by_workers, "the audit hook saw no model file"
    touched = sorted(p for paths in logs.values() for p in paths if p.startswith(str(env.driver_only)))
    assert touched == [], f"cluster processes opened driver-only files: {touched}"


def test_weight_diff_without_a_shared_disk(env, checkpoints, monkeypatch):
    """Each node opens the checkpoints itself: a hub id resolves in that node's cache, and the rows equal
    a serial diff of the nodes' copy (the driver's copy of the tuned model differs, so reading it shows)."""
    import huggingface_hub.constants as hub

    driver_hf = env.root / "hf_driver"
    _into_hub_cache(driver_hf, HUB_ID, checkpoints.driver_tuned)
    _into_hub_cache(driver_hf, DRIVER_ONLY_HUB_ID, checkpoints.driver_tuned)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(driver_hf / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    import ray

    ray.init(address=env.address)  # both diffs below share one connection (and its warm worker processes)
    result = run_weight_diff(str(checkpoints.base), HUB_ID, env.root / "wd", top_k=3, ray_workers=3)
    on_nodes = diff_checkpoints(plan_diff(str(checkpoints.base), str(checkpoints.node_tuned)))
    on_driver = diff_checkpoints(plan_diff(str(checkpoints.base), str(checkpoints.driver_tuned)))
    assert_frame_equal(result.table, on_nodes)
    assert not result.table["one_minus_cos"].equals(on_driver["one_minus_cos"])
    units = json.loads((env.root / "wd" / "weight_diff_summary.json").read_text())["units_per_node"]
    assert len(units) >= 2 and set(units) <= set(_node_ids(env)) and sum(units.values()) == 3

    with pytest.raises(CheckpointNotOnNode, match=rf"node [0-9a-f]+ \(host {socket.gethostname()}\) cannot open "
                                                  rf"the tuned checkpoint '{DRIVER_ONLY_HUB_ID}'"):
        run_weight_diff(str(checkpoints.base), DRIVER_ONLY_HUB_ID, env.root / "wd2", top_k=3, ray_workers=3)
    ray.shutdown()


def test_node_lost_mid_sweep(env, tmp_path):
    """`remove_node` of a worker node while its actor holds a shard: the actor restarts on the free node,
    the shard re-runs, every row once and equal; the report names the shard and the lost node."""
    out = tmp_path / "OUT"
    by_id = {w.node_id: w for w in env.workers}
    lost = {}

    def remove_a_worker_node():
        on_worker = wait_for(lambda: [s for s in done_shards(out).values() if s["node_id"] in by_id],
                             "a shard from a worker node")
        lost.update(on_worker[0])
        os.kill(lost["pid"], signal.SIGSTOP)  # holds its next shard until the node goes
        env.cluster.remove_node(by_id[lost["node_id"]])

    watcher = _in_thread(remove_a_worker_node)
    report = run_sweep(_cluster_cfg(env, out))
    watcher.join()
    assert not watcher.errors, watcher.errors
    assert_same_results(OutDir(out).read_results(), env.reference)
    (retried,) = report.retried
    assert retried["cause"] == "node lost" and retried["node_id"] == lost["node_id"]
    assert manifest(out)["shards"][retried["shard"]]["node_id"] != lost["node_id"]  # re-ran elsewhere
    text = "\n".join(report.lines())
    assert f"shard {retried['shard']} retried: node lost (node {lost['node_id']}" in text


def test_a_worker_no_node_can_hold_is_refused_at_once(env, tmp_path):
    """Ray would wait forever for room for such a worker; the job says so before any shard."""
    with pytest.raises(InputError, match=r"^ray: no node of the cluster can hold a worker, which needs CPU 1, "
                                         r"fake_gpu 2 \(ray.cpus_per_worker, .*node\(s\) have: CPU 1, fake_gpu 1; "):
        run_sweep(_cluster_cfg(env, tmp_path / "OUT", "ray.resources_per_worker={fake_gpu: 2}"))
    assert not done_shards(tmp_path / "OUT")


def test_more_gpus_per_worker_than_any_node_has_is_refused_at_once(env, tmp_path):
    """A worker split over 2 GPUs needs them on one node (issue 23): refused as any worker no node can hold."""
    with pytest.raises(InputError, match=r"^ray: no node of the cluster can hold a worker, which needs CPU 1, GPU 2, "
                                         r"fake_gpu 1 .*node\(s\) have: CPU 1, GPU 0, fake_gpu 1; "):
        run_sweep(_cluster_cfg(env, tmp_path / "OUT", "ray.gpus_per_worker=2"))
    assert not done_shards(tmp_path / "OUT")


def test_a_lost_worker_with_no_room_to_restart_stops_the_job(env, tmp_path):
    """The only worker's node is lost and no other node has its resource: Ray cannot restart it, so after
    ray.restart_timeout the job stops with one line saying what is on disk and how to continue."""
    out = tmp_path / "OUT"
    lonely = env.cluster.add_node(num_cpus=1, resources={"lonely": 1}, include_dashboard=False,
                                  env_vars=env.node_env("lonely"))
    env.cluster.wait_for_nodes()

    def lose_it():
        first = wait_for(lambda: list(done_shards(out).values()), "a shard from the lonely node")[0]
        os.kill(first["pid"], signal.SIGSTOP)  # holds its next shard until the node goes
        env.cluster.remove_node(lonely)

    watcher = _in_thread(lose_it)
    cfg = _cluster_cfg(env, out, "ray.workers=1", "ray.resources_per_worker={lonely: 1}", "ray.restart_timeout=1")
    with pytest.raises(JobFailed) as info:
        run_sweep(cfg)
    watcher.join()
    assert not watcher.errors, watcher.errors
    on_disk = len(done_shards(out))
    assert 1 <= on_disk < N_SHARDS
    line = info.value.line(["launch.py", "--sweep"])
    assert line.startswith("no worker left to run ") and "Ray has not restarted a lost worker in 1 s" in line
    assert f"{on_disk} of {N_SHARDS} shards are on disk in {out}; continue with: " in line and line.endswith(f"--out {out}")


# ---------------------------------------------------------------------------------------------- ray job submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_submit_command() -> list[str]:
    """The README's `ray job submit` command, as words (its line continuation joined)."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^ray job submit .*?(?<!\\)$", text.replace("\\\n", " "), re.M)
    assert m, "README has no `ray job submit` command"
    return shlex.split(m.group(0))


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` with the job server, in the foreground (--block) so its processes stay its children.

    Started as the README says: from a shell where the project's environment is active (so the job's
    `python` is the project's). No PYTHONPATH: the job must run the code it was sent.
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="vj", dir="/tmp"))
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", RAY_TMPDIR=str(ray_tmp),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           f"--port={_free_port()}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2"]
    log = open(tmp_path / "ray_head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, "the Ray head's job server", proc)
        yield SimpleNamespace(url=url, env=env, ray_tmp=ray_tmp)
    finally:
        procs = tree(proc.pid)
        proc.terminate()
        leftover = psutil_wait(procs)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftover, f"processes of `ray start --head` outlived it (killed now): {leftover}"


def test_ray_job_submit_as_the_readme_shows(ray_head, sweep_model_dir, sweep_reference, tmp_path):
    words = _readme_submit_command()
    dash = words.index("--")
    assert words[:dash] == ["ray", "job", "submit", "--address", "http://HEAD:8265", "--working-dir", "."]
    assert words[dash + 1:dash + 4] == ["python", "launch.py", "--sweep"]
    out = tmp_path / "OUT"
    sweep = [f"--set={item}" for item in sweep_overrides(sweep_model_dir, "ray.workers=1")]
    cmd = [str(Path(sys.executable).parent / "ray"), *words[1:4], ray_head.url, *words[5:dash + 4],
           "--out", str(out), *sweep]
    proc = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert manifest(out)["finished"]
    assert_same_results(OutDir(out).read_results(), sweep_reference[0])

    # What was shipped: the repository's own files outside tests/ and benchmarks/ and nothing else: no
    # environments, history, outputs, measured results or tests (a bound that grows with the code itself).
    shipped = ray_head.ray_tmp / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    packages = [p for p in shipped.iterdir() if p.is_dir()]
    assert len(packages) == 1, sorted(shipped.iterdir())
    package = packages[0]
    files = [p.relative_to(package) for p in package.rglob("*") if p.is_file()]
    assert {Path("launch.py"), Path("jobs/sweep.py"), Path("verif/model/engine.py")} <= set(files)
    tops = {f.parts[0] for f in files}
    assert not tops & {".venv", ".git", "runs", "out", "results", "benchmarks", "tests"}, tops
    assert not [f for f in files if f.suffix == ".parquet"]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    own = {Path(f) for f in listed if Path(f).parts[0] not in {"tests", "benchmarks"} and (REPO / f).is_file()}
    assert set(files) <= own, f"shipped files that are not the repository's own: {sorted(set(files) - own)[:10]}"


def test_rayignore_keeps_environments_and_outputs_off_the_cluster(tmp_path):
    """Ray's own packaging of a folder laid out like a used checkout, with the repository's .rayignore."""
    from ray._private.runtime_env.packaging import create_package

    src = tmp_path / "checkout"
    for rel in (".venv/lib/site.py", ".git/HEAD", "runs/default/results/m0.parquet", "out/x.json",
                "benchmarks/results/gpu.json", "tests/test_x.py", "jobs/results/keep.py", "jobs/sweep.py", "x.parquet"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    shutil.copy(REPO / ".rayignore", src / ".rayignore")
    create_package(str(src), tmp_path / "pkg.zip", include_gitignore=True)
    names = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert names == {".rayignore", "jobs/sweep.py"}, names
