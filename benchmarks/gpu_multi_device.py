"""Models bigger than one GPU (issue 23), measured on the GPU machine in one short run.

A random-weight model of the Qwen2.5-3B architecture, built on the GPU in bf16 and saved as a
safetensors folder (with a stub tokenizer: the prompts are random token ids, 160-180 tokens), then:

1. *loading*: the folder loaded in a fresh process by the old path (into CPU memory, then `.to`:
   `benchlib.load_before`) and by `verif.model.loading.load_model` (`from_pretrained(device_map=...)`):
   peak CPU memory above the process before the load (resident and anonymous, `benchlib.PeakRss`),
   GPU memory after it, seconds;
2. *the degenerate split*: the model split into 4 slots that are all cuda:0, so every move of the
   multi-device code runs (and costs nothing): rows against the unsplit model (identical when the
   kernels are the same, else judged against the bf16 floor: the unsplit model scored with another
   chunk size), the moves counted, the self-check on the split model, scored prompts/s of both;
2b. *a real two-device split on one GPU*: a small float32 Qwen2 with layer ranges alternating between
   cuda:0 and the CPU (every move copies between devices), fast and hook path against the model all
   on cuda:0, within the self-check's float32 tolerance;
3. *the real split* when more than one GPU is visible: `load_model(..., gpus=N)` with the balanced
   map, its rows against the unsplit model, per-GPU memory, prompts/s;
4. *the fit estimate* (`verif.model.memory.estimate`, from the config) against the peak measured while
   scoring (`torch.cuda.max_memory_allocated`), with the default engine options and with chunks full;
5. prompts/s of split against unsplit (in 2 and 3).

Needs torch, transformers, accelerate, safetensors, tokenizers (no Ray, W&B, polars or tokenizer
package, no hub). Writes OUT/gpu_multi_device.json after every step and OUT/gpu_multi_device.log.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_multi_device.py --out $OUT     # the GPU machine, < 5 min
    python benchmarks/gpu_multi_device.py --tiny --device cpu --out DIR          # CPU smoke run (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

import benchlib  # noqa: E402
from gpu_throughput import QWEN25_YES_NO, build_model, qwen25_3b_config  # noqa: E402
from verif.model.engine import EngineOptions, Scorer  # noqa: E402
from verif.model.loading import load_model  # noqa: E402
from verif.model.memory import estimate  # noqa: E402
from verif.model.placement import Placement  # noqa: E402
from verif.model.selfcheck import self_check, tolerance  # noqa: E402

GB = 1e9
PAD_ID = 151643  # <|endoftext|>: padded keys are masked, any id would do


def tiny_config():
    """Qwen2.5-3B's layers and heads (the study's head sets fit), head_dim 4."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)  # fmt: skip


