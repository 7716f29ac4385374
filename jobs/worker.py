"""A scoring worker: owns one loaded model and turns shards into result columns.

The same class runs in-process (`ray.workers: 0`, tests, benchmarks) and as a Ray actor, so the
distributed path computes exactly what the single-process path computes. Workers return columns to
the driver instead of writing files: on a multi-node cluster only the driver's disk is certain to
hold the output folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from verif.model.engine import Scorer
from verif.design.heads import Head
from verif.model.loading import load_model
from verif.model.options import EngineOptions
from verif.model.score import resolve_yes_no


@dataclass(frozen=True)
class Shard:
    """A slice of prompts scored under a group of conditions, for one model."""

    id: str
    model: str
    prompt_ids: tuple[int, ...]
    conditions: tuple[str, ...]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, shipped through Ray (no files on the head node are assumed)."""

    model: str
    dtype: str
    device: str
    yes: tuple[str, ...]
    no: tuple[str, ...]
    engine: EngineOptions
    threads: int | None = None


class ShardScorer:
    """Loads the model once, then scores shards; prompts and head sets come with each call."""

    def __init__(self, spec: WorkerSpec):
        # Workers stay quiet: the driver owns the one progress bar (transformers' weight-loading
        # bars from every worker would flood its log; Ray workers also get TQDM_DISABLE).
        hf_logging.disable_progress_bar()
        if spec.threads:
            torch.set_num_threads(max(1, int(spec.threads)))
        self.spec = spec
        start = time.perf_counter()
        self.loaded = load_model(spec.model, spec.dtype, spec.device)
        self.load_seconds = time.perf_counter() - start
        ids = resolve_yes_no(self.loaded.tokenizer, spec.yes, spec.no)
        self.scorer = Scorer(self.loaded, ids, spec.engine)

    def ready(self) -> dict:
        """Cheap call the driver waits on, so model loading is not counted as scoring time."""
        return {"load_seconds": self.load_seconds, "device": str(self.scorer.device), "pid": os.getpid()}

    def score(
        self, shard: Shard, prompts: list[str], head_sets: list[tuple[Head, ...]], model_name: str
    ) -> dict[str, list]:
        """Result columns for every (prompt, condition) of the shard, prompt-major, and this process id."""
        table = self.scorer.score_prompts(prompts, head_sets)
        n, c = len(shard.prompt_ids), len(shard.conditions)
        return {
            "model": [model_name] * (n * c),
            "prompt_id": [pid for pid in shard.prompt_ids for _ in range(c)],
            "condition": list(shard.conditions) * n,
            "p_yes": table.p_yes.reshape(-1).tolist(),
            "p_no": table.p_no.reshape(-1).tolist(),
            "p_yes_norm": table.p_yes_norm.reshape(-1).tolist(),
            "log_odds": table.log_odds.reshape(-1).tolist(),
            "pid": os.getpid(),
        }
