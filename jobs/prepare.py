"""What every job prepares before it loads any weights, on one path: its models resolved, the config's
head and neuron sets checked against them, their tokenizers and Yes/No tokens checked, its prompts
built, every prompt within its limits in each model's tokens.

The sweep, discovery, generate and compare drivers all take their inputs from here, in two steps with
their own checks of the models between them (conditions, shapes, settings: instant, so they come
before the seconds that tokenizers cost): `prepare_models`, then `prepare_prompts` (tokenizers, then
prompts and their lengths; generate's own prompts are measured by `limit_generation`). A check
written here holds for each of them; what differs between jobs is said once, in `jobs.inputs.JOBS`.
Everything reads configs and tokenizers only; a failure is an `InputError` (one line naming the key,
the file and line, or the model), raised before the job's folder is created and before any worker
starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl
from transformers import AutoTokenizer

from jobs.config import Config, PromptsConfig
from jobs.errors import InputError
from jobs.inputs import Job, TokenLimit, TooLong, check_prompt_file, check_prompt_lengths, token_limits
from verif.design.heads import HeadSet, parse_heads, validate_heads
from verif.design.neurons import NeuronSet, parse_neurons, validate_neurons
from verif.model.loading import Arch, ModelSource, read_arch, read_context_length, resolve_source
from verif.model.score import resolve_yes_no
from verif.task.cot import ATTEMPT_SCHEMA
from verif.task.countdown import Attempt, generate_problems, iter_problems, make_attempts
from verif.task.pairs import LengthFn, check_pair_lengths, make_pairs
from verif.task.prompt_file import load_prompt_file
from verif.task.prompts import Template, load_template
from verif.task.validator import validate

# Any tokenizer with a vocabulary gives this text tokens; one that gives none has none (a model folder
# without its tokenizer files loads as an empty tokenizer in transformers 5).
_PROBE_TEXT = "Is the attempt correct? Yes or No"


class PrepareError(InputError):
    """A job's inputs that cannot be prepared, with the reason in the message."""


@dataclass(frozen=True)
class PromptSource:
    """Where the attempts came from, for the manifest and the run's first lines."""

    template: str
    template_digest: str
    file: str | None = None
    n_records: int = 0  # rows of prompts.file
    no_attempt_rows: tuple[int, ...] = ()  # model outputs without any attempt line (reported, not dropped)
    n_rules_differ: int = 0  # attempts whose text differs between the study's and the remarks rule
    too_long: tuple[dict, ...] = ()  # prompts left out by prompts.too_long: skip (TooLong.record())
    pairs: dict | None = None  # counterfactual pairs: how many, and the candidates redrawn (PairSet.record())

    def lines(self) -> list[str]:
        text = [f"prompts: template {self.template}"]
        if self.file:
            text.append(f"prompts.file {self.file}: {self.n_records} records, {len(self.no_attempt_rows)} without an "
                        f"attempt line, {self.n_rules_differ} attempts where the study's rule and remarks differ")
        if self.pairs:
            text.append(_pairs_line(self.pairs))
        if self.too_long:
            first = self.too_long[0]
            text.append(f"prompts skipped as too long: {len(self.too_long)} (first: {first['where']}, "
                        f"{first['tokens']} tokens, over {first['limit']})")
        return text


@dataclass
class Prepared:
    """A job's inputs with every shared check made: its models (a source, architecture and tokenizer for
    each `model.path` entry, in order), the config's target sets in canonical form, and its prompts
    (None for a job that reads none)."""

    sources: list[ModelSource]
    archs: list[Arch]
    tokenizers: list
    heads: HeadSet = ()
    neurons: NeuronSet = ()
    prompts: pl.DataFrame | None = None
    prompt_source: PromptSource | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def prepare_models(cfg: Config, job: Job, distinct: bool = True) -> Prepared:
    """The first step every job takes: its models (paths and configs, no weights) and, for `job.targets`,
    the config's head and neuron sets within each of them. With `distinct` no two models may share a
    name (a job's rows and files are keyed by it). A job's own checks of its models come next, before
    the seconds that tokenizers cost; then `prepare_prompts`."""
    sources, archs = resolve_models(cfg.model.paths, distinct)
    heads, neurons = ((), ())
    if job.targets:
        unused = "" if job.ablates_targets else (f" (--{job.name} ablates sets of its own, yet refuses a target the "
                                                 "model does not have: fix it, or unset it with --set KEY=null)")
        heads, neurons = check_targets(cfg, sources, archs, unused)
    return Prepared(sources, archs, [], heads, neurons)


