"""Fine-tune vs base weight comparison per attention head and per MLP neuron, in float64.

The study (MISSION item 1) reports that TinyZero R1's verification weights have "cosine 1, norm change
below 1e-5" against Qwen2.5-3B. Computed in bf16 a cosine rounds to 1 for almost any change, so here every
tensor pair is converted to float64 as it is read, and `1 - cos` and the norm change are computed from the
difference vector d = tuned - base (no cancellation), so changes far below bf16 resolution stay visible.

Memory: every tensor pair is opened on its own (`safe_open`, memory-mapped) and read in row chunks into
three float64 buffers of `CHUNK_ELEMENTS`; per-vector sums accumulate across chunks. Peak memory is those
buffers plus one chunk of each file, whatever the model size (benchmarks/bench_weightdiff_memory.py); only
the result table grows, by about 200 bytes per row. Names, shapes and configs of both checkpoints are
checked from the headers (no tensor data) before any work starts.

One output row per vector (columns in `SCHEMA`):
  q_proj / k_proj / v_proj weight: the head_dim rows of one query head (q) or key/value head (k, v; the
    query heads that read it are in `shared_by`, HF's repeat_kv grouping);
  q/k/v biases: their own components (`q_bias`, ...), the head_dim entries of one head. They are kept apart
    from the weight rows because they live on another scale; merged, the larger part would hide a change
    in the smaller one;
  o_proj weight: the head_dim columns that read one head's output (what zero-ablation removes);
  mlp.down_proj weight: column j, the value vector of neuron j (`mlp_value`); up_proj / gate_proj: row j
    (and their biases, `mlp_up_bias` / `mlp_gate_bias`, entry j);
  anything else (embeddings, final and per-layer norms, q/k norms, output biases, an untied lm_head): the
    whole tensor, index null.
Tensor names and fused layouts come from the model family (`verif.model.families`): Phi-3's fused
`qkv_proj` and `gate_up_proj` and GPT-NeoX's per-head interleaved `query_key_value` are cut into the same
components as separate projections, so rows mean the same thing in every family.
A tied model has no lm_head.weight: its embeddings are compared once. If only one checkpoint stores
lm_head.weight and the other ties, the stored one is compared with the tied model's embeddings (row
`lm_head.weight`). Where one vector is zero and the other not, cos / 1-cos / rel_norm_change are null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError, safe_open

from verif.model.families.base import CheckpointLayout, Split

if TYPE_CHECKING:
    from verif.model.arch import Arch

# Elements per float64 chunk (16 MiB per array); a handful of such arrays is the whole working set.
CHUNK_ELEMENTS = 1 << 21
# The study's claim about the size of the norm change.
NORM_CHANGE_CLAIM = 1e-5
# A cosine rounds to 1.0 in bf16 exactly when 1 - cos <= 2^-9: half a bf16 step below 1 (ties go to 1.0).
BF16_COS_ONE = 2.0**-9
HUB_PATTERNS = ["*.json", "*.safetensors"]

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
ATTENTION_COMPONENTS = ("q_proj", "q_bias", "k_proj", "k_bias", "v_proj", "v_bias", "o_proj")
MLP_COMPONENTS = ("mlp_value", "mlp_up", "mlp_gate")
MLP_BIAS_COMPONENTS = ("mlp_up_bias", "mlp_gate_bias")  # only in families with MLP biases
_QUERY_SIDE = ("q_proj", "q_bias", "o_proj")
# The matrices the study compared row by row per head (W_Q, W_K, W_V, W_O).
ROW_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj")
_KV_SIDE = ("k_proj", "k_bias", "v_proj", "v_bias")

# Config keys whose values must agree (Arch field -> config.json key, for error messages).
_ARCH_KEYS = {
    "family": "model_type",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}

SCHEMA = {
    "layer": pl.Int32,
    "component": pl.String,
    "index": pl.Int32,
    "tensor": pl.String,
    "shared_by": pl.List(pl.Int32),
    "numel": pl.Int64,
    "cos": pl.Float64,
    "one_minus_cos": pl.Float64,
    "norm_base": pl.Float64,
    "norm_tuned": pl.Float64,
    "norm_change": pl.Float64,
    "rel_norm_change": pl.Float64,
    "max_abs_diff": pl.Float64,
}


# One row per (layer, query head, matrix, row) in the per-row view (`diff_head_rows`).
ROW_SCHEMA = {
    "layer": pl.Int32,
    "head": pl.Int32,
    "kv_head": pl.Int32,
    "matrix": pl.String,
    "row": pl.Int32,
    **{k: v for k, v in SCHEMA.items() if v == pl.Float64},
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies and what its header says."""

    file: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 4)


