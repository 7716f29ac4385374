"""Sweep configuration: a YAML file plus `--set` overrides, validated before any model is loaded.

The schema below is the single source of truth: defaults, allowed types and values, and the one-line
description used for the README's configuration reference (`python launch.py --config-reference`).
An unknown key, a wrong type or an invalid value is an error naming the dotted key path.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the key path in the message."""


@dataclass(frozen=True)
class Field:
    """One leaf of the schema."""

    types: tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None if valid


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(repr(a) for a in allowed)}"


def _at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _model_paths(v: Any) -> str | None:
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(i, str) and i for i in items):
        return "must be a model string or a non-empty list of them"
    return None


def _sweeps(v: list) -> str | None:
    bad = [s for s in v if s not in ("layer", "single_head")]
    return f"unknown sweep {bad[0]!r}; valid: 'layer', 'single_head'" if bad else None


def _str_list(v: list) -> str | None:
    return None if v and all(isinstance(s, str) for s in v) else "must be a non-empty list of strings"


def _workers(v: int | str) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be a whole number >= 0 or 'auto'"
    return None if v >= 0 else "must be >= 0"


def _rows(v: int | str) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be a whole number >= 1 or 'auto'"
    return None if v >= 1 else "must be >= 1"


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


NONE = type(None)
SCHEMA: dict[str, Any] = {
    "name": Field((str,), "sweep", "Sweep name: W&B group and run name prefix."),
    "out": Field((str, NONE), None, "Output folder (default runs/<name>); `--out` overrides it."),
    "model": {
        "path": Field((str, list), "packaged:smollm2-135m",
                      "Hub id, local model folder, .gguf file or packaged:<name>; a list runs every model.",
                      _model_paths),
        "dtype": Field((str,), "auto", "auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.",
                       _one_of("auto", "float32", "bfloat16", "float16")),
        "device": Field((str,), "auto", "auto, cpu, cuda (inside a worker: its assigned GPU).",
                        _one_of("auto", "cpu", "cuda")),
    },
    "prompts": {
        "n": Field((int,), 64, "Number of generated Countdown attempts.", _at_least(1)),
        "seed": Field((int,), 0, "Seed of problem and attempt generation."),
        "p_correct": Field((int, float), 0.5, "Fraction of generated attempts that are correct.", _ratio),
        "file": Field((str, NONE), None, "JSONL of attempts (numbers, target, attempt) used instead of generating."),
    },
    "scoring": {
        "yes": Field((list,), [" Yes", "Yes", " yes", "yes"], "Yes variants (each one token).", _str_list),
        "no": Field((list,), [" No", "No", " no", "no"], "No variants (each one token).", _str_list),
    },
    "ablation": {
        "target_heads": Field((str, list, NONE), None, "Target head set: 'L3 H13, L4 H5', '3.13 4.5' or [[3, 13], ...]."),
        "random_controls": Field((int,), 10, "Number of random head sets of the target's size.", _at_least(0)),
        "seed": Field((int,), 0, "Seed of the random control sets."),
        "exclude_target": Field((bool,), True, "Keep target heads out of the control sets."),
        "match_layers": Field((bool,), False, "Draw controls with the target's per-layer head counts."),
        "sweeps": Field((list,), [], "Extra sweeps: layer (each layer whole), single_head (each head alone).", _sweeps),
    },
    "engine": {
        "max_rows": Field((int, str), 64, "Rows (prompt x condition) per forward chunk; auto = from free GPU memory.",
                          _rows),
        "max_unit_rows": Field((int,), 2048, "Rows held at once while conditions branch off a shared trunk.", _at_least(2)),
        "share_trunk": Field((bool,), True, "Compute layers below a condition's first ablated layer once per prompt."),
        "compile": Field((bool,), False, "torch.compile the decoder layer (on a GPU; see README, Speed)."),
        "last_position_only": Field((bool,), False, "Run the last decoder block for the last position only."),
    },
    "shards": {
        "prompts_per_shard": Field((int,), 16, "Prompts per shard (a shard = prompts x condition group).", _at_least(1)),
        "conditions_per_shard": Field((int,), 0, "Conditions per shard; 0 = all conditions in every shard.", _at_least(0)),
        "max_attempts": Field((int,), 3, "Tries per shard before the sweep fails (workers that die are replaced).", _at_least(1)),
    },
    "ray": {
        "address": Field((str,), "", "Empty: start a local Ray; 'auto' or ray://host:port: join a cluster."),
        "workers": Field((int, str), 2, "Scoring actors; 0 = score in this process without Ray; "
                         "auto = one per GPU of the cluster (gpus_per_worker each).", _workers),
        "gpus_per_worker": Field((int, float), 0, "GPUs per actor (1 on a GPU cluster).", _at_least(0)),
        "cpus_per_worker": Field((int, float), 1, "CPUs per actor (also its torch threads).", _at_least(0)),
    },
    "stats": {
        "n_boot": Field((int,), 2000, "Bootstrap resamples for confidence intervals.", _at_least(10)),
        "seed": Field((int,), 0, "Bootstrap seed."),
    },
    "wandb": {
        "mode": Field((str,), "offline", "offline (files in OUT/wandb), online, disabled.",
                      _one_of("offline", "online", "disabled")),
        "project": Field((str,), "verif-sweep", "W&B project."),
        "entity": Field((str, NONE), None, "W&B entity (team or user); default: your default entity."),
    },
    "weight_diff": {
        "base": Field((str, NONE), None, "Base checkpoint for the weight-diff job (hub id or safetensors folder)."),
        "tuned": Field((str, NONE), None, "Fine-tuned checkpoint compared with base."),
        "top_k": Field((int,), 50, "Value vectors summarised separately, by largest change.", _at_least(0)),
    },
    "testing": {
        "crash_worker_once": Field((bool,), False, "Test only: the first shard kills its worker process once."),
        "stop_after_shards": Field((int,), 0, "Test only: the driver stops after this many new shards (0 = never).",
                                   _at_least(0)),
    },
}

