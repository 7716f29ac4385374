"""The generate job: a model's own chains of thought on Countdown problems, as the study took R1's.

`python launch.py --generate` gives `model.path` TinyZero's prompt (the one R1 was trained on) for
every problem, on the sweep's workers (Ray actors, or this process with `ray.workers: 0`), sharded by
problems. Each shard's samples are written and recorded the moment they return, so an interrupted job
continues where it stopped (`--resume`, with the sweep's lock, signals and verified shards:
`jobs.runtime.resumable`). Generation is deterministic per run position (`verif.model.generate`) and shards
end where the run's batches end, so a resumed run gives the samples an uninterrupted one gives.

From the shards on disk it then writes

  OUT/generations.parquet  one row per (problem, sample): the text, why it ended, its new tokens and
                           TinyZero's reward verdict; a valid `prompts.file` of model outputs
  OUT/attempts.parquet     the attempt lines of those outputs (lines starting with "- ", cleaned by
                           `prompts.extract`, chosen by `prompts.attempts`) labelled by our validator:
                           what a sweep with `prompts.file: OUT/generations.parquet` verifies

and one W&B run (job_type generate). Outputs without an attempt line are counted, never an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import polars as pl
from tqdm.auto import tqdm

from jobs.config import Config
from jobs.errors import InputError
from jobs.inputs import JOBS, check_out_dir, located_problems_of
from jobs.runtime.pool import run_recorded, worker_pool
from jobs.runtime.resumable import finish, recover, reset_untrusted, running
from jobs.runtime.storage import OutDir, package_versions, read_manifest, write_json_atomic, write_parquet_atomic
from jobs.prepare import limit_generation, prepare_models, prepare_prompts
from jobs.tracking import log_generate
from jobs.runtime.worker import ModelWorker
from verif.model.generate import FINISH_REASONS, Sample, generate
from verif.model.loading import ModelSource
from verif.task.cot import AttemptTable
from verif.task.countdown import generate_problems
from verif.task.prompt_file import load_prompt_file
from verif.task.tinyzero import generation_prompt, generations_frame
from verif.task.validator import Problem

# The config sections that decide the samples (compared on --resume); the others belong to other jobs.
GENERATING_SECTIONS = ("model", "generate")
# Planning keys of a shard's manifest entry (kept when its file is found damaged and it goes back to pending).
SHARD_KEYS = ("problems", "samples")


class GenerateError(InputError):
    """A generate job that cannot start or continue, with the key or file in the message."""


@dataclass(frozen=True)
class GenerationShard:
    """Consecutive problems (positions in the run) whose samples one worker call generates."""

    id: str
    problem_ids: tuple[int, ...]


class ShardGenerator(ModelWorker):
    """A generate job's worker: continues TinyZero prompts; the prompts and settings come with each call."""

    scores = False  # generation needs room for its KV cache, which the scoring estimate does not count

    def generate(self, shard: GenerationShard, prompts: list[str], settings: dict) -> list[Sample]:
        return generate(self.loaded, prompts, first_index=shard.problem_ids[0], **settings).samples


def generation_settings(cfg: Config) -> dict:
    """The keyword arguments of `verif.model.generate.generate` that `generate.*` sets."""
    g = cfg.generate
    return dict(max_new_tokens=g.max_new_tokens, n=g.n, do_sample=g.do_sample, temperature=g.temperature,
                top_p=g.top_p, seed=g.seed, batch_size=g.batch_size)


def describe_decoding(cfg: Config) -> str:
    """How the samples are drawn, in words (the report's first line)."""
    g = cfg.generate
    how = f"sampled (temperature {g.temperature:g}, top_p {g.top_p:g}, seed {g.seed})" if g.do_sample else "greedy"
    return f"{how}, at most {g.max_new_tokens} new tokens"