@dataclass(frozen=True)
class Checkpoint:
    """One model's safetensors files, read as far as headers and config only."""

    role: str
    spec: str
    folder: str
    arch: Arch
    tensors: dict[str, TensorInfo]
    layout: CheckpointLayout


@dataclass(frozen=True)
class PairTask:
    """One tensor comparison; holds paths only, so it can be shipped to a worker process."""

    layer: int | None
    tensor: str
    base_name: str
    tuned_name: str
    base_file: str
    tuned_file: str
    shape: tuple[int, ...]
    split: Split
    n_heads: int
    n_kv_heads: int
    n_bytes: int


@dataclass(frozen=True)
class DiffPlan:
    """Checked comparison: unit 0 holds the non-layer tensors, unit i+1 layer i."""

    base: Checkpoint
    tuned: Checkpoint
    units: tuple[tuple[PairTask, ...], ...]

    @property
    def arch(self) -> Arch:
        return self.base.arch


# ----------------------------------------------------------------------------------------------------------
# Opening and checking checkpoints (headers only)


def _fetch_hub(spec: str, role: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=spec, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network: all mean "cannot get it"
        raise OSError(
            f"{role} checkpoint {spec!r}: cannot fetch it from the Hugging Face hub "
            f"({type(e).__name__}: {e}); pass a local folder of safetensors instead"
        ) from e


def _shard_files(folder: Path, spec: str, role: str) -> tuple[list[Path], dict[str, str] | None]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise OSError(f"{role} checkpoint {spec!r}: unreadable {index} ({e})") from e
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{role} checkpoint {spec!r}: {index.name} names missing shards {missing}")
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{role} checkpoint {spec!r}: no *.safetensors files in {folder} (only safetensors are compared)"
        )
    return files, None


