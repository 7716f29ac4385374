"""Whether a sweep's workers can hold their model, said before any weights load: `--check` prints the
estimate per worker, and a model that cannot fit the GPUs a worker would have is refused in one line
with the numbers and the `ray.gpus_per_worker` that would fit.

The numbers come from the config alone (`verif.model.memory.estimate`: parameters, one forward chunk,
hidden states and logits, the KV-free peak on each of a worker's GPUs). The GPUs compared with are this
machine's (the total memory of its first `ray.gpus_per_worker` GPUs), the usual case of a driver on a
GPU node; each worker checks again against its own GPUs' free memory before it loads a weight
(`verif.model.loading.load_model`). Without a GPU here the lines say what a worker would need on one.
"""

from __future__ import annotations

import torch

from jobs.config import Config
from jobs.errors import InputError
from verif.model.devicemap import GB
from verif.model.loading import ModelSource, read_config, resolve_dtype
from verif.model.memory import Estimate, estimate

SHOWN_SPLITS = (1, 2, 4, 8)  # GPUs per worker whose per-GPU need is shown when there is no GPU to compare with


class FitError(InputError):
    """A model that cannot fit the GPUs a worker would have."""


def on_gpu(cfg: Config) -> bool:
    """Whether the workers score on GPUs: `model.device` is cuda, or auto with GPUs asked of Ray or, in this
    process (`ray.workers: 0`), on this machine's GPU."""
    if cfg.model.device != "auto":
        return cfg.model.device == "cuda"
    return cfg.ray.gpus_per_worker > 0 or (cfg.ray.workers == 0 and torch.cuda.is_available())


def local_gpu_memory() -> list[int]:
    """Total bytes of each GPU this process sees (none without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def fit_line(name: str, est: Estimate, gpus: int, totals: list[int]) -> str:
    """One model's estimate against `gpus` GPUs per worker like `totals` (this machine's); `FitError` if it
    cannot fit them."""
    need = est.per_gpu(gpus)
    head = f"fit: {name}: {est.describe()}"
    if not totals:
        splits = ", ".join(f"{n}: {_gb(est.per_gpu(n))}" for n in SHOWN_SPLITS)
        return (f"{head}; with ray.gpus_per_worker {gpus} a worker needs {_gb(need)} on each GPU (no GPU here to "
                f"compare with; per GPU by gpus_per_worker, {splits})")
    have = min(totals[:gpus])
    if need > have:
        n = est.gpus_needed(have)
        fix = f"ray.gpus_per_worker: {n} would fit ({_gb(est.per_gpu(n))} per GPU)" if n else "no gpus_per_worker would"
        raise FitError(f"{name} does not fit a worker's {gpus} GPU(s) of {_gb(have)} (ray.gpus_per_worker {gpus}): "
                       f"it needs {_gb(need)} per GPU; {est.describe()}; {fix}, or lower engine.max_chunk_tokens / "
                       "engine.max_unit_tokens")  # fmt: skip
    short = f" (this machine has {len(totals)}: a worker's GPUs must all be on one node)" if gpus > len(totals) else ""
    return f"{head}; {_gb(need)} on each of {gpus} GPU(s) of {_gb(have)} here: fits{short}"


def check_fit(cfg: Config, sources: list[ModelSource]) -> list[str]:
    """The fit line of each model (`--check` prints them); `FitError` for one that cannot fit."""
    gpu = on_gpu(cfg)
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if gpu else "cpu")
    totals = local_gpu_memory() if gpu else []
    lines = []
    for src in sources:
        est = estimate(read_config(src), dtype, cfg.engine, cfg.prompts.max_tokens)
        if gpu:
            lines.append(fit_line(src.name, est, max(1, int(cfg.ray.gpus_per_worker)), totals))
        else:
            lines.append(f"fit: {src.name} on the CPU: {est.describe()} (no GPU asked for: nothing refused)")
    return lines