@dataclass
class GeneratePlan:
    """What a generate job will do, every input checked: the model, the problems and their shards."""

    cfg: Config
    source: ModelSource
    problems: list[Problem]
    problems_from: str  # "generated: ..." or the problems file
    shards: list[GenerationShard]

    @property
    def n_samples(self) -> int:
        return len(self.problems) * self.cfg.generate.n

    @property
    def problems_digest(self) -> str:
        """Identity of the problems, so a resume notices an edited problems file."""
        text = json.dumps([[list(p.numbers), p.target] for p in self.problems])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _problems(cfg: Config) -> tuple[list[Problem], str, list[str]]:
    """The problems, what they are (for the report) and where each is (for messages about one)."""
    g = cfg.generate
    if not g.problems_file:
        problems = generate_problems(g.n_problems, g.seed)
        return (problems, f"generated: generate.n_problems {g.n_problems}, seed {g.seed}",
                [f"generated problem {i} (generate.seed {g.seed})" for i in range(len(problems))])
    located = located_problems_of(g.problems_file)
    return [p for _, p in located], g.problems_file, [where for where, _ in located]


def prepare_generation(cfg: Config) -> GeneratePlan:
    """Every check that can fail (model, tokenizer, settings, problems, every prompt and its new tokens
    within the model's context: `jobs.prepare`), before any weights load."""
    paths, g, job = cfg.model.paths, cfg.generate, JOBS["generate"]
    if len(paths) != 1:
        raise GenerateError(f"model.path: --generate runs one model, got {len(paths)} ({', '.join(paths)}); "
                            "give one path")
    models = prepare_models(cfg, job)
    if g.n > 1 and not g.do_sample:
        raise GenerateError(f"generate.n {g.n}: greedy decoding gives {g.n} identical samples; set "
                            "generate.do_sample: true to draw several, or generate.n: 1")
    per_call = max(1, g.batch_size // g.n)
    if g.problems_per_shard % per_call:
        raise GenerateError(
            f"generate.problems_per_shard {g.problems_per_shard}: must be a multiple of the problems in one "
            f"generate call (generate.batch_size {g.batch_size} // generate.n {g.n} = {per_call}), so that shards "
            "end where the run's batches end")
    problems, problems_from, where = _problems(cfg)
    prepared = prepare_prompts(cfg, job, models)  # the tokenizer loads, and the worker's Yes/No ids resolve
    (source,), (tokenizer,) = prepared.sources, prepared.tokenizers
    limit_generation(cfg, source, tokenizer, [generation_prompt(p.numbers, p.target) for p in problems], where)
    step = g.problems_per_shard
    shards = [GenerationShard(f"p{a:06d}", tuple(range(a, min(a + step, len(problems)))))
              for a in range(0, len(problems), step)]
    return GeneratePlan(cfg, source, problems, problems_from, shards)


def _refuse_changed_config(old: dict, cfg: Config, out: OutDir) -> None:
    """The keys that decide the samples (GENERATING_SECTIONS) must be as the folder was started with."""
    now = cfg.to_dict()
    diffs = [f"{name}.{key}: {old['config'].get(name, {}).get(key)!r} -> {value!r}"
             for name in GENERATING_SECTIONS for key, value in now[name].items()
             if old["config"].get(name, {}).get(key) != value]
    if diffs:
        raise GenerateError(f"--resume: the config differs from the one {out.root} was started with: " + "; ".join(diffs))


def _open_out(plan: GeneratePlan, out: OutDir, old: dict | None) -> tuple[dict, dict[str, str]]:
    """Continue the manifest `old` (its problems must be the plan's; shard files that fail verification
    go back to pending), or create the folder and its manifest."""
    if old is not None:
        if old["problems"]["digest"] != plan.problems_digest:
            raise GenerateError(f"--resume: the problems differ from the ones {out.root} was started with "
                                f"({old['problems']['source']} -> {plan.problems_from})")
        return old, reset_untrusted(out, old, SHARD_KEYS)
    cfg = plan.cfg
    out.root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "job": "generate",
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "problems": {"source": plan.problems_from, "n": len(plan.problems), "digest": plan.problems_digest},
        "shards": {s.id: {"status": "pending", "problems": len(s.problem_ids),
                          "samples": len(s.problem_ids) * cfg.generate.n} for s in plan.shards},
    }
    write_json_atomic(manifest, out.manifest)
    return manifest, {}


@dataclass
class ShardsGenerated:
    """What this driver generated (not what an earlier one left on disk)."""

    shards: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # from the first shard handed out to the last written
    startup_seconds: float = 0.0
    retried: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.shards and self.seconds > 0 else None


