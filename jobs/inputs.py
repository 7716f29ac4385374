"""Checks every job makes on its inputs before it creates its output folder or loads any weights.

Each failure is an `InputError`: one line naming the folder, the file (and line) or the key, the bad
value and what would be valid. `JOBS` says, once, what each job is to these checks (its folder, what
it reads); `check_job_inputs` makes the checks that import nothing heavy, so the command line runs them
before it imports torch (a bad path costs a fraction of a second), and `jobs.prepare` the ones that
need the models' configs and tokenizers. What a file holds (records, line breaks, UTF-8) is checked
by its reader in `verif.task.prompt_file`, which names the line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Config
from jobs.errors import InputError
from jobs.runtime.lock import refuse_if_locked
from jobs.runtime.storage import OutDir, read_manifest
from verif.design.conditions import CIRCUIT_NEEDS_TARGET
from verif.design.heads import parse_heads
from verif.design.neurons import parse_neurons
from verif.task.prompt_file import load_prompt_file, located_problems
from verif.task.prompts import load_template


@dataclass(frozen=True)
class Job:
    """What the one preparation path needs to know of a job; `JOBS` holds them all."""

    name: str  # as manifests, lock files and messages name it
    subfolder: str = ""  # its folder inside OUT (OUT/discovery, OUT/compare), or OUT itself
    prompts: bool = False  # it reads the sweep's prompts (prompts.*: generated, or prompts.file)
    targets: bool = False  # it checks ablation.target_heads / target_neurons against its models
    ablates_targets: bool = False  # ... and ablates them (a discovery ablates sets of its own)
    engine: bool = False  # its prompts go through the scoring engine, whose token budgets are a limit too

    def folder(self, cfg: Config) -> OutDir:
        return OutDir(Path(cfg.out) / self.subfolder) if self.subfolder else OutDir(cfg.out)


JOBS = {job.name: job for job in (
    Job("sweep", prompts=True, targets=True, ablates_targets=True, engine=True),
    Job("discover", "discovery", prompts=True, targets=True, engine=True),
    Job("generate"),
    Job("compare", "compare", prompts=True),
    Job("weight-diff"),
)}


def _shown(names: list[str], at_most: int = 3) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(sorted(names)[:at_most]) + more


def check_out_dir(out: OutDir, resume: bool, job: str = "sweep") -> None:
    """OUT can be started (new or empty, creatable) or, with `resume`, continued; nothing is created.

    Refused: a file where OUT or one of its parents should be, a folder this user cannot write, a
    non-empty folder holding no `job` (its marker is `out.manifest`), one that already holds one
    without `resume`, `resume` where OUT does not exist, and a folder another driver is writing.
    The lock file and Ray record a killed driver leaves behind count as empty.
    """
    root = out.root
    existing = next(p for p in (root, *root.parents) if p.exists() or p.is_symlink())
    if existing.is_symlink() and not existing.exists():
        raise InputError(f"output folder {root}: {existing} is a link to nothing; choose another --out")
    if not existing.is_dir():
        where = "it" if existing == root else existing
        raise InputError(f"output folder {root}: {where} is a file, not a folder; choose another --out")
    if existing != root:
        if resume:
            raise InputError(f"--resume: nothing to resume in {root} (no such folder); check --out, or drop "
                             f"--resume to start a new {job}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"output folder {root} cannot be created: {existing} is not writable by this user; "
                             "choose another --out")
        return
    refuse_if_locked(out.lock)
    ours = {out.lock.name, out.ray_processes.name}
    foreign = [p.name for p in root.iterdir() if p.name not in ours]
    if out.manifest.exists():
        check_job(read_manifest(out), job, out, resume)
    if foreign and not out.manifest.exists():
        if resume:
            raise InputError(f"--resume: {root} has no {out.manifest.name}; it was not started by a {job} "
                             f"(it holds {_shown(foreign)})")
        raise InputError(f"output folder {root} is not empty and holds no {job} (it holds {_shown(foreign)}); "
                         "choose a new or empty folder for --out")
    if not os.access(root, os.W_OK | os.X_OK):
        raise InputError(f"output folder {root} is not writable by this user; choose another --out")


def check_job(manifest: dict, job: str, out: OutDir, resume: bool) -> None:
    """A folder holding a job's output is continued only with `resume`, and only by the same kind of job
    (manifests before the "job" key are sweeps'): never overwritten."""
    found = manifest.get("job", "sweep")
    if found != job:
        flag = "--resume: " if resume else ""
        raise InputError(f"{flag}{out.root} holds the output of a {found} job, not of a {job} job; "
                         "choose another --out")
    if not resume:
        raise InputError(f"{out.root} already holds the output of a {job} job; pass --resume to continue it, "
                         "choose another --out, or drop --out for a new run folder")


def check_prompt_file(path: str, key: str = "prompts.file") -> None:
    """The file exists, is a regular file and can be opened for reading (its content: the reader's)."""
    p = Path(path).expanduser()
    if not p.exists():
        why = "a link to nothing" if p.is_symlink() else "no such file"
        raise InputError(f"{key} {path!r}: {why}")
    if p.is_dir():
        raise InputError(f"{key} {path!r}: is a folder; expected a JSONL or parquet file")
    if not p.is_file():
        raise InputError(f"{key} {path!r}: not a regular file; expected a JSONL or parquet file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise InputError(f"{key} {path!r}: cannot be read ({e.strerror or e})") from None


class ReferenceError(InputError):
    """`ablation.reference` that cannot be read, or reference prompts that do not fit the sweep."""


def _as_reference(e: ValueError) -> str:
    """A prompts.file reader's message about the reference file, naming the key it came from."""
    text = str(e)
    return "ablation.reference" + text[len("prompts.file"):] if text.startswith("prompts.file") else \
        f"ablation.reference: {text}"


def read_reference_file(cfg: Config) -> list[str]:
    """`ablation.reference`'s attempts rendered with the sweep's template: the prompts the mean kinds average
    (one line naming the file and line when it cannot be read or parsed)."""
    p, path = cfg.prompts, cfg.ablation.reference
    check_prompt_file(path, "ablation.reference")
    try:
        table = load_prompt_file(path, p.extract, p.attempts, p.line_breaks)
    except ValueError as e:
        raise ReferenceError(_as_reference(e)) from None
    if table.frame.height == 0:
        raise ReferenceError(f"ablation.reference {path!r}: no attempt to average ({table.n_rows} records)")
    template = load_template(p.template)
    return [template.render(r["numbers"], r["target"], r["attempt"]) for r in table.frame.iter_rows(named=True)]


def check_interventions(cfg: Config, job: Job) -> None:
    """For a job that intervenes through the engine: a sweep's circuit needs a set to keep; a reference
    file (the means of mean and mean_positional) must read."""
    if not job.engine:
        return
    ab = cfg.ablation
    if job.ablates_targets and ab.circuit_kinds and not (parse_heads(ab.target_heads or [])
                                                         or parse_neurons(ab.target_neurons or [])):
        raise InputError(CIRCUIT_NEEDS_TARGET)
    if ab.reference != "prompts":
        read_reference_file(cfg)
    if job.ablates_targets:
        check_cross(cfg)


def check_cross(cfg: Config) -> None:
    """`ablation.kind: cross` names its source (`ablation.source_model`), which means nothing without it, and
    has a model to patch into (what the models are, and whether they can exchange activations, is checked
    once their configs and tokenizers are read: `jobs.cross.check_cross_models`)."""
    ab, paths = cfg.ablation, cfg.model.paths
    cross = "cross" in ab.kinds
    if cross and ab.source_model is None:
        raise InputError(f"ablation.source_model: ablation.kind cross patches one model's activations into the "
                         f"others; name the source, one of model.path ({', '.join(paths)})")
    if not cross and ab.source_model is not None:
        raise InputError(f"ablation.source_model {ab.source_model!r}: only ablation.kind cross reads it, and "
                         f"ablation.kind is {list(ab.kinds)}; add cross or unset it (--set ablation.source_model=null)")
    if cross and len(paths) < 2:
        raise InputError(f"ablation.kind cross: patches the source model's activations into another model, and "
                         f"model.path has {len(paths)} ({', '.join(paths)}); list two or more models")


# --------------------------------------------------------------------------------------------
# prompt lengths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLimit:
    """A longest prompt in tokens, what sets it (`name`), and whether `prompts.too_long: skip` may skip
    a prompt over it (not so the engine's budgets: raising them is the fix)."""

    tokens: int
    name: str
    advice: str
    skippable: bool = True


@dataclass(frozen=True)
class TooLong:
    """A prompt over a limit: its index and location, its token count (with `model`'s tokenizer)."""

    index: int
    where: str
    tokens: int
    model: str
    limit: TokenLimit

    def line(self) -> str:
        return (f"{self.where}: the prompt has {self.tokens} tokens ({self.model}), over {self.limit.name} = "
                f"{self.limit.tokens}; {self.limit.advice}")

    def record(self) -> dict:
        """What the manifest keeps about a skipped prompt."""
        return {"where": self.where, "tokens": self.tokens, "model": self.model, "limit": self.limit.name}


def token_limits(max_tokens: int, context: int | None, engine_tokens: int | None, model: str) -> list[TokenLimit]:
    """The limits a model's prompts must meet: prompts.max_tokens, the model's context length (when its
    config names one) and, for a job that scores through the engine, the longest prompt its token
    budgets take (`engine_tokens`)."""
    skip = "or set prompts.too_long=skip to leave such prompts out"
    limits = [TokenLimit(max_tokens, "prompts.max_tokens", f"shorten it, raise prompts.max_tokens, {skip}")]
    if context:
        limits.append(TokenLimit(context, f"the context length of {model}", f"the model cannot read it; shorten it, {skip}"))
    if engine_tokens is not None:
        limits.append(TokenLimit(engine_tokens, "the engine's longest prompt (engine.max_chunk_tokens, max_unit_tokens)",
                                 "raise engine.max_chunk_tokens and engine.max_unit_tokens, or shorten it", False))
    return limits


def over_limits(prompts: Sequence[str], where: Sequence[str], tokenizers: Mapping[str, object],
                limits: Mapping[str, list[TokenLimit]], special_tokens: bool = False) -> list[TooLong]:
    """Every prompt over a limit of some model, with the tightest skippable limit it exceeds, else the
    tightest other one. Tokens are counted as the job's model reads the prompts: scoring adds no
    special tokens, generation the tokenizer's defaults (`special_tokens`). `verbose=False`: transformers'
    own warning about a sequence over the tokenizer's maximum would come before the line this check
    gives about the same prompt."""
    found: dict[int, TooLong] = {}
    for model, tok in tokenizers.items():
        counts = [len(ids) for ids in tok(list(prompts), add_special_tokens=special_tokens, verbose=False)["input_ids"]]
        for i, n in enumerate(counts):
            exceeded = [lim for lim in limits[model] if n > lim.tokens]
            if not exceeded:
                continue
            over = TooLong(i, where[i], n, model, min(exceeded, key=lambda lim: (not lim.skippable, lim.tokens)))
            if i not in found or (over.limit.skippable and not found[i].limit.skippable):
                found[i] = over
    return [found[i] for i in sorted(found)]


def check_prompt_lengths(prompts: Sequence[str], where: Sequence[str], tokenizers: Mapping[str, object],
                         limits: Mapping[str, list[TokenLimit]], too_long: str,
                         special_tokens: bool = False) -> list[TooLong]:
    """The prompts to skip (`too_long="skip"`), or an InputError naming the first prompt over a limit
    that may not be skipped (any limit, with `too_long="error"`) and how many are over.

    The engine's limit never makes a prompt skipped: the engine options may change on `--resume`,
    and which prompts a sweep scores must not."""
    over = over_limits(prompts, where, tokenizers, limits, special_tokens)
    refused = [t for t in over if too_long == "error" or not t.limit.skippable]
    if refused:
        others = f" ({len(refused) - 1} more prompt(s) over a limit)" if len(refused) > 1 else ""
        raise InputError(refused[0].line() + others)
    if over and len(over) == len(prompts):
        raise InputError(f"every prompt is over its limit ({over[0].line()}); nothing would be left to score")
    return over


# --------------------------------------------------------------------------------------------
# a job's inputs, without a model
# --------------------------------------------------------------------------------------------


def check_job_inputs(cfg: Config, job: Job, resume: bool) -> None:
    """What a job can check without torch: its folder, and the content of the files it reads
    (prompts.file, generate.problems_file).

    The command line runs this before it imports the job (seconds of imports), so these errors come
    at once; the job's own run makes the same checks again.
    """
    check_out_dir(job.folder(cfg), resume, job.name)
    check_interventions(cfg, job)
    p = cfg.prompts
    if job.prompts and p.file:
        check_prompt_file(p.file)
        try:
            load_prompt_file(p.file, p.extract, p.attempts, p.line_breaks)
        except ValueError as e:
            raise InputError(str(e)) from e
    if job.name == "generate" and cfg.generate.problems_file:
        located_problems_of(cfg.generate.problems_file)


def located_problems_of(path: str) -> list:
    """generate.problems_file's problems with their `file:line`, or an InputError naming the file."""
    check_prompt_file(path, "generate.problems_file")
    try:
        return located_problems(path)
    except ValueError as e:
        raise InputError(f"generate.problems_file: {e}") from e