def open_checkpoint(spec: str, role: str) -> Checkpoint:
    """Resolve `spec` (hub id or local folder) and read its config and tensor headers, no data."""
    # Imported here so that Ray workers, which only run `diff_pairs`, never pay for importing transformers.
    from transformers import AutoConfig

    from verif.model.families import family_of
    from verif.model.loading import arch_from_config, resolve_source

    try:
        source = resolve_source(spec)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{role} checkpoint: {e}") from e
    if source.kind == "gguf":
        raise ValueError(
            f"{role} checkpoint {spec!r}: GGUF is not supported by the weight diff (quantised weights would "
            "compare quantisation noise); use the safetensors release of the model"
        )
    folder = _fetch_hub(spec, role) if source.kind == "hub" else Path(source.location)
    try:
        arch = arch_from_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError) as e:
        raise ValueError(f"{role} checkpoint {spec!r}: bad config.json in {folder} ({e})") from e
    files, weight_map = _shard_files(folder, spec, role)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ValueError(f"tensor {name} stored twice ({tensors[name].file} and {file})")
                    sl = f.get_slice(name)
                    tensors[name] = TensorInfo(str(file), tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise OSError(f"{role} checkpoint {spec!r}: cannot read {file} ({e})") from e
    if weight_map is not None:
        wrong = sorted(n for n, f in weight_map.items() if n not in tensors or Path(tensors[n].file).name != f)
        if wrong:
            raise OSError(f"{role} checkpoint {spec!r}: index and shards disagree on {_few(wrong)}")
    return Checkpoint(role, spec, str(folder), arch, tensors, family_of(arch.family).checkpoint)


def _few(names: list[str], n: int = 8) -> str:
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_arch(base: Checkpoint, tuned: Checkpoint) -> None:
    diffs = [
        f"{key}: base {getattr(base.arch, field)!r}, tuned {getattr(tuned.arch, field)!r}"
        for field, key in _ARCH_KEYS.items()
        if getattr(base.arch, field) != getattr(tuned.arch, field)
    ]
    if diffs:
        raise ValueError(f"architectures differ ({base.spec!r} vs {tuned.spec!r}): " + "; ".join(diffs))


def _name_pairs(base: Checkpoint, tuned: Checkpoint) -> list[tuple[str, str]]:
    """(base name, tuned name) of every comparison; a stored lm_head meets a tied model's embeddings."""
    only_base = sorted(set(base.tensors) - set(tuned.tensors))
    only_tuned = sorted(set(tuned.tensors) - set(base.tensors))
    pairs = [(n, n) for n in sorted(set(base.tensors) & set(tuned.tensors))]
    embed, unembed = base.layout.embed, base.layout.unembed
    if only_base == [unembed] and not only_tuned and tuned.arch.tie_word_embeddings:
        pairs.append((unembed, embed))
        only_base = []
    elif only_tuned == [unembed] and not only_base and base.arch.tie_word_embeddings:
        pairs.append((embed, unembed))
        only_tuned = []
    if only_base or only_tuned:
        parts = [
            f"only in {ck.role} ({ck.folder}) [{len(names)}]: {_few(names)}"
            for ck, names in ((base, only_base), (tuned, only_tuned))
            if names
        ]
        raise ValueError("tensor names differ: " + "; ".join(parts))
    return pairs


def plan_diff(base_spec: str, tuned_spec: str) -> DiffPlan:
    """Open both checkpoints and check config, names, shapes and layout; raises before any data is read."""
    base = open_checkpoint(base_spec, "base")
    tuned = open_checkpoint(tuned_spec, "tuned")
    _check_arch(base, tuned)
    pairs = _name_pairs(base, tuned)
    bad_shapes = [
        f"{bn} is {list(base.tensors[bn].shape)} in base, {list(tuned.tensors[tn].shape)} in tuned"
        + (f" ({tn})" if tn != bn else "")
        for bn, tn in pairs
        if base.tensors[bn].shape != tuned.tensors[tn].shape
    ]
    if bad_shapes:
        raise ValueError(f"shape mismatch ({len(bad_shapes)} tensors): " + "; ".join(bad_shapes[:8]))
    arch, layout = base.arch, base.layout
    layer_name = re.compile(rf"^{re.escape(layout.layer_prefix)}(\d+)\.(.+)$")
    units: list[list[PairTask]] = [[] for _ in range(arch.n_layers + 1)]
    layout_errors = []
    for bn, tn in pairs:
        shape = base.tensors[bn].shape
        m = layer_name.match(bn)
        layer, suffix = (int(m.group(1)), m.group(2)) if m else (None, bn)
        if layer is not None and layer >= arch.n_layers:
            layout_errors.append(f"{bn}: layer {layer} but num_hidden_layers={arch.n_layers}")
            continue
        found = layout.splits(suffix, arch) if layer is not None else None
        if found is None:
            split = Split(layout.unembed if layout.unembed in (bn, tn) else suffix, "whole")
        else:
            split, expected = found
            if shape != expected:
                layout_errors.append(f"{bn} is {list(shape)}, config.json implies {list(expected)}")
                continue
        tied = {layout.embed: ", tied", layout.unembed: ""}
        tensor = bn if bn == tn else f"{bn} (base{tied[bn]}) vs {tn} (tuned{tied[tn]})"
        units[0 if layer is None else layer + 1].append(
            PairTask(layer, tensor, bn, tn, base.tensors[bn].file, tuned.tensors[tn].file, shape, split,
                     arch.n_heads, arch.n_kv_heads, base.tensors[bn].nbytes + tuned.tensors[tn].nbytes)
        )  # fmt: skip
    if layout_errors:
        raise ValueError(
            f"tensors do not match the layout in config.json (num_attention_heads={arch.n_heads}, "
            f"num_key_value_heads={arch.n_kv_heads}, head_dim={arch.head_dim}, hidden_size={arch.hidden_size}, "
            f"intermediate_size={arch.intermediate_size}): " + "; ".join(layout_errors[:8])
        )
    missing_layers = [i for i in range(arch.n_layers) if not units[i + 1]]
    if missing_layers:
        raise ValueError(f"num_hidden_layers={arch.n_layers} but no tensors for layers {missing_layers[:8]}")
    rank = {c: i for i, c in enumerate(ATTENTION_COMPONENTS + MLP_COMPONENTS + MLP_BIAS_COMPONENTS)}

    def order(p: PairTask) -> tuple[int, str]:
        first = p.split.parts[0][0] if p.split.parts else p.split.component
        return rank.get(first, len(rank)), p.base_name

    return DiffPlan(base, tuned, tuple(tuple(sorted(u, key=order)) for u in units))


# ----------------------------------------------------------------------------------------------------------
# The arithmetic


def n_vectors(split: Split, shape: tuple[int, ...]) -> int:
    """How many output rows a tensor of this shape gives."""
    if split.axis == "whole":
        return 1
    if split.axis == "cols":
        return math.prod(shape[1:]) // split.group
    return shape[0] // split.group


def _vector_sums(task: PairTask) -> np.ndarray:
    """Per-vector [|a|^2, |d|^2, d.a, max|d|] (d = b - a), shape [4, n], accumulated over row chunks.

    Three dot products per element suffice: |b|^2 = |a|^2 + 2 d.a + |d|^2 exactly. Chunks of `rows` splits
    hold whole groups, so each vector's rows reduce in one dot product. The float64 work happens in three
    buffers of a fixed size reused for every chunk and every tensor size: allocations of varying size left
    glibc's heap growing with the number of tensors (tens of MB per layer), buffers of one size do not.
    """
    split, shape = task.split, task.shape
    n = n_vectors(split, shape)
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // cols)
    if split.axis == "rows":
        step = max(split.group, step - step % split.group)
    acc = torch.zeros(4, n, dtype=torch.float64)
    buf = torch.empty(3, max(CHUNK_ELEMENTS, step * cols), dtype=torch.float64)
    with safe_open(task.base_file, framework="pt") as fb, safe_open(task.tuned_file, framework="pt") as ft:
        sb, st = fb.get_slice(task.base_name), ft.get_slice(task.tuned_name)
        for r0 in range(0, rows, step):
            r = min(step, rows - r0)
            x, y, d = (b[: r * cols].view(r, cols) for b in buf)
            x.copy_((sb[r0 : r0 + r] if shape else sb[...]).reshape(r, cols))  # converts to float64
            y.copy_((st[r0 : r0 + r] if shape else st[...]).reshape(r, cols))
            torch.sub(y, x, out=d)
            if split.axis == "cols":
                x, y, d = (v.view(r, n, split.group) for v in (x, y, d))
                for i, (u, v) in enumerate(((x, x), (d, d), (d, x))):
                    acc[i] += torch.mul(u, v, out=y).sum((0, 2))  # y is free once d is known
                acc[3] = torch.maximum(acc[3], torch.linalg.vector_norm(d, math.inf, (0, 2)))
                continue
            group = split.group if split.axis == "rows" else r
            x, d = x.view(-1, group * cols), d.view(-1, group * cols)
            where = slice(r0 // group, r0 // group + x.shape[0]) if split.axis == "rows" else slice(0, 1)
            for i, (u, v) in enumerate(((x, x), (d, d), (d, x))):
                acc[i, where] += torch.bmm(u.unsqueeze(1), v.unsqueeze(2)).view(-1)
            acc[3, where] = torch.maximum(acc[3, where], torch.linalg.vector_norm(d, math.inf, 1))
    return acc.numpy()


def metrics_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """cos, 1-cos, norms and changes from [|a|^2, |d|^2, d.a, max|d|] (d = b - a) without cancellation.

    |b|^2 - |a|^2 = d.(a+b) = 2 d.a + |d|^2, so norm_change = |b| - |a| = (2 d.a + |d|^2) / (|a|+|b|), and
    2|a||b|(1-cos) = |d|^2 - (|b|-|a|)^2: a tiny change gives a tiny 1-cos at full relative precision
    (1 - a.b/(|a||b|) would round to 0). cos is 1 - (1-cos), hence exactly 1 for identical vectors.
    Undefined values (one vector zero, the other not) are NaN.
    """
    aa, dd, da, maxd = sums
    ds = 2.0 * da + dd
    with np.errstate(divide="ignore", invalid="ignore"):
        na, nb = np.sqrt(aa), np.sqrt(aa + ds)
        den = na + nb
        change = np.where(den > 0, ds / np.where(den > 0, den, 1.0), 0.0)
        omc = np.clip((dd - change * change) / (2.0 * na * nb), 0.0, 2.0)
        omc = np.where(dd == 0, 0.0, np.where(na * nb > 0, omc, np.nan))
        rel = np.where(na > 0, change / np.where(na > 0, na, 1.0), np.where(change == 0, 0.0, np.nan))
    return {
        "cos": 1.0 - omc,
        "one_minus_cos": omc,
        "norm_base": na,
        "norm_tuned": nb,
        "norm_change": change,
        "rel_norm_change": rel,
        "max_abs_diff": maxd,
    }


def diff_pair(task: PairTask) -> pl.DataFrame:
    """Rows of one tensor comparison (one per head / kv head / neuron, or one for a whole tensor)."""
    metrics = metrics_from_sums(_vector_sums(task))
    n = len(metrics["cos"])
    whole = task.split.axis == "whole"
    components, index = task.split.labels(n)
    group = task.n_heads // task.n_kv_heads
    shared_by = [list(range(k * group, (k + 1) * group)) if c in _KV_SIDE else None for c, k in zip(components, index)]
    numel = (math.prod(task.shape) if task.shape else 1) // n
    return pl.DataFrame(
        {
            "layer": [task.layer] * n,
            "component": components,
            "index": [None] * n if whole else np.asarray(index, dtype=np.int32),
            "tensor": [task.tensor] * n,
            "shared_by": shared_by,
            "numel": [numel] * n,
            **metrics,
        },
        schema=SCHEMA,
        nan_to_null=True,
    )


def diff_pairs(tasks: tuple[PairTask, ...]) -> pl.DataFrame:
    """Rows of a group of comparisons (a layer, or the non-layer tensors), in order."""
    frames = [diff_pair(t) for t in tasks]
    return pl.concat(frames) if frames else pl.DataFrame(schema=SCHEMA)


def diff_checkpoints(plan: DiffPlan) -> pl.DataFrame:
    """The whole table, serially."""
    return pl.concat([diff_pairs(u) for u in plan.units])


# ----------------------------------------------------------------------------------------------------------
# The study's per-row view of the attention matrices


def row_tasks(plan: DiffPlan, layers: set[int]) -> list[PairTask]:
    """The attention weight tensors (q, k, v, o; fused ones too) of `layers`, to be compared row by row."""
    def attention(task: PairTask) -> bool:
        names = [c for c, _ in task.split.parts] or [task.split.component]
        return any(n in ROW_MATRICES for n in names)

    return [t for unit in plan.units[1:] for t in unit if t.layer in layers and attention(t)]


def diff_rows(task: PairTask, heads: set[int] | None = None) -> pl.DataFrame:
    """One row per (query head, matrix, row) of one attention tensor, as the study compared W_Q, W_K, W_V
    and W_O: row r of a head is row r of its q/k/v slice, or column r of its o_proj slice (W_O's row in
    TransformerLens' layout). A key/value head's rows appear once for every query head it serves.

    The tensor is read as single rows (`_vector_sums` with groups of 1); row j*head_dim + r is row r of
    the head-level vector j, whose (component, index) the family's split names. `heads`: query heads
    to keep (None: all).
    """
    d = task.split.group
    single = Split(task.split.component, task.split.axis, 1)
    metrics = metrics_from_sums(_vector_sums(dataclasses.replace(task, split=single)))
    n = len(metrics["cos"])
    components, index = task.split.labels(n // d)
    frame = pl.DataFrame(
        {"matrix": np.repeat(components, d), "index": np.repeat(np.asarray(index, dtype=np.int32), d),
         "row": np.tile(np.arange(d, dtype=np.int32), n // d), **metrics},
        nan_to_null=True,
    ).filter(pl.col("matrix").is_in(ROW_MATRICES))
    group = task.n_heads // task.n_kv_heads
    serves = pl.DataFrame({"kv_head": np.arange(task.n_heads, dtype=np.int32) // group,
                           "head": np.arange(task.n_heads, dtype=np.int32)})
    query = frame.filter(pl.col("matrix").is_in(_QUERY_SIDE)).with_columns(
        head=pl.col("index"), kv_head=(pl.col("index") // group).cast(pl.Int32))
    kv = frame.filter(~pl.col("matrix").is_in(_QUERY_SIDE)).rename({"index": "kv_head"}).join(serves, on="kv_head")
    rows = pl.concat([query.drop("index"), kv], how="diagonal").with_columns(layer=pl.lit(task.layer, pl.Int32))
    if heads is not None:
        rows = rows.filter(pl.col("head").is_in(sorted(heads)))
    return rows.select(list(ROW_SCHEMA)).cast(ROW_SCHEMA)


def diff_head_rows(plan: DiffPlan, heads: list[tuple[int, int]] | None) -> pl.DataFrame:
    """The per-row table of the attention matrices of `heads` ((layer, head) pairs; None: every head)."""
    wanted: dict[int, set[int] | None] = {}
    for layer, head in heads if heads is not None else []:
        wanted.setdefault(layer, set()).add(head)
    layers = set(range(plan.arch.n_layers)) if heads is None else set(wanted)
    frames = [diff_rows(t, wanted.get(t.layer) if heads is not None else None) for t in row_tasks(plan, layers)]
    rows = pl.concat(frames) if frames else pl.DataFrame(schema=ROW_SCHEMA)
    return rows.sort(["layer", "head", "matrix", "row"])


def summarise_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """Per (layer, head, matrix): how many rows, the smallest cosine and the largest and median 1 - cos."""
    omc = pl.col("one_minus_cos")
    return rows.group_by("layer", "head", "matrix").agg(
        n_rows=pl.len(), min_cos=pl.col("cos").min(), max_one_minus_cos=omc.max(),
        median_one_minus_cos=omc.median(), max_abs_rel_norm_change=pl.col("rel_norm_change").abs().max(),
        cos_is_1_in_bf16=(omc.fill_null(math.inf) <= BF16_COS_ONE).all(),
    ).sort("layer", "head", "matrix")


# ----------------------------------------------------------------------------------------------------------
# Selections and verdicts


def check_selection(
    arch: Arch, target_heads: list[tuple[int, int]] | None, value_vectors: list[tuple[int, int]] | None
) -> None:
    """Refuse heads / neurons outside the model before any work starts."""
    bad = [
        f"head L{layer} H{h}"
        for layer, h in target_heads or []
        if not (0 <= layer < arch.n_layers and 0 <= h < arch.n_heads)
    ]
    bad += [
        f"value vector L{layer} N{j}"
        for layer, j in value_vectors or []
        if not (0 <= layer < arch.n_layers and 0 <= j < arch.intermediate_size)
    ]
    if bad:
        raise ValueError(
            f"selection outside the model ({arch.n_layers} layers x {arch.n_heads} heads, "
            f"{arch.intermediate_size} neurons): {_few(bad)}"
        )


def _keys(rows: list[tuple[int, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"layer": pl.Int32, "component": pl.String, "index": pl.Int32}, orient="row")


def head_rows(table: pl.DataFrame, heads: list[tuple[int, int]], arch: Arch) -> pl.DataFrame:
    """A head's rows: its q rows, q bias and o_proj columns, and the k/v rows (and biases) it reads."""
    group = arch.n_heads // arch.n_kv_heads
    keys = [(layer, c, h) for layer, h in heads for c in _QUERY_SIDE]
    keys += [(layer, c, h // group) for layer, h in heads for c in _KV_SIDE]
    return table.join(_keys(keys).unique(), on=["layer", "component", "index"], how="semi")


def neuron_rows(table: pl.DataFrame, neurons: list[tuple[int, int]]) -> pl.DataFrame:
    """A neuron's value vector (down_proj column) with its up_proj and gate_proj rows (and their biases)."""
    keys = [(layer, c, j) for layer, j in neurons for c in MLP_COMPONENTS + MLP_BIAS_COMPONENTS]
    return table.join(_keys(keys).unique(), on=["layer", "component", "index"], how="semi")


def top_value_vectors(table: pl.DataFrame, k: int) -> list[tuple[int, int]]:
    """The k neurons whose value vector turned most (1-cos), ties by |relative norm change|."""
    ranked = (
        table.lazy()
        .filter(pl.col("component") == "mlp_value")
        .select("layer", "index", "one_minus_cos", pl.col("rel_norm_change").abs())
        .sort(["one_minus_cos", "rel_norm_change", "layer", "index"], descending=[True, True, False, False],
              nulls_last=True)
        .head(k)
        .collect()
    )  # fmt: skip
    return list(zip(ranked["layer"].to_list(), ranked["index"].to_list(), strict=True))


def select_rows(
    table: pl.DataFrame,
    arch: Arch,
    target_heads: list[tuple[int, int]] | None,
    value_vectors: list[tuple[int, int]] | None,
    top_k: int,
) -> pl.DataFrame:
    """The rows of each study selection, tagged with a `selection` column."""
    parts = []
    if target_heads:
        parts.append(head_rows(table, target_heads, arch).with_columns(selection=pl.lit("target_heads")))
    if value_vectors:
        parts.append(neuron_rows(table, value_vectors).with_columns(selection=pl.lit("value_vectors")))
    if top_k > 0:
        top = neuron_rows(table, top_value_vectors(table, top_k))
        parts.append(top.with_columns(selection=pl.lit(f"top_{top_k}_value_vectors")))
    if not parts:
        return table.clear().with_columns(selection=pl.lit(None, pl.String))
    return pl.concat(parts)


def _e(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _group_stats(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Aggregates of one group as expressions, so only the metric columns are ever touched (no copies)."""
    omc, change, rel = pl.col("one_minus_cos"), pl.col("norm_change").abs(), pl.col("rel_norm_change").abs()
    worst = [pl.col(c).sort_by(omc, descending=True, nulls_last=True).first().alias(f"_worst_{c}")
             for c in ("layer", "component", "index", "one_minus_cos")]  # fmt: skip
    return rows.select(
        n_rows=pl.len(),
        n_changed=(pl.col("max_abs_diff") > 0).sum(),
        n_undefined=omc.null_count(),
        max_one_minus_cos=omc.max(),
        median_one_minus_cos=omc.median(),
        min_cos=pl.col("cos").min(),
        max_abs_norm_change=change.max(),
        median_abs_norm_change=change.median(),
        max_abs_rel_norm_change=rel.max(),
        median_abs_rel_norm_change=rel.median(),
        max_abs_diff=pl.col("max_abs_diff").max(),
        cos_is_1_in_bf16=(omc.fill_null(math.inf) <= BF16_COS_ONE).all(),
        *worst,
    )


def _verdict(name: str, n_items: int, stats: dict) -> dict:
    """The summary row of a group, with its one-line verdict on the study's claim."""
    worst = stats.pop("_worst_one_minus_cos")
    layer, component, index = stats.pop("_worst_layer"), stats.pop("_worst_component"), stats.pop("_worst_index")
    most_turned = "none"
    if worst:
        most_turned = ("" if layer is None else f"L{layer} ") + component + ("" if index is None else f"[{index}]")
    out = {"selection": name, "n_items": n_items, **stats, "most_turned": most_turned}
    out["norm_change_below_claim"] = (stats["max_abs_norm_change"] or 0.0) < NORM_CHANGE_CLAIM
    yes = {True: "yes", False: "no"}
    undefined = f", {stats['n_undefined']} undefined (zero vs non-zero)" if stats["n_undefined"] else ""
    out["verdict"] = (
        f"{name} ({n_items} items, {stats['n_changed']}/{stats['n_rows']} rows changed{undefined}): "
        f"max 1-cos {_e(stats['max_one_minus_cos'])} ({most_turned}), "
        f"max |rel norm change| {_e(stats['max_abs_rel_norm_change'])}, "
        f"max |norm change| {_e(stats['max_abs_norm_change'])} (median {_e(stats['median_abs_norm_change'])}), "
        f"max |diff| {_e(stats['max_abs_diff'])}; cos rounds to 1 in bf16: {yes[stats['cos_is_1_in_bf16']]}; "
        f"|norm change| < {NORM_CHANGE_CLAIM:g}: {yes[out['norm_change_below_claim']]}"
    )
    return out


def summarise(table: pl.DataFrame, selected: pl.DataFrame, arch: Arch) -> pl.DataFrame:
    """Summary rows for each study selection and for all heads, all neurons, whole tensors and everything."""
    groups: list[tuple[str, int, pl.LazyFrame]] = []
    for name in selected["selection"].unique(maintain_order=True).to_list():
        rows = selected.lazy().filter(pl.col("selection") == name)
        anchors = selected.filter(pl.col("selection") == name, pl.col("component").is_in(("q_proj", "mlp_value")))
        groups.append((name, anchors.select("layer", "index").n_unique(), rows))
    lazy, component = table.lazy(), pl.col("component")
    groups += [
        ("all_heads", arch.n_layers * arch.n_heads, lazy.filter(component.is_in(ATTENTION_COMPONENTS))),
        ("all_neurons", arch.n_layers * arch.intermediate_size,
         lazy.filter(component.is_in(MLP_COMPONENTS + MLP_BIAS_COMPONENTS))),
        ("whole_tensors", table["index"].null_count(), lazy.filter(pl.col("index").is_null())),
        ("all", table.height, lazy),
    ]
    stats = pl.collect_all([_group_stats(rows) for _, _, rows in groups])
    summary = [_verdict(name, n, s.row(0, named=True)) for (name, n, _), s in zip(groups, stats, strict=True)]
    return pl.DataFrame(summary)