def run_shards(plan: GeneratePlan, out: OutDir, manifest: dict) -> ShardsGenerated:
    """Generate every shard the manifest does not hold as done; each is written and recorded as it returns.

    The driver's bar counts samples and the new tokens in each returned shard (tokens per second).
    """
    cfg = plan.cfg
    pending = [s for s in plan.shards if manifest["shards"][s.id]["status"] != "done"]
    ran = ShardsGenerated()
    if not pending:
        return ran
    prompts = [generation_prompt(p.numbers, p.target) for p in plan.problems]
    settings = generation_settings(cfg)
    name = plan.source.name
    bar = tqdm(total=sum(len(s.problem_ids) for s in pending) * cfg.generate.n, desc=f"loading {name}",
               unit="sample", dynamic_ncols=True)
    try:
        with worker_pool(cfg.ray, out) as pool:
            spec = pool.spec(model=plan.source.spec, dtype=cfg.model.dtype, device=cfg.model.device,
                             yes=tuple(cfg.scoring.yes), no=tuple(cfg.scoring.no), engine=cfg.engine)
            executor = pool.executor(ShardGenerator, "generate", spec, cfg.shards.max_attempts)
            manifest.setdefault("workers", []).extend({"model": name, **w} for w in executor.workers)
            bar.set_description(f"generating {name}")
            start = time.perf_counter()

            def progress(frame: pl.DataFrame) -> None:
                ran.new_tokens += int(frame["n_new_tokens"].sum())
                bar.update(frame.height)
                bar.set_postfix(tokens_per_s=f"{ran.new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")

            recorded = run_recorded(executor, pending, lambda s: ([prompts[i] for i in s.problem_ids], settings),
                                    out, manifest, lambda samples: generations_frame(plan.problems, samples), progress)
            ran.seconds = time.perf_counter() - start
            ran.shards, ran.retried = recorded.shards, recorded.retried
        ran.startup_seconds = pool.startup_seconds
    finally:
        bar.close()
    return ran


def read_generations(plan: GeneratePlan, out: OutDir) -> pl.DataFrame:
    """Every shard's samples in run order; each (problem, sample) exactly once, or the job is not done."""
    frame = pl.concat([pl.read_parquet(out.shard(s.id)) for s in plan.shards]).sort("problem_id", "sample")
    keys = frame.select("problem_id", "sample").unique().height
    if frame.height != plan.n_samples or keys != frame.height:
        raise GenerateError(f"{out.results} holds {frame.height} samples ({frame.height - keys} duplicated); "
                            f"expected {plan.n_samples}")
    return frame


def generation_numbers(generations: pl.DataFrame, attempts: AttemptTable) -> dict[str, float | int]:
    """The job's summary numbers (printed, and the W&B run's summary)."""
    n = generations.height
    numbers: dict[str, float | int] = {
        "n_problems": generations["problem_id"].n_unique(),
        "n_samples": n,
        "n_correct": int(generations["correct"].sum()),
        "fraction_correct": float(generations["correct"].mean()),
        "mean_reward": float(generations["reward"].mean()),
        "n_with_answer": int(generations["answer"].is_not_null().sum()),
        "new_tokens": int(generations["n_new_tokens"].sum()),
        "n_attempts": attempts.frame.height,
        "n_attempts_correct": int(attempts.frame["label"].sum()),
        "n_outputs_without_attempt": len(attempts.no_attempt_rows),
        "n_rules_differ": attempts.n_rules_differ,
    }
    numbers.update({f"finish_{r}": int((generations["finish"] == r).sum()) for r in FINISH_REASONS})
    return numbers


