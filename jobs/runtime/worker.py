"""Workers: each owns one loaded model and turns shards of a job into results.

The same classes run in-process (`ray.workers: 0`, tests, benchmarks) and as Ray actors
(`jobs.runtime.executors`), so the distributed path computes exactly what the single-process path computes.
Workers return results to the driver instead of writing files: on a multi-node cluster only the
driver's disk is certain to hold the output folder. `ModelWorker` loads the model quietly and checks
the fast path once; each job adds the method its shards run (`ShardScorer.score` for sweeps; the
generate and discover jobs define their own).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from jobs.cross import SourceShard
from jobs.reference import ReferenceShard
from verif.design.conditions import PAIRED_KINDS, Ablation
from verif.model.engine import Scorer
from verif.model.interventions import ActivationCache, ReferenceMeans, ReferenceSums, Sites, Sources
from verif.model.loading import load_model
from verif.model.options import EngineOptions
from verif.model.score import resolve_yes_no
from verif.model.selfcheck import self_check


@dataclass(frozen=True)
class Shard:
    """A slice of prompts scored under a group of conditions, for one model."""

    id: str
    model: str
    prompt_ids: tuple[int, ...]
    conditions: tuple[str, ...]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, shipped through Ray (no files on the head node are assumed).

    `check_prompt`: a real prompt of the job, scored once on the fast and the hook path before any
    shard (`verif.model.selfcheck`); None skips the check. `gpus`: the GPUs the model is split over (Ray's
    `ray.gpus_per_worker`; the worker numbers them 0..gpus-1 as it sees them). `max_prompt_tokens`: the
    longest prompt it may see (with `engine`, what the room left for scoring on each GPU follows from).
    """

    model: str
    dtype: str
    device: str
    yes: tuple[str, ...]
    no: tuple[str, ...]
    engine: EngineOptions
    threads: int | None = None
    check_prompt: str | None = None
    gpus: int = 1
    max_prompt_tokens: int | None = None


class ModelWorker:
    """Loads the model once (quietly), resolves the Yes/No ids and checks the fast path. `scores`: whether its
    shards score (on a GPU the model then has to fit with room for the engine's budgets, else for its weights)."""

    scores = True

    def __init__(self, spec: WorkerSpec):
        # Workers stay quiet: the driver owns the one progress bar (transformers' weight-loading
        # bars from every worker would flood its log; Ray workers also get TQDM_DISABLE).
        hf_logging.disable_progress_bar()
        if spec.threads:
            torch.set_num_threads(max(1, int(spec.threads)))
        self.spec = spec
        start = time.perf_counter()
        self.loaded = load_model(spec.model, spec.dtype, spec.device, spec.gpus, spec.engine if self.scores else None,
                                 spec.max_prompt_tokens)
        self.load_seconds = time.perf_counter() - start
        self.ids = resolve_yes_no(self.loaded.tokenizer, spec.yes, spec.no)
        self.check = None
        if spec.check_prompt is not None:  # before any Scorer exists: the check casts and re-fuses weights
            tokens = self.loaded.tokenizer.encode(spec.check_prompt, add_special_tokens=False)
            self.check = self_check(self.loaded, self.ids, tokens, path=spec.engine.path)

    def ready(self) -> dict:
        """Cheap call the driver waits on, so model loading is not counted as work time."""
        devices = dict.fromkeys(str(d) for d in self.loaded.placement.devices)
        return {"load_seconds": self.load_seconds, "device": ",".join(devices),
                "pid": os.getpid(), "self_check": dataclasses.asdict(self.check) if self.check else None}


class ShardScorer(ModelWorker):
    """A sweep's worker: scores shards; prompts and ablations come with each call (and what non-zero kinds
    read: the reference means, the partners' texts, the cross source's activations). A shard of the mean kinds'
    first pass (`jobs.reference.ReferenceShard`) returns its prompts' activation sums instead, one of the cross
    source's (`jobs.cross.SourceShard`) its prompts' activations."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.scorer = Scorer(self.loaded, self.ids, spec.engine)

    def score(self, shard: Shard | ReferenceShard | SourceShard, *args
              ) -> dict[str, list] | ReferenceSums | ActivationCache:
        """`score_shard` or, for a first-pass shard, `reference_sums` or `source_activations`, with the shard's
        payload."""
        if isinstance(shard, ReferenceShard):
            return self.reference_sums(*args)
        if isinstance(shard, SourceShard):
            return self.source_activations(*args)
        return self.score_shard(shard, *args)

    def source_activations(self, texts: list[str], sites: Sites) -> ActivationCache:
        """The activations at `sites` of this model's unablated forward of each prompt, on the CPU (they go to
        the driver, which writes them to OUT)."""
        cache = self.scorer.activations(self.scorer.tokenize(texts), sites)
        return ActivationCache(sites, [{k: t.cpu() for k, t in e.items()} for e in cache.entries])

    def reference_sums(self, texts: list[str], sites: Sites, positional: bool) -> ReferenceSums:
        """Float64 sums of the activations at `sites` over these reference prompts."""
        return self.scorer.reference_sums(self.scorer.tokenize(texts), sites, positional)

    def score_shard(self, shard: Shard, prompts: list[str], ablations: list[Ablation], model_name: str,
                    means: ReferenceMeans | None = None, partners: list[str] | None = None,
                    cross: ActivationCache | None = None) -> dict[str, list]:
        """Result columns for every (prompt, condition) of the shard, prompt-major. For resample the
        partners' activations are read first, from an unablated forward of `partners[i]` (prompt i's); cross
        reads `cross` (entry i: the source model's activations on prompt i)."""
        cache = None
        paired = Sites.of(ablations, PAIRED_KINDS)
        if paired:
            cache = self.scorer.activations(self.scorer.tokenize(partners), paired)
        table = self.scorer.score_prompts(prompts, ablations, Sources(means, cache, cross))
        n, c = len(shard.prompt_ids), len(shard.conditions)
        return {
            "model": [model_name] * (n * c),
            "prompt_id": [pid for pid in shard.prompt_ids for _ in range(c)],
            "condition": list(shard.conditions) * n,
            "p_yes": table.p_yes.reshape(-1).tolist(),
            "p_no": table.p_no.reshape(-1).tolist(),
            "p_yes_norm": table.p_yes_norm.reshape(-1).tolist(),
            "log_odds": table.log_odds.reshape(-1).tolist(),
        }
