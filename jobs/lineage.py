"""W&B lineage: which artifacts a job's run produced, and which earlier jobs' artifacts it used.

Every job that logs a W&B run writes a tracking record beside its outputs, `<job folder>/wandb/<job>.json`
(OUT/wandb/sweep.json, runs/x-generate/wandb/generate.json, OUT/discovery/wandb/discover.json, ...): the
run id (a later log of the same folder reuses it), where the run is, and each artifact it logged with
its digest and its files (paths relative to the job folder).

A later job finds its inputs from the files it was given:

  prompts.file          a generate job's generations.parquet or attempts.parquet: the record of the
                        file's folder (job generate) names the generations artifact
  --config, compare.neurons_from
                        a discovery's target.yaml (target-<model>.yaml): the record of the file's folder
                        (OUT/discovery, job discover) names the discovery artifact

and declares each as an input of its run: the artifact is rebuilt from the producer's files under the
producer's name and type, and logged with `use_after_commit`, W&B's way of recording a use that an
offline run can hold (`run.use_artifact` refuses offline runs). On `wandb sync` the server finds the
producer's version by its digest and records this run as using it, so the lineage graph joins the
two runs. The rebuilt artifact must have the digest the producer logged: a file changed since, or one
copied elsewhere without its folder's record, gives no lineage, said once, never an error. A producer
uploaded after its consumer would appear as a user, not the creator: the sync command a run prints
lists its inputs' runs first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runtime.storage import OutDir, write_json_atomic
from verif.analysis.discovery.sets import TARGET_HEADER

RECORD_VERSION = 1
# What a job's input files come from: (how the job got the file, the producing job).
GENERATIONS = "generate"
DISCOVERY = "discover"


def record_path(out: OutDir, job: str) -> Path:
    return out.wandb / f"{job}.json"


def read_record(out: OutDir, job: str) -> dict[str, Any] | None:
    """The job's tracking record in `out`, or None (never logged, or unreadable: then a new run id)."""
    path = record_path(out, job)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("job") == job else None


def write_record(out: OutDir, job: str, run: dict[str, Any], artifacts: list[dict[str, Any]],
                 inputs: list[InputArtifact]) -> None:
    write_json_atomic({"version": RECORD_VERSION, "job": job, **run, "artifacts": artifacts,
                       "inputs": [i.describe() for i in inputs]}, record_path(out, job))


def artifact_entry(artifact, files: list[str]) -> dict[str, Any]:
    """The record of one logged artifact: name, type, digest and its files (relative to the job folder)."""
    return {"name": artifact.name, "type": artifact.type, "digest": artifact.digest, "files": files}


@dataclass(frozen=True)
class InputArtifact:
    """A producer's artifact that this job used: rebuilt from `root`'s files under the producer's name."""

    via: str  # how the job got it: "prompts.file", "--config", "compare.neurons_from"
    path: Path  # the file the job was given
    producer: str  # the producer's job
    root: Path  # the producer's job folder
    name: str
    type: str
    digest: str
    files: tuple[str, ...]
    producer_run: str | None  # the producer's offline run folder or online URL

    def describe(self) -> dict[str, Any]:
        return {"via": self.via, "path": str(self.path), "job": self.producer, "name": self.name, "type": self.type,
                "digest": self.digest, "run": self.producer_run}


def _producer(via: str, given: str, job: str) -> tuple[InputArtifact | None, str | None]:
    """The input artifact behind one given file, or None and the one line saying why there is none."""
    path = Path(given).resolve()
    record = read_record(OutDir(path.parent), job)
    if record is None:
        return None, (f"W&B lineage: {via} {given} has no {job} job's record beside it "
                      f"({path.parent / 'wandb' / (job + '.json')}; copied out of its folder, or logged with "
                      "wandb.mode disabled): the run names no input artifact for it")
    for art in record.get("artifacts", []):
        if path.name in art.get("files", []):
            return InputArtifact(via, path, job, path.parent, art["name"], art["type"], art["digest"],
                                 tuple(art["files"]), record.get("where")), None
    return None, (f"W&B lineage: {via} {given}: the {job} run recorded beside it logged no artifact holding "
                  f"{path.name}: the run names no input artifact for it")


def _is_target_yaml(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith(TARGET_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def find_inputs(prompts_file: str | None = None, config_file: str | None = None,
                neurons_from: str | None = None) -> tuple[list[InputArtifact], list[str]]:
    """The earlier jobs' artifacts behind a job's input files (module docstring), and a line for each
    file that looks like a job's output but cannot be tied to its run. A config file that is no
    discovery output (a hand-written config) is no input and says nothing."""
    found, notes = [], []
    given = [("prompts.file", prompts_file, GENERATIONS, True),
             ("--config", config_file, DISCOVERY, False), ("compare.neurons_from", neurons_from, DISCOVERY, False)]
    for via, path, job, always in given:
        if not path:
            continue
        artifact, note = _producer(via, path, job)
        if artifact is not None:
            if (artifact.name, artifact.digest) not in {(f.name, f.digest) for f in found}:  # used once
                found.append(artifact)
        elif always or _is_target_yaml(path):
            notes.append(note)
    return found, notes


def rebuild(art: InputArtifact):
    """The producer's artifact rebuilt from its folder's files, or None when a file is gone."""
    import wandb

    rebuilt = wandb.Artifact(art.name, type=art.type)
    for entry in art.files:
        path = art.root / entry
        if not path.is_file():
            return None
        rebuilt.add_file(str(path), name=entry)
    return rebuilt


def use_inputs(run, inputs: list[InputArtifact], offline: bool) -> list[str]:
    """Declare each input artifact as used by `run`; returns a line for each that cannot be (changed
    since it was logged)."""
    notes = []
    for art in inputs:
        rebuilt = rebuild(art)
        if rebuilt is None or rebuilt.digest != art.digest:
            notes.append(f"W&B lineage: {art.via} {art.path}: the files of {art.name} changed since its {art.producer} "
                         f"run logged them (digest {art.digest}): the run names no input artifact for it")
            continue
        if offline:  # what run.use_artifact does with a draft artifact, minus its refusal of offline runs
            run._log_artifact(rebuilt, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(rebuilt)
    return notes


def sync_order(inputs: list[InputArtifact], where: str) -> list[str]:
    """Offline run folders to upload, producers first (their artifacts must exist before their use)."""
    first = [i.producer_run for i in inputs if i.producer_run and Path(i.producer_run).is_dir()]
    return list(dict.fromkeys([*first, where]))