def prepare_prompts(cfg: Config, job: Job, prepared: Prepared) -> Prepared:
    """The second step: each model's tokenizer and Yes/No variants, its prompts (`job.prompts`), and
    every prompt's length in each model's tokens (`limit_lengths`); fills in and returns `prepared`."""
    distinct = list({s.spec: s for s in prepared.sources}.values())  # a path given twice is read once
    by_spec = {s.spec: tok for s, tok in zip(distinct, check_tokens(distinct, cfg))}
    prepared.tokenizers = [by_spec[s.spec] for s in prepared.sources]
    if not job.prompts:
        return prepared
    try:
        labelled = _labelled(prepared.sources, by_spec)
        prompts, source, where = build_prompts(cfg, {label: tok for label, (_, tok) in labelled.items()})
    except ValueError as e:
        raise PrepareError(str(e)) from e
    prepared.prompts, prepared.prompt_source = limit_lengths(cfg, job, prepared.sources, by_spec, prompts, where,
                                                             source)
    return prepared


def check_targets(cfg: Config, sources: Sequence[ModelSource], archs: Sequence[Arch],
                  note: str = "") -> tuple[HeadSet, NeuronSet]:
    """`ablation.target_heads` and `target_neurons` within every model (a discovery, which ablates its own
    sets, still refuses a config whose target no model has: `note` says so); returns them in canonical form."""
    ab = cfg.ablation
    heads, neurons = (), ()
    for src, arch in zip(sources, archs):
        try:
            heads = validate_heads(parse_heads(ab.target_heads or []), arch.n_layers, arch.n_heads,
                                   what=f"ablation.target_heads (model {src.spec})")
            neurons = validate_neurons(parse_neurons(ab.target_neurons or []), arch.n_layers, arch.n_neurons,
                                       what=f"ablation.target_neurons (model {src.spec})")
        except ValueError as e:
            raise PrepareError(f"{e}{note}") from e
    return heads, neurons


def _pairs_line(pairs: dict) -> str:
    text = f"counterfactual pairs: {pairs['n_pairs']}"
    if "by_corruption" not in pairs:  # given by prompts.file
        return text + " (pair_id of prompts.file)"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(pairs["by_corruption"].items()))
    models = ", ".join(f"{m} {n}" for m, n in pairs["redrawn_by_model"].items())
    return (text + f" ({kinds}); {pairs['redrawn']} candidates redrawn for unequal token length (differed in: "
            f"{models}); {pairs['problems_skipped']} problems skipped")


def _attempt_frame(attempts: Sequence[Attempt], pair_ids: Sequence[int | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "numbers": [list(a.problem.numbers) for a in attempts],
            "target": [a.problem.target for a in attempts],
            "attempt": [a.text for a in attempts],
            "label": [a.label for a in attempts],
            "reason": [validate(a.problem, a.text).reason for a in attempts],
            "error_kind": [a.error_kind for a in attempts],
            "source_row": [None] * len(attempts),
            "attempt_index": [None] * len(attempts),
            "n_attempts": [None] * len(attempts),
            "rules_differ": [None] * len(attempts),
            "pair_id": list(pair_ids),
        },
        schema=ATTEMPT_SCHEMA,
    )


def token_counts(tokenizers: Mapping[str, object]) -> dict[str, LengthFn]:
    """Each model's token count of a prompt, read as its worker reads it (no special tokens added)."""
    return {name: (lambda text, tok=tok: len(tok(text, add_special_tokens=False)["input_ids"]))
            for name, tok in tokenizers.items()}