def small_config():
    """The float32 model of step 2b: Qwen2.5's vocabulary and GQA, narrow and shallow (the CPU runs half of it)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)  # fmt: skip


def write_folder(loaded, folder: Path) -> int:
    """Save the model (safetensors) with a one-word stub tokenizer, so `load_model` can read the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    loaded.model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def child_load(folder: str, path: str, device: str) -> dict:
    """One load in this fresh process: CPU peak above the process before it, GPU memory after it."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)  # the CUDA context exists before the measurement starts
    t0 = time.perf_counter()
    with benchlib.PeakRss() as mem:
        if path == "before":
            model = benchlib.load_before(folder, "bfloat16" if cuda else "float32", device)
        else:
            model = load_model(folder, "bfloat16" if cuda else "float32", device).model
        if cuda:
            torch.cuda.synchronize()
    out = {"seconds": time.perf_counter() - t0, "cpu_peak_rss_gb": mem.peak / GB, "cpu_peak_anon_gb": mem.peak_anon / GB,
           "cpu_rss_after_gb": mem.after / GB, "param_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / GB,
           "devices": sorted({str(p.device) for p in model.parameters()})}  # fmt: skip
    if cuda:
        out["gpu_allocated_gb"] = torch.cuda.memory_allocated() / GB
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


def run_children(folder: Path, device: str) -> dict:
    """Both loads, each in a fresh process: one after the other on a GPU (their seconds are compared), at
    once on a CPU (only the test runs there)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{BENCH}", "TQDM_DISABLE": "1"}

    def start(path: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--child-load", str(folder), path, device], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def answer(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=600)
        return json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": err[-2000:]}

    if device.startswith("cuda"):
        return {path: answer(start(path)) for path in ("before", "after")}
    procs = {path: start(path) for path in ("before", "after")}
    return {path: answer(proc) for path, proc in procs.items()}


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def scored(loaded, tokens, conditions, opts: EngineOptions, device: str) -> tuple[object, float, Scorer]:
    """Score once to warm up (the same shapes), then time a second run: (table, rows per second, scorer)."""
    scorer = Scorer(loaded, QWEN25_YES_NO, opts)
    scorer.score_tokens(tokens, conditions)
    seconds, table = benchlib.timed(lambda: scorer.score_tokens(tokens, conditions), device)
    return table, len(tokens) * len(conditions) / seconds, scorer


def compare(a, b, floor: float | None = None) -> dict:
    """Split rows `b` against unsplit rows `a`: identical, or how far (and against the rounding floor if given)."""
    diff = {f: float(np.nanmax(np.abs(getattr(a, f) - getattr(b, f)))) for f in ("log_odds", "p_yes_norm")}
    same = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("p_yes", "p_no", "p_yes_norm", "log_odds"))
    out = {"identical": same, "max_abs_diff": diff, "nonfinite": int(b.nonfinite)}
    if floor is not None:
        out["rounding_floor_log_odds"] = floor
        out["verdict"] = ("identical" if same else "within 2x the rounding floor" if diff["log_odds"] <= 2 * floor
                          else "OUTSIDE 2x the rounding floor")  # fmt: skip
    return out