@dataclass
class GenerateReport:
    """What a finished generate job did and where everything is (printed at the end)."""

    out: OutDir
    plan: GeneratePlan
    ran: ShardsGenerated
    shards_skipped: int
    recomputed: dict[str, str]
    numbers: dict[str, float | int]
    seconds: float = 0.0
    wandb_dir: str | None = None

    def bookkeeping(self) -> dict[str, float | int | None]:
        r = self.ran
        return {"shards_run": r.shards, "shards_skipped": self.shards_skipped, "seconds": self.seconds,
                "startup_seconds": r.startup_seconds, "generate_seconds": r.seconds,
                "new_tokens_this_run": r.new_tokens, "tokens_per_s": r.tokens_per_s, "n_retried": len(r.retried)}

    def lines(self) -> list[str]:
        cfg, r, x, out = self.plan.cfg, self.ran, self.numbers, self.out
        rate = f"{r.new_tokens} new tokens at {r.tokens_per_s:.1f} tokens/s" if r.tokens_per_s else "nothing left to run"
        lines = [
            f"generated {x['n_samples']} samples of {x['n_problems']} problems ({self.plan.problems_from}) with "
            f"{self.plan.source.spec}, {describe_decoding(cfg)}: {r.shards} shards run ({self.shards_skipped} already "
            f"on disk), {self.seconds:.1f} s (startup {r.startup_seconds:.1f} s), {rate}",
        ]
        for item in r.retried:
            lines.append(f"shard {item['shard']} retried: {item['cause']} (node {item['node_id']}, host {item['host']})")
        if self.recomputed:
            lines.append(f"shards recomputed because their files could not be trusted: {', '.join(self.recomputed)}")
        finish = ", ".join(f"{k} {x[f'finish_{k}']}" for k in FINISH_REASONS)
        lines.append(f"ended by: {finish}; TinyZero's reward: {x['n_correct']} of {x['n_samples']} correct "
                     f"({x['n_with_answer']} with an <answer> on the last line)")
        p = cfg.prompts
        if x["n_attempts"]:
            lines.append(
                f"attempts: {x['n_attempts']} (prompts.attempts {p.attempts}, prompts.extract {p.extract}), "
                f"{x['n_attempts_correct']} correct by our validator; {x['n_outputs_without_attempt']} outputs "
                f"without an attempt line; {x['n_rules_differ']} where the study's rule and remarks differ")
        else:
            lines.append(
                f'attempts: none: no output has a line starting with "- " (the study\'s attempt lines), so '
                f"{out.attempts.name} is empty and a sweep on these outputs has nothing to verify (a model "
                "trained like R1 writes such lines; small instruct models number their steps instead)")
        lines += [
            f"generations: {out.generations} (a sweep reads it with --set prompts.file={out.generations})",
            f"attempts:    {out.attempts}",
            f"manifest:    {out.manifest}",
            f"W&B run:     {self.wandb_dir or 'disabled'}",
        ]
        return lines


def run_generate(cfg: Config, resume: bool = False) -> GenerateReport:
    """The whole job: plan, generate the shards not on disk, then write and log the outputs.

    Holds OUT's lock throughout; SIGINT, SIGTERM and shards that fail past their retries stop it with
    one line saying how many shards are on disk and how to continue (`jobs.runtime.resumable.running`).
    """
    start = time.perf_counter()
    out = OutDir(cfg.out)
    check_out_dir(out, resume, "generate")  # a folder that cannot be continued: refused before anything is made
    if out.manifest.exists():
        _refuse_changed_config(read_manifest(out), cfg, out)
    plan = prepare_generation(cfg)
    with running(out, "generate") as job:
        old = read_manifest(out) if out.manifest.exists() else None
        job.total = len(plan.shards)
        recover(out, job.lock)
        job.manifest, recomputed = _open_out(plan, out, old)
        manifest = job.manifest
        skipped = job.total - sum(e["status"] != "done" for e in manifest["shards"].values())
        ran = run_shards(plan, out, manifest)
        generations = read_generations(plan, out)
        write_parquet_atomic(generations, out.generations)
        attempts = load_prompt_file(out.generations, cfg.prompts.extract, cfg.prompts.attempts)
        write_parquet_atomic(attempts.frame, out.attempts)
        report = GenerateReport(out, plan, ran, skipped, recomputed, generation_numbers(generations, attempts))
        report.seconds = time.perf_counter() - start
        report.wandb_dir = log_generate(cfg, out, generations, attempts.frame,
                                        {**report.numbers, **report.bookkeeping()})
        report.seconds = time.perf_counter() - start
        finish(out, manifest, **report.bookkeeping())
        return report
