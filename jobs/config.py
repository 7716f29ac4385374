"""Configuration: a YAML file plus `--set` overrides, validated into typed sections before anything loads.

Each section is a frozen dataclass; a field's annotation is its allowed types, its default is the
default, and its `metadata` holds the one-line documentation (the README's configuration reference,
`python launch.py --config-reference`) and an optional value check. Sections owned by the science
side (`EngineOptions`) are used as they are, so defaults and checks live once. An unknown key, a wrong
type or an invalid value is a `ConfigError` naming the dotted key path.

This module imports no torch, transformers or Ray: a bad configuration is reported in well under a
second.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import InputError
from verif.design.conditions import INTERVENTIONS, SWEEPS
from verif.design.heads import parse_heads
from verif.design.neurons import parse_neurons
from verif.model.options import DEFAULT_NO, DEFAULT_YES, DEVICES, DTYPES, EngineOptions, at_least, doc
from verif.task.cot import ATTEMPT_CHOICES, EXTRACT_RULES
from verif.task.countdown import CORRUPTIONS
from verif.task.prompt_file import LINE_BREAK_CHOICES
from verif.task.prompts import load_template

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(InputError):
    """A configuration problem, with the key path in the message."""


def _one_of(*allowed: Any):
    return lambda v: None if v in allowed else f"must be one of {', '.join(repr(a) for a in allowed)}"


def _model_paths(v: str | list) -> str | None:
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(i, str) and i for i in items):
        return "must be a model string or a non-empty list of them"
    return None


def _sweeps(v: list) -> str | None:
    bad = [s for s in v if s not in SWEEPS]
    return f"unknown sweep {bad[0]!r}; valid: {', '.join(repr(s) for s in SWEEPS)}" if bad else None


def _str_list(v: list) -> str | None:
    return None if v and all(isinstance(s, str) for s in v) else "must be a non-empty list of strings"


def _workers(v: int | str) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be a whole number >= 0 or 'auto'"
    return None if v >= 0 else "must be >= 0"


def _gpus(v: float) -> str | None:
    if v < 0:
        return "must be >= 0"
    return None if v <= 1 or float(v).is_integer() else "above 1 must be a whole number (a worker splits its model over whole GPUs)"


def _resources(v: dict) -> str | None:
    bad = [k for k, n in v.items() if not isinstance(k, str) or isinstance(n, bool) or not isinstance(n, (int, float))
           or n < 0]
    if bad:
        return f"must map resource names to amounts >= 0 (bad: {bad[0]!r})"
    reserved = sorted(set(v) & {"CPU", "GPU", "memory"})
    return f"{reserved[0]} is set by cpus_per_worker / gpus_per_worker, not here" if reserved else None


def _heads(v: str | list) -> str | None:
    """A head set that parses (its range is checked against the model later, once its config is read)."""
    try:
        parse_heads(v)
    except ValueError as e:
        return str(e)
    return None


def _template(v: str) -> str | None:
    """A built-in template name, or a template file with exactly the three placeholders."""
    try:
        load_template(v)
    except ValueError as e:
        return str(e).removeprefix(f"prompts.template {v!r}: ")
    return None


def _kinds(v: str | list, what: str = "intervention") -> str | None:
    """An intervention kind or a non-empty list of distinct ones."""
    items = v if isinstance(v, list) else [v]
    if not items:
        return f"must be an {what} kind or a non-empty list of them"
    bad = [k for k in items if k not in INTERVENTIONS]
    if bad:
        return f"unknown {what} kind {bad[0]!r}; valid: {', '.join(repr(k) for k in INTERVENTIONS)}"
    if len(set(items)) != len(items):
        return f"lists a kind twice ({items})"
    return None


def _circuit(v: bool | str | list) -> str | None:
    if isinstance(v, bool):
        return None
    if "cross" in (v if isinstance(v, list) else [v]):
        return "cross is not a circuit kind (a circuit replaces every other component within one model)"
    return _kinds(v)


def _reference(v: str) -> str | None:
    return None if v and v.strip() else "must be 'prompts' or a JSONL or parquet file of attempts or model outputs"


def _neurons(v: str | list) -> str | None:
    """A neuron set that parses (its range is checked against the model later)."""
    try:
        parse_neurons(v)
    except ValueError as e:
        return str(e)
    return None


def _corruptions(v: list) -> str | None:
    bad = [k for k in v if k not in CORRUPTIONS]
    if bad:
        return f"unknown corruption {bad[0]!r}; valid: {', '.join(CORRUPTIONS)}"
    distinct = v and len(set(v)) == len(v)
    return None if distinct else f"must be a non-empty list of distinct kinds among {', '.join(CORRUPTIONS)}"


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def listing(text: str, default: list, check=None) -> Any:
    """A list-valued field (a fresh copy of the default per config)."""
    return field(default_factory=lambda: list(default), metadata={"doc": text, "check": check})


@dataclass(frozen=True)
class ModelConfig:
    path: str | list = doc("Hub id, local model folder, .gguf file or packaged:<name>; a list runs every model.",
                           "packaged:smollm2-135m", _model_paths)
    dtype: str = doc("auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.", "auto", _one_of(*DTYPES))
    device: str = doc("auto, cpu, cuda (inside a worker: its assigned GPU).", "auto", _one_of(*DEVICES))

    @property
    def paths(self) -> list[str]:
        return self.path if isinstance(self.path, list) else [self.path]


@dataclass(frozen=True)
class PromptsConfig:
    n: int = doc("Number of generated Countdown attempts (with prompts.pairs: of pairs, two attempts each).", 64,
                 at_least(1))
    seed: int = doc("Seed of problem and attempt generation.", 0)
    p_correct: float = doc("Fraction of generated attempts that are correct.", 0.5, _ratio)
    file: str | None = doc("JSONL or parquet of attempts (numbers, target, attempt; pair_id for pairs) or of model "
                           "outputs (nums, target, output_text), used instead of generating.", None)
    extract: str = doc("How attempt lines of model outputs lose parenthesised text: remarks (only groups with "
                       "a letter) or study (every group, as the study's code did).", "remarks",
                       _one_of(*EXTRACT_RULES))
    attempts: str = doc("Which attempt lines of each model output: last (as the study) or all.", "last",
                        _one_of(*ATTEMPT_CHOICES))
    template: str = doc("Verification prompt: study (the string the study's code built), post (one sentence "
                        "per line, as the post shows it) or a file with {numbers}, {target}, {attempt}.",
                        "study", _template)
    line_breaks: str = doc("An attempt of prompts.file containing a line break: error (named by file:line) or "
                           "join (each break, with the spaces around it, becomes one space).", "error",
                           _one_of(*LINE_BREAK_CHOICES))
    max_tokens: int = doc("Longest prompt, in tokens of each model's tokenizer (the study's are ~200); the "
                          "model's context length is a limit too.", 1024, at_least(1))
    too_long: str = doc("A prompt over the limit: error (naming it and its token count) or skip (left out, "
                        "counted in the run's summary and manifest).", "error", _one_of("error", "skip"))
    pairs: bool = doc("Generate counterfactual pairs: each problem's correct attempt and one minimally corrupted "
                      "incorrect one, of equal token length in every model (pair_id in prompts.parquet).", False)
    corruption: list = listing("What the incorrect attempt of a pair changes, cycled over the pairs: claim, "
                               "intermediate, operand, target (see README, Counterfactual pairs).",
                               list(CORRUPTIONS), _corruptions)


@dataclass(frozen=True)
class ScoringConfig:
    yes: list = listing("Yes variants (each one token).", list(DEFAULT_YES), _str_list)
    no: list = listing("No variants (each one token).", list(DEFAULT_NO), _str_list)


@dataclass(frozen=True)
class AblationConfig:
    target_heads: str | list | None = doc("Target head set: 'L3 H13, L4 H5', '3.13 4.5' or [[3, 13], ...].", None,
                                          _heads)
    target_neurons: str | list | None = doc("Target MLP neurons (value vectors), alone or with target_heads: "
                                            "'L20 N1234, L21 N77' or [[20, 1234], ...].", None, _neurons)
    random_controls: int = doc("Number of random control sets, each with the target's numbers of heads and "
                               "neurons.", 10, at_least(0))
    seed: int = doc("Seed of the random control sets.", 0)
    exclude_target: bool = doc("Keep target heads and neurons out of the control sets.", True)
    match_layers: bool = doc("Draw controls with the target's per-layer head (and neuron) counts.", False)
    sweeps: list = listing("Extra sweeps: layer (each layer whole), single_head (each head alone).", [], _sweeps)
    kind: str | list = doc("Intervention: zero (the study's), mean, mean_positional, resample (the prompt's "
                           "partner's activation: activation patching) or cross (source_model's activation on the "
                           "same prompt: cross-model activation patching), or a list: every condition under every "
                           "kind (see README, Interventions).", "zero", _kinds)
    source_model: str | None = doc("With kind cross: the model of model.path (its name or path) whose activations "
                                   "are patched into every other model; it scores no cross rows itself.", None)
    reference: str = doc("Prompts the mean kinds average: prompts (all of this sweep's, correct and incorrect) or "
                         "a file in the prompts.file formats.", "prompts", _reference)
    circuit: bool | str | list = doc("Faithfulness of the target set: circuit conditions that keep only the target "
                                     "(and each random set, and nothing) and intervene on every other head (and "
                                     "neuron, when the target has neurons) with this kind or list; true = mean.",
                                     False, _circuit)

    @property
    def kinds(self) -> tuple[str, ...]:
        """`kind` as a tuple, in the order given."""
        return tuple(self.kind) if isinstance(self.kind, list) else (self.kind,)

    @property
    def circuit_kinds(self) -> tuple[str, ...]:
        """The kinds circuit conditions intervene with (none when `circuit` is false)."""
        if isinstance(self.circuit, bool):
            return ("mean",) if self.circuit else ()
        return tuple(self.circuit) if isinstance(self.circuit, list) else (self.circuit,)


@dataclass(frozen=True)
class ShardsConfig:
    prompts_per_shard: int = doc("Prompts per shard (a shard = prompts x condition group).", 16, at_least(1))
    conditions_per_shard: int = doc("Conditions per shard; 0 = all conditions in every shard.", 0, at_least(0))
    max_attempts: int = doc("Tries per shard before the sweep fails (workers that die are replaced).", 3,
                            at_least(1))


@dataclass(frozen=True)
class RayConfig:
    address: str = doc("Empty: start a local Ray (or join RAY_ADDRESS, as under `ray job submit`); 'auto' or "
                       "ray://host:port: join a cluster.", "")
    workers: int | str = doc("Scoring actors; 0 = score in this process without Ray; "
                             "auto = one per gpus_per_worker GPUs of each node of the cluster.", 2, _workers)
    gpus_per_worker: float = doc("GPUs per actor (1 on a GPU cluster); N > 1 splits the model's layers over N GPUs "
                                 "of one node (README: Models bigger than one GPU).", 0, _gpus)
    cpus_per_worker: float = doc("CPUs per actor (also its torch threads).", 1, at_least(0))
    resources_per_worker: dict = field(default_factory=dict, metadata={
        "doc": "Custom Ray resources per actor, e.g. {accelerator_h100: 1} to pin workers to nodes started "
               "with `ray start --resources`; {} = none.", "check": _resources})
    restart_timeout: float = doc("Seconds a job waits for Ray to restart a lost worker (on a node with room, its "
                                 "model loaded again) while no other worker is left; then it stops with what is on "
                                 "disk and the command that resumes.", 600, at_least(1))


@dataclass(frozen=True)
class StatsConfig:
    n_boot: int = doc("Bootstrap resamples for confidence intervals.", 2000, at_least(10))
    seed: int = doc("Bootstrap seed.", 0)


@dataclass(frozen=True)
class WandbConfig:
    mode: str = doc("offline (files in OUT/wandb), online, disabled.", "offline", _one_of("offline", "online", "disabled"))
    project: str = doc("W&B project.", "verif-sweep")
    entity: str | None = doc("W&B entity (team or user); default: your default entity.", None)
    init_timeout: float = doc("Seconds online mode waits for the W&B server before it logs offline instead.", 30,
                              at_least(1))


@dataclass(frozen=True)
class WeightDiffConfig:
    base: str | None = doc("Base checkpoint for the weight-diff job (hub id or safetensors folder).", None)
    tuned: str | None = doc("Fine-tuned checkpoint compared with base.", None)
    heads: str | list = doc("Heads summarised as one group: target (ablation.target_heads; none when unset), "
                            "study (the study's 29), all, none, or a head list.", "target")
    granularity: str = doc("head (one row per head and neuron) or row (also the study's view: one row per "
                           "head, matrix W_Q/W_K/W_V/W_O and head_dim row, for the heads above).", "head",
                           _one_of("head", "row"))
    top_k: int = doc("Value vectors summarised separately, by largest change.", 50, at_least(0))


# `verif.analysis.discovery.metric.PROMPT_CHOICES` (that module imports torch; a test keeps the two equal).
DISCOVER_PROMPTS = ("correct", "incorrect", "all")
DISCOVER_INTERVENTIONS = ("zero", "mean", "resample")


def _screen(v: int | str) -> str | None:
    if isinstance(v, str):
        return None if v == "all" else "must be 'all' or a whole number >= 1 (the k heads with the largest absolute atp)"
    return None if v >= 1 else "must be >= 1"


def _holdout(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be at least 0 and below 1 (the fraction of prompts held out)"


def _set_sizes(v: list) -> str | None:
    ok = v and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v)
    return None if ok else "must be a non-empty list of whole numbers >= 1"


@dataclass(frozen=True)
class DiscoverConfig:
    prompts: str = doc("Prompts the objective M (mean log P(Yes) - log P(No)) averages: correct, incorrect or "
                       "all attempts.", "correct", _one_of(*DISCOVER_PROMPTS))
    max_prompts: int | None = doc("M averages at most the first N prompts `prompts` selects in each half (null = "
                                  "all of them); the probes read every prompt of the selection half.", None, at_least(1))
    exact: int | str = doc("Heads whose ablation effect is scored exactly, one at a time: all, or the k with the "
                           "largest absolute atp.", 64, _screen)
    k: list = listing("Set sizes: each ranking's top k is ablated together (k capped at what it scored).",
                      [1, 2, 4, 8, 16, 29, 64], _set_sizes)
    controls: int = doc("Random sets per size and kind (heads, neurons): the null each top-k set is judged "
                        "against.", 20, at_least(1))
    seed: int = doc("Seed of the random sets, of the probes' train / held-out split and of discover.holdout's "
                    "split.", 0)
    batch_size: int = doc("Prompts per forward (and backward) of the attribution, attention and residual "
                          "passes.", 8, at_least(1))
    holdout: float = doc("Fraction of the prompts (of each label) kept out of the ranking and the choice of sets: "
                         "sets.parquet also scores every set on them, and target.yaml points the follow-up sweep "
                         "at them. 0 = rank, choose and test on the same prompts (optimistic p-values).", 0.5,
                         _holdout)
    intervention: str = doc("How exact effects and sets intervene, and what AtP differences against "
                            "((z_ref - z) . dM/dz): zero, mean (ablation.reference's means) or resample (each "
                            "prompt's partner; adds the exact per-head patching effect, noising and denoising).",
                            "zero", _one_of(*DISCOVER_INTERVENTIONS))


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _top_p(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class GenerateConfig:
    n_problems: int = doc("Countdown problems, generated as the sweep generates them (with seed); ignored with "
                          "problems_file.", 8, at_least(1))
    seed: int = doc("Seed of the generated problems and of sampling.", 0)
    problems_file: str | None = doc("JSONL or parquet whose records have nums (or numbers) and target: the problems, "
                                    "instead of generating them.", None)
    max_new_tokens: int = doc("New tokens per sample at most (R1's chains of thought need ~1000).", 256, at_least(1))
    do_sample: bool = doc("Sample with temperature, top_p and seed instead of decoding greedily.", False)
    n: int = doc("Samples per problem (more than 1 needs do_sample).", 1, at_least(1))
    temperature: float = doc("Sampling temperature.", 1.0, _positive)
    top_p: float = doc("Nucleus sampling: draw from the most probable tokens holding this much probability.", 1.0,
                       _top_p)
    batch_size: int = doc("Sequences (problems x n) per generate call.", 4, at_least(1))
    problems_per_shard: int = doc("Problems per shard: a multiple of batch_size // n, so shards cut the run where "
                                  "its batches end and any sharding gives the same samples.", 4, at_least(1))


@dataclass(frozen=True)
class CompareConfig:
    neurons: str | list | None = doc("MLP neurons whose last-position activations are compared: 'L20 N1234, "
                                     "L21 N77' or [[20, 1234], ...].", None, _neurons)
    neurons_from: str | None = doc("A YAML file whose ablation.target_neurons are compared instead (the target.yaml "
                                   "of --discover).", None)
    top_k: int = doc("Logit-lens top tokens kept per model, layer and prompt.", 5, at_least(1))
    batch_size: int = doc("Prompts per forward of each model.", 8, at_least(1))


def section(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass(frozen=True)
class Config:
    """A whole job configuration (sweep, weight diff, discovery, generate, compare); `to_dict()` is what
    manifests and W&B keep."""

    name: str = doc("Sweep name: W&B group and run name prefix.", "sweep")
    out: str | None = doc("Output folder; `--out` overrides it. Unset: each run gets a new folder, runs/<name>, "
                          "runs/<name>-2, ... (runs/latest links to the latest).", None)
    model: ModelConfig = section(ModelConfig)
    prompts: PromptsConfig = section(PromptsConfig)
    scoring: ScoringConfig = section(ScoringConfig)
    ablation: AblationConfig = section(AblationConfig)
    engine: EngineOptions = section(EngineOptions)
    shards: ShardsConfig = section(ShardsConfig)
    ray: RayConfig = section(RayConfig)
    stats: StatsConfig = section(StatsConfig)
    wandb: WandbConfig = section(WandbConfig)
    weight_diff: WeightDiffConfig = section(WeightDiffConfig)
    discover: DiscoverConfig = section(DiscoverConfig)
    generate: GenerateConfig = section(GenerateConfig)
    compare: CompareConfig = section(CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# Keys that do not change any number in a sweep's results: allowed to differ on --resume (the discover,
# generate and compare sections belong to those jobs, which keep their own lists).
RESULT_NEUTRAL = ("name", "out", "engine", "shards.max_attempts", "ray", "wandb", "stats", "discover", "generate",
                  "compare")


# --------------------------------------------------------------------------------------------
# building and validating
# --------------------------------------------------------------------------------------------


def _is_section(f: dataclasses.Field) -> bool:
    return isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _allowed_types(cls: type, name: str) -> tuple[type, ...]:
    """Runtime classes of a field's annotation (`int | str` -> (int, str), `list` -> (list,))."""
    hint = typing.get_type_hints(cls)[name]
    parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(p) or p for p in parts)


