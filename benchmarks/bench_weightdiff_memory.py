"""Peak memory of the weight diff does not grow with model size: it streams one tensor pair at a time.

Writes synthetic Qwen2-layout checkpoints (one safetensors shard per layer plus an index, like a real
sharded release) with several layer counts and wide layers (a small vocabulary, so layer tensors and not
the embedding are the largest), then runs `run_weight_diff` on each pair in a fresh subprocess and reads
the peak RSS it reached above its RSS just before the diff (VmHWM, reset first; file pages of the
memory-mapped shards count too). The child first runs a tiny warm-up diff so one-time costs (allocator pools, polars
and parquet code paths) are not charged to the measurement.

    .venv/bin/python benchmarks/bench_weightdiff_memory.py [--layers 4 16] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "weightdiff_memory.json"
MiB = 1 << 20


def _rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Start a fresh high-water mark (Linux >= 4.0). ru_maxrss cannot be used: Linux carries it over an
    exec from the parent, so a child's ru_maxrss is at least the benchmark parent's RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def write_checkpoint(
    folder: Path, n_layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
    dtype: str, seed: int, base: Path | None = None,
) -> int:  # fmt: skip
    """A random Qwen2-layout checkpoint, one shard per layer; with `base`, that checkpoint plus small noise.

    Returns the bytes of tensor data written.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
    ).save_pretrained(folder)  # fmt: skip
    hd = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (heads * hd, hidden), "self_attn.q_proj.bias": (heads * hd,),
        "self_attn.k_proj.weight": (kv_heads * hd, hidden), "self_attn.k_proj.bias": (kv_heads * hd,),
        "self_attn.v_proj.weight": (kv_heads * hd, hidden), "self_attn.v_proj.bias": (kv_heads * hd,),
        "self_attn.o_proj.weight": (hidden, heads * hd), "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden), "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }  # fmt: skip
    torch_dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    globals_ = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    shards = {"model-globals.safetensors": globals_}
    for i in range(n_layers):
        shards[f"model-layer{i:03d}.safetensors"] = {f"model.layers.{i}.{k}": v for k, v in shapes.items()}
    weight_map, total = {}, 0
    for fname, tensors in shards.items():
        old = load_file(base / fname) if base else {}
        out = {}
        for name, shape in tensors.items():
            noise = torch.randn(shape, generator=gen)
            value = old[name].float() + 1e-4 * noise if base else 0.02 * noise
            out[name] = value.to(torch_dtype)
            weight_map[name] = fname
            total += out[name].numel() * out[name].element_size()
        save_file(out, folder / fname, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _largest_tensor_bytes(folder: Path) -> int:
    from verif.analysis.weightdiff import open_checkpoint

    return max(t.nbytes for t in open_checkpoint(str(folder), "base").tensors.values())


def measure(base: Path, tuned: Path, warm_base: Path, warm_tuned: Path, out: Path, threads: int) -> dict:
    """Run inside a fresh process: warm up, then the diff; peak RSS above the RSS just before it."""
    import torch

    from jobs.weight_diff import run_weight_diff

    if threads:
        torch.set_num_threads(threads)

    run_weight_diff(str(warm_base), str(warm_tuned), out / "warmup", top_k=5)
    before = _rss_bytes()
    _reset_peak_rss()
    t0 = time.perf_counter()
    result = run_weight_diff(str(base), str(tuned), out / "diff", top_k=50)
    seconds = time.perf_counter() - t0
    return {"rss_before": before, "peak_rss": _peak_rss_bytes(), "seconds": seconds, "rows": result.table.height}


def run(args: argparse.Namespace) -> list[dict]:
    """Build the checkpoints, measure each layer count in its own subprocess, return the rows."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_weightdiff_"))
    widths = dict(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                  vocab=args.vocab, dtype=args.dtype)  # fmt: skip
    tiny = dict(widths, hidden=args.heads * 2, intermediate=args.heads * 4, vocab=64)
    write_checkpoint(work / "warm" / "base", 1, seed=1, **tiny)
    write_checkpoint(work / "warm" / "tuned", 1, seed=2, base=work / "warm" / "base", **tiny)
    rows = []
    try:
        for n_layers in args.layers:
            base, tuned = work / f"L{n_layers}" / "base", work / f"L{n_layers}" / "tuned"
            model_bytes = write_checkpoint(base, n_layers, seed=3, **widths)
            write_checkpoint(tuned, n_layers, seed=4, base=base, **widths)
            cmd = [sys.executable, __file__, "--measure", str(base), str(tuned), str(work / "warm"), str(work / "out"),
                   "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"measurement failed:\n{done.stderr[-4000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            pair = 2 * _largest_tensor_bytes(base)
            itemsize = {"bf16": 2, "f32": 4}[args.dtype]
            rows.append({
                "layers": n_layers, "model_bytes": model_bytes, "largest_pair_bytes": pair,
                "largest_pair_f64_bytes": pair // itemsize * 8,
                "peak_extra_bytes": got["peak_rss"] - got["rss_before"], "seconds": got["seconds"],
                "rows": got["rows"], "threads": args.threads, **widths,
            })  # fmt: skip
            shutil.rmtree(work / f"L{n_layers}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the measured process (0: default)")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--measure", nargs=4, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        base, tuned, warm, out = args.measure
        print(json.dumps(measure(base, tuned, warm / "base", warm / "tuned", out, args.threads)))
        return
    rows = run(args)
    print(f"{'layers':>6} {'model MiB':>10} {'largest pair MiB':>17} {'(f64) MiB':>10} {'peak extra MiB':>15} {'s':>7}")
    for r in rows:
        print(
            f"{r['layers']:>6} {r['model_bytes'] / MiB:>10.1f} {r['largest_pair_bytes'] / MiB:>17.1f} "
            f"{r['largest_pair_f64_bytes'] / MiB:>10.1f} {r['peak_extra_bytes'] / MiB:>15.1f} {r['seconds']:>7.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "chunk_elements": _chunk_elements()}, indent=2) + "\n")
    print(f"wrote {args.out}")


def _chunk_elements() -> int:
    from verif.analysis.weightdiff import CHUNK_ELEMENTS

    return CHUNK_ELEMENTS


if __name__ == "__main__":
    main()