def _generated_attempts(cfg: Config, template: Template, tokenizers: Mapping[str, object]
                        ) -> tuple[pl.DataFrame, dict | None]:
    """The generated attempts, and with prompts.pairs the record of how their pairs were made."""
    p = cfg.prompts
    if not p.pairs:
        attempts = make_attempts(generate_problems(p.n, p.seed), seed=p.seed, p_correct=p.p_correct)
        return _attempt_frame(attempts, [None] * len(attempts)), None
    if p.p_correct != PromptsConfig.p_correct:
        raise PrepareError(f"prompts.p_correct {p.p_correct}: with prompts.pairs every problem gives one correct and "
                           f"one incorrect attempt; leave p_correct at {PromptsConfig.p_correct} or set "
                           "prompts.pairs=false")
    try:
        made = make_pairs(iter_problems(p.seed), p.n, p.seed, lambda q, text: template.render(q.numbers, q.target, text),
                          token_counts(tokenizers), p.corruption)
    except ValueError as e:
        raise PrepareError(f"prompts.pairs: {e}; try other prompts.corruption kinds or prompts.template") from e
    attempts = [a for pair in made.pairs for a in (pair.correct, pair.incorrect)]
    return _attempt_frame(attempts, [i // 2 for i in range(len(attempts))]), made.record()


def _file_attempts(p: PromptsConfig, template: Template) -> tuple[pl.DataFrame, PromptSource, list[str]]:
    """The attempts of prompts.file, where each came from (`file:line`), and the source record."""
    check_prompt_file(p.file)
    table = load_prompt_file(p.file, p.extract, p.attempts, p.line_breaks)
    frame = table.frame
    if frame.height == 0:
        raise PrepareError(f"prompts.file {p.file!r}: no attempt to verify ({table.n_rows} records, "
                           f"{len(table.no_attempt_rows)} model outputs without an attempt line)")
    paired = frame["pair_id"].null_count() == 0  # all or none (check_pairs)
    if p.pairs and not paired:
        raise PrepareError(f"prompts.pairs is true, but prompts.file {p.file!r} has no pair_id: a file brings its own "
                           "pairs (a pair_id column); add one or set prompts.pairs=false")
    source = PromptSource(template.name, template.digest, p.file, table.n_rows, table.no_attempt_rows,
                          table.n_rules_differ, pairs={"n_pairs": frame.height // 2} if paired else None)
    return frame, source, [table.locations[row] for row in frame["source_row"]]


def build_prompts(cfg: Config, tokenizers: Mapping[str, object]) -> tuple[pl.DataFrame, PromptSource, list[str]]:
    """The attempts of the sweep (generated, or read from `prompts.file`) with rendered prompts, and
    where each came from (`file:line`, or which generated attempt) for messages about it.

    `tokenizers` (model name -> tokenizer) are those of every model that scores the prompts: the two
    prompts of a counterfactual pair must have the same token length in each (generated pairs are
    redrawn until they do; a file's pair that does not is an error naming it)."""
    p = cfg.prompts
    template = load_template(p.template)
    if p.file:
        frame, source, where = _file_attempts(p, template)
    else:
        frame, pairs = _generated_attempts(cfg, template, tokenizers)
        source = PromptSource(template.name, template.digest, pairs=pairs)
        where = [f"generated attempt {i} (prompts.seed {p.seed})" for i in range(frame.height)]
    rendered = [template.render(r["numbers"], r["target"], r["attempt"]) for r in frame.iter_rows(named=True)]
    if p.file and source.pairs:
        try:
            check_pair_lengths(frame["pair_id"].to_list(), rendered, where, token_counts(tokenizers))
        except ValueError as e:
            raise PrepareError(str(e)) from e
    frame = frame.with_columns(pl.lit(template.name).alias("template"), pl.Series("prompt", rendered, pl.String))
    return numbered(frame), source, where


def numbered(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("prompt_id", strict=False).with_row_index("prompt_id").with_columns(pl.col("prompt_id").cast(pl.Int64))


def resolve_models(paths: Sequence[str], distinct: bool = True) -> tuple[list[ModelSource], list[Arch]]:
    """Each `model.path` entry's source and architecture, from its config alone (no weights). With
    `distinct`, no two may share a name: a job's rows and files are keyed by it."""
    try:
        sources = [resolve_source(p) for p in paths]
        archs = [read_arch(s) for s in sources]
    except (OSError, ValueError) as e:
        raise PrepareError(str(e)) from e
    names = [s.name for s in sources]
    if distinct and len(set(names)) != len(names):
        raise PrepareError(f"model.path: two models share the name {names}; give distinct paths")
    return sources, archs


def check_tokens(sources: list[ModelSource], cfg: Config) -> list:
    """Each source's tokenizer (no weights), in order, its Yes/No variants checked to be single tokens."""
    found = []
    for src in sources:
        kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(src.location, **kwargs)
        except OSError as e:
            raise PrepareError(f"model.path {src.spec!r}: cannot load its tokenizer ({e})") from e
        if not tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]:
            raise PrepareError(f"model.path {src.spec!r}: it has no tokenizer (what loads from {src.location} "
                               "gives text no tokens); a model folder needs the tokenizer files it was saved with "
                               "(tokenizer.json, or vocab and merges files)")
        try:
            resolve_yes_no(tok, cfg.scoring.yes, cfg.scoring.no)
        except ValueError as e:
            raise PrepareError(f"{e} (model {src.spec!r})") from e
        found.append(tok)
    return found


def _contexts(sources: Sequence[ModelSource]) -> dict[str, int | None]:
    """Each source's context length (by spec), from its config."""
    try:
        return {s.spec: read_context_length(s) for s in sources}
    except OSError as e:
        raise PrepareError(str(e)) from e


def _labelled(sources: Sequence[ModelSource], tokenizers: dict[str, object]) -> dict[str, tuple[ModelSource, object]]:
    """One (source, tokenizer) per distinct path, labelled by the model's name in messages, or by its path
    where two paths share a name."""
    distinct = list({s.spec: s for s in sources}.values())
    names = [s.name for s in distinct]
    return {(s.name if names.count(s.name) == 1 else s.spec): (s, tokenizers[s.spec]) for s in distinct}


def limit_lengths(cfg: Config, job: Job, sources: list[ModelSource], tokenizers: dict[str, object],
                  prompts: pl.DataFrame, where: list[str], source: PromptSource) -> tuple[pl.DataFrame, PromptSource]:
    """Every prompt within prompts.max_tokens, each model's context length and (for a job that scores
    through the engine) the engine's budgets, or an error naming the first one over; with
    prompts.too_long: skip those are left out and recorded. `tokenizers` are by model path."""
    models = _labelled(sources, tokenizers)
    contexts = _contexts(sources)
    engine = cfg.engine.max_prompt_tokens if job.engine else None
    limits = {label: token_limits(cfg.prompts.max_tokens, contexts[src.spec], engine, label)
              for label, (src, _) in models.items()}
    skipped: list[TooLong] = check_prompt_lengths(prompts["prompt"].to_list(), where,
                                                  {label: tok for label, (_, tok) in models.items()}, limits,
                                                  cfg.prompts.too_long)
    if not skipped:
        return prompts, source
    dropped = {t.index for t in skipped}
    keep = pl.Series([i not in dropped for i in range(prompts.height)])
    return numbered(prompts.filter(keep)), dataclasses.replace(source, too_long=tuple(t.record() for t in skipped))


def limit_generation(cfg: Config, source: ModelSource, tokenizer, prompts: Sequence[str], where: Sequence[str]) -> None:
    """Every generation prompt within prompts.max_tokens, and with generate.max_new_tokens within the
    model's context length, in tokens as generation reads them (the tokenizer's defaults); a problem over
    either is an error naming it (skipping one would renumber the problems the samples are keyed by)."""
    g, max_tokens = cfg.generate, cfg.prompts.max_tokens
    context = _contexts([source])[source.spec]
    if context is not None and g.max_new_tokens >= context:
        raise PrepareError(f"generate.max_new_tokens {g.max_new_tokens}: the context length of {source.name} is "
                           f"{context} tokens, so no prompt would fit beside them; lower generate.max_new_tokens")
    limits = [TokenLimit(max_tokens, "prompts.max_tokens", "raise prompts.max_tokens or leave the problem out",
                         skippable=False)]
    if context is not None:
        limits.append(TokenLimit(context - g.max_new_tokens, f"the context length of {source.name} ({context}) "
                                 f"less generate.max_new_tokens ({g.max_new_tokens})",
                                 "the model cannot read the prompt and its new tokens; lower "
                                 "generate.max_new_tokens or leave the problem out", skippable=False))
    check_prompt_lengths(list(prompts), list(where), {source.name: tokenizer}, {source.name: limits}, "error",
                         special_tokens=True)