def _type_error(value: Any, allowed: tuple[type, ...]) -> str | None:
    if isinstance(value, bool) and bool not in allowed:
        ok = False  # YAML `yes` must not pass as the integer 1
    else:
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
    if ok:
        return None
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    return f"expected {names}, got {type(value).__name__} {value!r}"


def _unknown(key: str, path: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"{path}{key}: unknown key{hint}")


def _merge(base: dict, over: dict, cls: type, path: str = "") -> dict:
    """`over` merged into `base` (both plain dicts shaped like `cls`); unknown keys are refused."""
    known = _fields(cls)
    for key, value in over.items():
        if key not in known:
            raise _unknown(str(key), path, list(known))
        f = known[key]
        if _is_section(f):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}{key}: must be a mapping with keys {', '.join(_fields(f.default_factory))}")
            _merge(base[key], value, f.default_factory, f"{path}{key}.")
        else:
            base[key] = value
    return base


def _build(cls: type, values: dict, path: str = "") -> Any:
    """The dataclass `cls` from a plain dict, every leaf type- and value-checked."""
    kwargs = {}
    for name, f in _fields(cls).items():
        value = values[name]
        if _is_section(f):
            kwargs[name] = _build(f.default_factory, value, f"{path}{name}.")
            continue
        err = _type_error(value, _allowed_types(cls, name))
        check = f.metadata.get("check")
        if err is None and check is not None and value is not None:
            err = check(value)
            if err:
                err = f"{err} (got {value!r})"
        if err:
            raise ConfigError(f"{path}{name}: {err}")
        kwargs[name] = value
    return cls(**kwargs)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong, as one phrase (a marked error's problem, else its text)."""
    return (getattr(e, "problem", None) or getattr(e, "context", None) or str(e)).strip()


def parse_override(item: str) -> dict:
    """`a.b=value` as a nested mapping; the value is read as YAML (numbers, lists, booleans).

    A value that is not YAML is named by its `--set` item and the column in it, as a config file's
    error is named by FILE:LINE:COL."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at column {len(key) + 2 + mark.column}" if mark is not None and mark.line == 0 else ""
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{where}: {_yaml_problem(e)}") from e
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from e
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({type(e).__name__}: {e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def config_from_dict(values: dict, overrides: list[str] = (), default_out: bool = True) -> Config:
    """Defaults <- `values` <- `--set` overrides, validated (also reads a manifest's saved config).

    An unset `out` becomes runs/<name> with `default_out`, else stays None: the command line then gives
    each run a folder of its own (`jobs.runs`)."""
    merged = _merge(Config().to_dict(), values, Config)
    for item in overrides:
        merged = _merge(merged, parse_override(item), Config)
    cfg = _build(Config, merged)
    return cfg if cfg.out is not None or not default_out else cfg.replace(out=str(Path("runs") / cfg.name))


def load_config(path: str | Path | None = None, overrides: list[str] = (), out: str | None = None,
                file_default: bool = True, default_out: bool = True) -> Config:
    """Defaults <- YAML file <- `--set` overrides <- `--out`, validated.

    Without `path` the file is configs/default.yaml, or none at all when `file_default` is False.
    """
    values = _read_yaml(Path(path) if path else DEFAULT_CONFIG) if (path or file_default) else {}
    cfg = config_from_dict(values, overrides, default_out)
    return cfg if out is None else cfg.replace(out=out)


# --------------------------------------------------------------------------------------------
# comparing and describing
# --------------------------------------------------------------------------------------------


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def result_defining(cfg: Config | dict, neutral: tuple[str, ...] = RESULT_NEUTRAL) -> dict[str, Any]:
    """The flattened keys that determine the numbers in a job's results (compared on --resume); `neutral`
    names the keys that do not (the sweep's by default)."""
    values = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return {
        k: v for k, v in _flatten(values).items()
        if not any(k == n or k.startswith(n + ".") for n in neutral)
    }


def config_differences(old: Config | dict, new: Config | dict, neutral: tuple[str, ...] = RESULT_NEUTRAL) -> list[str]:
    """Human-readable differences between the result-defining parts of two configs."""
    a, b = result_defining(old, neutral), result_defining(new, neutral)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_hash(cfg: Config, neutral: tuple[str, ...] = RESULT_NEUTRAL) -> str:
    return hashlib.sha1(json.dumps(result_defining(cfg, neutral), sort_keys=True).encode()).hexdigest()[:12]


def reference_markdown(cls: type = Config, prefix: str = "") -> str:
    """The configuration reference table (README) generated from the sections."""
    lines = [] if prefix else ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = cls()
    for name, f in _fields(cls).items():
        if _is_section(f):
            lines.append(reference_markdown(f.default_factory, f"{prefix}{name}."))
        else:
            lines.append(f"| `{prefix}{name}` | `{json.dumps(getattr(defaults, name))}` | {f.metadata['doc']} |")
    return "\n".join(lines)