def even_slots(n_layers: int, n: int) -> tuple[int, ...]:
    return tuple(i * n // n_layers for i in range(n_layers))


def mixed_split(device: str, conditions, log) -> dict:
    """Step 2b: a small float32 model, layer ranges alternating cuda:0 / CPU, against itself all on cuda:0."""
    cfg = small_config()
    loaded = build_model(cfg, torch.float32, device, 0.05)
    tokens = random_prompts(8, 160, 180, cfg.vocab_size, seed=1)
    out = {}
    whole = {path: Scorer(loaded, QWEN25_YES_NO, EngineOptions(path=path)).score_tokens(tokens, conditions)
             for path in ("fast", "hook")}
    layers = (0, 0, 1, 1, 0, 0, 1, 1)  # slot 0 = cuda:0, slot 1 = the CPU; the final norm on the CPU too
    for i, slot in enumerate(layers):
        loaded.model.model.layers[i].to("cpu" if slot else device)
    loaded.model.model.norm.to("cpu")
    placement = Placement((torch.device(device), torch.device("cpu")), layers, 0, 1, 0)
    split = dataclasses.replace(loaded, placement=placement)
    for path in ("fast", "hook"):
        scorer = Scorer(split, QWEN25_YES_NO, EngineOptions(path=path))
        table = scorer.score_tokens(tokens, conditions)
        tol = tolerance(cfg.num_hidden_layers, cfg.hidden_size, whole[path].log_odds)
        diff = np.abs(table.log_odds - whole[path].log_odds)
        out[path] = {"max_abs_diff_log_odds": float(diff.max()), "min_tolerance": float(tol.min()),
                     "within_float32_tolerance": bool((diff <= tol).all()), "device_moves": scorer.forward.stats.device_moves}
        log(f"2b. {path} path, layers on cuda:0 / cpu: max |diff| log-odds {diff.max():.3g} (tolerance >= {tol.min():.3g}), "
            f"{scorer.forward.stats.device_moves} moves")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and few short prompts (the CPU test)")
    p.add_argument("--n-prompts", type=int, help="prompts per timed run (default 256; tiny 2)")
    p.add_argument("--out", help="output folder (default $OUT, else benchmarks/results)")
    p.add_argument("--child-load", nargs=3, metavar=("FOLDER", "PATH", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_load:
        print(json.dumps(child_load(*args.child_load)))
        return 0

    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    budget = float(os.environ.get("BUDGET_S", "270"))
    out_dir = Path(args.out or os.environ.get("OUT") or benchlib.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "gpu_multi_device.log").open("w")
    res: dict = {"benchmark": "gpu_multi_device", "machine": benchlib.machine_info(), "device": args.device}

    def log(text: str) -> None:
        line = f"[{time.perf_counter() - t0:6.1f}s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t0
        (out_dir / "gpu_multi_device.json").write_text(json.dumps(res, indent=1, default=float) + "\n")

    def step(name: str, fn) -> None:
        """Run one step; its result or its error goes into the JSON, which is written after each."""
        if time.perf_counter() - t0 > budget:
            res[name] = {"skipped": f"time budget of {budget:.0f} s spent"}
        else:
            try:
                res[name] = fn()
            except Exception as e:  # a failed step is recorded and the next one runs
                res[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"{name} failed: {res[name]['error']}")
        save()

    if cuda:
        res["machine"]["cuda"] = torch.version.cuda
        res["machine"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cfg = tiny_config() if args.tiny else qwen25_3b_config()
    dtype = torch.bfloat16 if cuda else torch.float32
    loaded = build_model(cfg, dtype, args.device, None)
    arch = loaded.arch
    n = args.n_prompts or (2 if args.tiny else 256)
    lo, hi = (12, 13) if args.tiny else (160, 180)
    tokens = random_prompts(n, lo, hi, cfg.vocab_size)
    head_sets, _ = benchlib.study_head_sets(arch.n_layers, arch.n_heads, 1 if args.tiny else 6)
    conditions = list(head_sets)
    res.update({"model": f"Qwen2 {arch.n_layers}x{arch.n_heads} heads, hidden {arch.hidden_size}, random weights, "
                         f"{str(dtype).removeprefix('torch.')}" + (" (tiny)" if args.tiny else " (Qwen2.5-3B shape)"),
                "n_prompts": n, "prompt_tokens": [lo, hi], "n_conditions": len(conditions)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        t = time.perf_counter()
        res["checkpoint_gb"] = write_folder(loaded, folder) / GB
        log(f"built and saved {res['model']} ({res['checkpoint_gb']:.2f} GB) in {time.perf_counter() - t0:.1f}s "
            f"(saving {time.perf_counter() - t:.1f}s)")
        save()

        def loading() -> dict:
            out = run_children(folder, args.device)
            for path, m in out.items():
                log(f"1. load {path}: " + (m.get("error") or ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                                          for k, v in m.items())))
            return out

        step("load", loading)
        unsplit, unsplit_rps, _ = scored(loaded, tokens, conditions, EngineOptions(), args.device)
        other_chunks = Scorer(loaded, QWEN25_YES_NO, EngineOptions(max_rows=32)).score_tokens(tokens, conditions)
        floor = float(np.nanmax(np.abs(other_chunks.log_odds - unsplit.log_odds)))
        res["unsplit"] = {"rows_per_s": unsplit_rps, "rounding_floor_log_odds": floor,
                          "log_odds_range": [float(np.nanmin(unsplit.log_odds)), float(np.nanmax(unsplit.log_odds))]}
        log(f"unsplit: {unsplit_rps:.1f} rows/s; chunks of 32 rows against 64 (the rounding floor): {floor:.3g} in log-odds")
        save()

        def degenerate() -> dict:
            slots = even_slots(arch.n_layers, 4)
            placement = Placement((torch.device(args.device),) * 4, slots, 0, 3, 0)
            split = dataclasses.replace(loaded, placement=placement)
            table, rps, scorer = scored(split, tokens, conditions, EngineOptions(), args.device)
            out = {"slots": 4, "layers_per_slot": [slots.count(s) for s in range(4)], "rows_per_s": rps,
                   "rows_per_s_vs_unsplit": rps / unsplit_rps, "device_moves": scorer.forward.stats.device_moves,
                   **compare(unsplit, table, floor)}  # fmt: skip
            check = self_check(split, QWEN25_YES_NO, tokens[0])
            out["self_check"] = {"max_abs_diff": check.max_abs_diff, "tolerance": check.tolerance, "seconds": check.seconds}
            log(f"2. degenerate split (4 slots on {args.device}): {out['verdict']}, max |diff| {out['max_abs_diff']}, "
                f"{out['device_moves']} moves, {rps:.1f} rows/s ({out['rows_per_s_vs_unsplit']:.3f}x unsplit); self-check "
                f"{check.max_abs_diff:.3g} <= {check.tolerance:.3g}")
            return out

        step("degenerate_split", degenerate)
        if cuda:
            step("mixed_split", lambda: mixed_split(args.device, conditions, log))
        else:
            res["mixed_split"] = {"skipped": "no GPU: cuda:0 / cpu needs one"}

        def fit() -> dict:
            out = {}
            for name, opts in {"default options": EngineOptions(),
                               "full chunks (max_rows 384)": EngineOptions(max_rows=384)}.items():
                est = estimate(loaded.model.config, dtype, opts, hi)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                Scorer(loaded, QWEN25_YES_NO, opts).score_tokens(tokens, conditions)
                entry = {"estimate_gb": est.per_gpu(1) / GB, "estimate_parts_gb": {
                    "parameters": est.param_bytes / GB, "hidden_states": est.hidden_bytes / GB,
                    "chunk": est.chunk_bytes / GB, "mask": est.mask_bytes / GB, "logits": est.logits_bytes / GB}}
                if cuda:
                    entry["measured_peak_gb"] = torch.cuda.max_memory_allocated() / GB
                    entry["measured_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
                    entry["measured_over_estimate"] = entry["measured_peak_gb"] / entry["estimate_gb"]
                out[name] = entry
                log(f"4. fit, {name}: estimate {entry['estimate_gb']:.2f} GB, measured peak "
                    f"{entry.get('measured_peak_gb', float('nan')):.2f} GB")
            return out

        step("fit", fit)
        n_gpus = torch.cuda.device_count() if cuda else 0
        if n_gpus > 1:
            def real_split() -> dict:
                # both loaded by load_model (which casts float buffers as the in-memory model does not)
                whole, whole_rps, _ = scored(load_model(str(folder), "bfloat16", args.device), tokens, conditions,
                                             EngineOptions(), args.device)
                split = load_model(str(folder), "bfloat16", args.device, gpus=n_gpus, max_prompt_tokens=hi)
                for i in range(n_gpus):
                    torch.cuda.reset_peak_memory_stats(i)
                table, rps, scorer = scored(split, tokens, conditions, EngineOptions(), args.device)
                layers = split.placement.layers
                out = {"gpus": n_gpus, "layers_per_gpu": [layers.count(s) for s in range(n_gpus)], "rows_per_s": rps,
                       "rows_per_s_vs_unsplit": rps / whole_rps, "device_moves": scorer.forward.stats.device_moves,
                       "peak_gb_per_gpu": [torch.cuda.max_memory_allocated(i) / GB for i in range(n_gpus)],
                       **compare(whole, table, floor)}  # fmt: skip
                log(f"3. real split over {n_gpus} GPUs: {out['verdict']}, {rps:.1f} rows/s, layers {out['layers_per_gpu']}")
                return out

            step("real_split", real_split)
        else:
            res["real_split"] = {"skipped": f"{n_gpus} GPU(s) visible: the real split needs 2 or more"}
    save()
    log(f"done in {time.perf_counter() - t0:.1f}s; wrote {out_dir / 'gpu_multi_device.json'}")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
