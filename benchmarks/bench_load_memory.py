"""Peak CPU memory while a worker loads its model, before and after issue 23 (loading with a device map).

Before: `from_pretrained` into CPU memory, then one `.to(device, dtype)` (`benchlib.load_before`, the old
`load_model`). After: `verif.model.loading.load_model`, `from_pretrained(device_map=...)`: the weights go
from the checkpoint to their device. Each load runs in a fresh process (`--child`); what it reports is
the peak above the process's memory just before the load (`benchlib.PeakRss`): the resident set's
high-water mark, which counts the memory-mapped checkpoint's pages as they are read, and anonymous memory,
the private copies.

Models: the packaged SmolLM2-135M (GGUF: transformers dequantises it on the CPU, so both paths are the
same code) and a seed-shaped model with a large hidden size (36 layers x 16 heads, hidden 1024, a float32
safetensors checkpoint of 1.9 GB), loaded in float32 and in bfloat16 (a cast on the way). On a CPU the
weights end in CPU memory either way; what loading to a GPU costs the CPU is measured on the GPU machine
by `gpu_multi_device.py`.

    .venv/bin/python benchmarks/bench_load_memory.py [--out benchmarks/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def child(spec: str, path: str, dtype: str) -> dict:
    """One load in this (fresh) process; the numbers as a dict."""
    import torch
    from transformers import AutoTokenizer

    from verif.model.loading import load_model, resolve_source

    torch.set_num_threads(1)
    source = resolve_source(spec)
    tok_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    t0 = time.perf_counter()
    with benchlib.PeakRss() as mem:
        if path == "before":
            model = benchlib.load_before(spec, dtype, "cpu")
            AutoTokenizer.from_pretrained(source.location, **tok_kwargs)
        else:
            model = load_model(spec, dtype, "cpu").model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": time.perf_counter() - t0, "param_bytes": params, "peak_rss_bytes": mem.peak,
            "peak_anon_bytes": mem.peak_anon, "rss_after_bytes": mem.after}


def measure(spec: str, path: str, dtype: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", spec, path, dtype], cwd=REPO, capture_output=True,
                          text=True, timeout=1800, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                        "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("SPEC", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/load_memory.json)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sys.path.insert(0, str(REPO))
    from tests.support.models import build_seed_shaped_model

    rows, result = [], {"benchmark": "load_memory", "machine": benchlib.machine_info(), "loads": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        wide = build_seed_shaped_model(Path(tmp) / "wide", head_dim=64)  # hidden 16 x 64 = 1024
        result["build_seconds"] = time.perf_counter() - t0
        cases = [("packaged:smollm2-135m", "float32"), (str(wide), "float32"), (str(wide), "bfloat16")]
        for spec, dtype in cases:
            name = "smollm2-135m (gguf)" if spec.startswith("packaged:") else "seed-shaped, hidden 1024"
            for path in ("before", "after"):
                m = measure(spec, path, dtype)
                result["loads"].append({"model": name, "dtype": dtype, "path": path, **m})
                rows.append([name, dtype, path, m["param_bytes"] / GB, m["peak_rss_bytes"] / GB,
                             m["peak_anon_bytes"] / GB, m["seconds"]])
    benchlib.print_table("peak CPU memory while loading, above the process before it (GB)",
                         ["model", "dtype", "path", "weights", "peak RSS", "peak anon", "s"], rows)
    benchlib.write_json(result, args.out, "load_memory")


if __name__ == "__main__":
    main()