# Keys that do not change any number in the results: allowed to differ on --resume.
RESULT_NEUTRAL = ("name", "out", "engine", "shards.max_attempts", "ray", "wandb", "testing", "stats")


def _defaults(schema: dict) -> dict:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _unknown(key: str, path: str, schema: dict) -> ConfigError:
    close = difflib.get_close_matches(key, list(schema), n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(schema)}"
    return ConfigError(f"{path}{key}: unknown key{hint}")


def _merge(base: dict, over: dict, schema: dict, path: str = "") -> dict:
    for key, value in over.items():
        if key not in schema:
            raise _unknown(key, path, schema)
        node = schema[key]
        if isinstance(node, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}{key}: must be a mapping with keys {', '.join(node)}")
            _merge(base[key], value, node, f"{path}{key}.")
        else:
            base[key] = value
    return base


def _check(cfg: dict, schema: dict, path: str = "") -> None:
    for key, node in schema.items():
        value = cfg[key]
        if isinstance(node, dict):
            _check(value, node, f"{path}{key}.")
            continue
        if isinstance(value, bool) and bool not in node.types:
            ok = False  # YAML `yes` must not pass as the integer 1
        else:
            ok = isinstance(value, node.types) or (float in node.types and isinstance(value, int))
        if not ok:
            names = " or ".join("null" if t is NONE else t.__name__ for t in node.types)
            raise ConfigError(f"{path}{key}: expected {names}, got {type(value).__name__} {value!r}")
        if node.check is not None and value is not None:
            err = node.check(value)
            if err:
                raise ConfigError(f"{path}{key}: {err} (got {value!r})")


def parse_override(item: str) -> dict:
    """`a.b=value` as a nested mapping; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = (), out: str | None = None) -> dict:
    """Defaults <- YAML file <- `--set` overrides <- `--out`; validated; returned as a plain dict."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    cfg = _merge(_defaults(SCHEMA), loaded, SCHEMA)
    for item in overrides:
        cfg = _merge(cfg, parse_override(item), SCHEMA)
    if out is not None:
        cfg["out"] = out
    _check(cfg, SCHEMA)
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / cfg["name"])
    return cfg


def model_paths(cfg: dict) -> list[str]:
    paths = cfg["model"]["path"]
    return paths if isinstance(paths, list) else [paths]


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def result_defining(cfg: dict) -> dict[str, Any]:
    """The flattened keys that determine the numbers in the results (compared on --resume)."""
    return {
        k: v for k, v in _flatten(cfg).items()
        if not any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL)
    }


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between the result-defining parts of two configs."""
    a, b = result_defining(old), result_defining(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(result_defining(cfg), sort_keys=True).encode()).hexdigest()[:12]


def reference_markdown(schema: dict = SCHEMA, prefix: str = "") -> str:
    """The configuration reference table (README) generated from the schema."""
    lines = [] if prefix else ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, node in schema.items():
        if isinstance(node, dict):
            lines.append(reference_markdown(node, f"{prefix}{key}."))
        else:
            lines.append(f"| `{prefix}{key}` | `{json.dumps(node.default)}` | {node.doc} |")
    return "\n".join(lines)
