"""Helpers shared by the benchmark scripts: study prompts and conditions, timing, tables, JSON.

Scripts import this as a sibling module (`import benchlib`: a script's own folder is on `sys.path`).
It imports only the standard library, numpy, torch and `verif` modules that need nothing beyond
torch and transformers, so `gpu_throughput.py` can use it on a bare GPU machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from verif.task.countdown import generate_problems, make_attempts
from verif.design.heads import STUDY_HEADS_TEXT, HeadSet, canonical, parse_heads, random_head_sets
from verif.task.prompts import render_prompt

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def study_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` verification prompts over generated Countdown attempts (half correct), as the study asks them."""
    attempts = make_attempts(generate_problems(n, seed), seed)
    return [render_prompt(a.problem.numbers, a.problem.target, a.text) for a in attempts]


def study_head_sets(n_layers: int, n_heads: int, n_random: int, seed: int = 0) -> tuple[list[HeadSet], HeadSet]:
    """Baseline, target and `n_random` control sets of the target's size, plus the target itself.

    The target is the study's 29 heads when the model has their shape (36 x 16); on another shape
    (SmolLM2) a fixed random 29-head set stands in, so the conditions cost the same amount of work.
    """
    study = canonical(parse_heads(STUDY_HEADS_TEXT))
    fits = all(layer < n_layers and head < n_heads for layer, head in study)
    target = study if fits else random_head_sets(1, len(study), n_layers, n_heads, seed=10_000 + seed)[0]
    controls = random_head_sets(n_random, len(target), n_layers, n_heads, seed=seed, exclude=target)
    return [(), target, *controls], target


THREADS_HELP = (
    "torch CPU threads (default 1; 0: torch's default). On a small machine shared with other jobs, "
    "OpenMP threads spin against them and timings turn to noise (2-10x swings on 2 cores); one "
    "thread gives stable ratios"
)


def set_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


def machine_info() -> dict:
    """What the numbers were measured on."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, object]:
    """Wall seconds of one call, with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def best_of_rounds(variants: dict[str, Callable[[], object]], rounds: int, device="cpu") -> dict[str, float]:
    """Best wall time per variant over `rounds` rounds that run the variants interleaved.

    Interleaving keeps a slow spell of a shared machine from landing on one variant only; the best
    round is the least disturbed one.
    """
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], timed(fn, device)[0])
    return best


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table (floats with 3 significant digits)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def write_json(result: dict, out: str | Path | None, name: str) -> Path:
    """Write `result` to `out` (a .json file, or a folder to put NAME.json in), default results/NAME.json."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    if path.suffix != ".json":
        path = path / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    return path


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` field (kB) in bytes; 0 where the kernel does not report it."""
    with open("/proc/self/status") as f:
        line = next((x for x in f if x.startswith(field + ":")), None)
    return int(line.split()[1]) * 1024 if line else 0


class PeakRss:
    """Peak CPU memory of this process while a `with` block runs, above what it held when the block began.

    `peak`: the resident set's high-water mark (VmHWM, reset on entry where the kernel allows it), which
    counts the pages of a memory-mapped checkpoint that were read. `peak_anon`: anonymous memory only
    (RssAnon, sampled every 2 ms by a thread): private copies of tensors, which file pages are not (the
    kernel can drop those). Linux only.
    """

    def __enter__(self) -> PeakRss:
        import threading

        self.base, self.base_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # no reset: VmHWM then includes the imports' peak, at most the base
            pass
        self._anon, self._stop = self.base_anon, threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._anon = max(self._anon, _status_bytes("RssAnon"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._anon = max(self._anon, _status_bytes("RssAnon"))
        self.peak = max(0, _status_bytes("VmHWM") - self.base)
        self.peak_anon = self._anon - self.base_anon
        self.after = _status_bytes("VmRSS") - self.base


def load_before(spec: str, dtype: str, device: str):
    """What `verif.model.loading.load_model` did before issue 23 (the baseline of the loading benchmarks):
    the weights loaded into CPU memory, then moved and cast to the device in one `.to`. Returns the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from verif.model.families import family_of
    from verif.model.loading import resolve_dtype, resolve_source

    source = resolve_source(spec)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = AutoConfig.from_pretrained(source.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.location, config=config, dtype=torch_dtype,
                                                 attn_implementation=family_of(config.model_type).attn_implementation(config),
                                                 **kwargs)  # fmt: skip
    return model.to(device=device, dtype=torch_dtype).eval()
