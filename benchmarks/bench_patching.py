"""A per-head activation-patching screen with the engine against the loop a researcher writes, on a CPU.

The screen: every attention head alone, resampled (its slice of the o_proj input replaced, at every
position, by the prompt's partner's), on N counterfactual pairs in both directions (each prompt patched
with its partner's activations: denoising on the incorrect prompt, noising on the correct one).

* loop: what one writes by hand (TransformerLens' `patching` or an nnsight tutorial do the same): cache the
  partner (one forward with o_proj pre-hooks that store their input), then one hooked forward per
  (prompt, head) that writes the partner's slice into that head's o_proj input; the model's own forward,
  batch 1. Timed twice: with the default full-vocab logits at every position, and with
  `logits_to_keep=1` (last position only), the cheapest a hand loop gets.
* engine: `Scorer.activations` (the partners' cache, the same forward code as the scores) and one
  `Scorer.score_tokens` call for every head's resample condition and the baseline: the shared trunk (a
  head in layer l branches off the unablated trunk at l), each resample row computed only at positions from
  the first one where prompt and partner differ (below it the partner's activations are the prompt's own:
  `verif.model.forward.SharedPrefix`), rows of many heads per forward chunk, last-token logits.

Pairs are made here: a correct generated attempt and the same text with its claimed value changed to
another of as many digits, kept when both prompts have the same token length (the pair generator of
`prompts.pairs` does this for sweeps). Reported: rows (prompt x head) per second, the ratio, the largest
|log-odds| difference between the loop and the engine, and where the engine's time goes (cache, scoring;
row-layers and row-positions against the loop's).

    python benchmarks/bench_patching.py                  # SmolLM2, 1 pair (2 prompts x 270 heads)
    python benchmarks/bench_patching.py --pairs 2 --layers 4   # faster: heads of the first 4 layers only
    python benchmarks/bench_patching.py --layers 1 --heads 4   # a smoke run
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
import torch

import benchlib
from verif.design.conditions import Ablation
from verif.model.engine import Scorer
from verif.model.families import o_projs
from verif.model.interventions import Sites, Sources
from verif.model.loading import LoadedModel, load_model
from verif.model.score import YesNoIds, resolve_yes_no, yes_no_log_probs
from verif.task.countdown import generate_problems, make_attempts
from verif.task.prompts import render_prompt


def make_pairs(tokenizer, n_pairs: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """`n_pairs` (correct, corrupted) token lists of equal length: the claimed value changed, digits kept."""
    out = []
    for a in make_attempts(generate_problems(20 * n_pairs + 20, seed), seed, p_correct=1.0):
        claimed = str(a.problem.target)
        wrong = str(int(claimed) + 1)
        if len(wrong) != len(claimed) or not a.text.endswith(claimed):
            continue
        bad = re.sub(rf"{claimed}$", wrong, a.text)
        toks = [tokenizer.encode(render_prompt(a.problem.numbers, a.problem.target, t), add_special_tokens=False)
                for t in (a.text, bad)]
        if len(toks[0]) == len(toks[1]):
            out.append((toks[0], toks[1]))
        if len(out) == n_pairs:
            return out
    raise SystemExit(f"found only {len(out)} equal-length pairs")


@torch.inference_mode()
def loop_screen(loaded: LoadedModel, ids: YesNoIds, prompts, partners, heads, full_logits: bool) -> np.ndarray:
    """`[n_prompts, n_heads]` log-odds: cache each partner's o_proj inputs, then one hooked forward per head."""
    model, d = loaded.model, loaded.arch.head_dim
    projs = o_projs(model)
    out = np.zeros((len(prompts), len(heads)))
    keep = {} if full_logits else {"logits_to_keep": 1}
    for i, (toks, partner) in enumerate(zip(prompts, partners)):
        cache, handles = {}, []
        for layer, proj in enumerate(projs):
            handles.append(proj.register_forward_pre_hook(
                lambda m, a, layer=layer: cache.__setitem__(layer, a[0].detach().clone())))
        model(input_ids=torch.tensor([partner]), use_cache=False, **keep)
        for h in handles:
            h.remove()
        ids_t = torch.tensor([toks])
        for j, (layer, head) in enumerate(heads):
            cols = slice(head * d, (head + 1) * d)

            def patch(m, a, cols=cols, layer=layer):
                x = a[0].clone()
                x[..., cols] = cache[layer][..., cols]
                return (x,)

            handle = projs[layer].register_forward_pre_hook(patch)
            logits = model(input_ids=ids_t, use_cache=False, **keep).logits[:, -1]
            handle.remove()
            y, n = yes_no_log_probs(logits, ids)
            out[i, j] = float(y[0] - n[0])
    return out


# torch operators by what they do, for the engine's profile.
GROUPS = {
    "matmul (projections, LM head)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"),
    "attention (SDPA)": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::_flash"),
    "patching edits (select, where, copy into)": ("aten::index_select", "aten::where", "aten::index_copy"),
}


def profile(fn) -> dict[str, float]:
    """Share of self CPU time per operator group in one call of `fn`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    shares = dict.fromkeys([*GROUPS, "other (norms, rotary, activation, copies)"], 0.0)
    for e in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if e.key.startswith(names)), "other (norms, rotary, activation, copies)")
        shares[group] += e.self_cpu_time_total / total
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1, help="counterfactual pairs (prompts = 2 x this)")
    p.add_argument("--layers", type=int, default=0, help="screen the heads of the first N layers only (0: all)")
    p.add_argument("--heads", type=int, default=0, help="screen the first N heads of each such layer only (0: all)")
    p.add_argument("--model", default="packaged:smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--profile", action="store_true", help="also profile one engine call: where its time goes")
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/patching.json)")
    args = p.parse_args(argv)
    benchlib.set_threads(args.threads)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    ids = resolve_yes_no(loaded.tokenizer)
    arch = loaded.arch
    pairs = make_pairs(loaded.tokenizer, args.pairs)
    prompts = [t for pair in pairs for t in pair]
    partners = [t for a, b in pairs for t in (b, a)]
    n_layers = args.layers or arch.n_layers
    heads = [(layer, h) for layer in range(n_layers) for h in range(args.heads or arch.n_heads)]
    conditions = [Ablation()] + [Ablation(((layer, h),), (), "resample") for layer, h in heads]
    scorer = Scorer(loaded, ids)
    sites = Sites.of(conditions)
    rows = len(prompts) * len(heads)

    def engine(i: int):
        t0 = time.perf_counter()
        cache = scorer.activations([partners[i]], sites)
        t1 = time.perf_counter()
        table = scorer.score_tokens([prompts[i]], conditions, Sources(cache=cache))
        return table, t1 - t0, time.perf_counter() - t1

    variants = {
        "engine": engine,
        "loop_full_logits": lambda i: loop_screen(loaded, ids, prompts[i:i + 1], partners[i:i + 1], heads, True),
        "loop_last_logits": lambda i: loop_screen(loaded, ids, prompts[i:i + 1], partners[i:i + 1], heads, False),
    }
    # Warm up on the real shapes (allocator, first calls), then time prompt by prompt with the variants
    # interleaved in rotating order, so a slow spell of a shared machine is spread over all of them.
    engine(0)
    loop_screen(loaded, ids, prompts[:1], partners[:1], heads[:2], True)
    seconds = dict.fromkeys(variants, 0.0)
    seconds |= {"engine_cache": 0.0, "engine_score": 0.0}
    outputs: dict[str, list] = {name: [] for name in variants}
    names = list(variants)
    for i in range(len(prompts)):
        for name in names[i % 3:] + names[:i % 3]:
            t, got = benchlib.timed(lambda: variants[name](i))
            seconds[name] += t
            outputs[name].append(got)
            if name == "engine":
                seconds["engine_cache"] += got[1]
                seconds["engine_score"] += got[2]
    tables = [t for t, _, _ in outputs["engine"]]
    got = np.concatenate([t.log_odds[:, 1:] for t in tables])
    base = np.concatenate([t.log_odds[:, :1] for t in tables])
    loop_full, loop_last = (np.concatenate(outputs[n]) for n in ("loop_full_logits", "loop_last_logits"))
    diff = float(max(np.abs(got - loop_full).max(), np.abs(got - loop_last).max()))
    row_layers = sum(t.row_layers for t in tables)
    row_layers_loop = rows * arch.n_layers
    row_positions = sum(t.row_positions for t in tables)
    row_positions_loop = sum(len(t) for t in prompts) * len(heads) * arch.n_layers
    first_difference = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(prompts, partners)]
    t_engine, t_full, t_last = (seconds[n] for n in names)
    t_cache, t_score = seconds["engine_cache"], seconds["engine_score"]
    result = {
        "model": loaded.name, "pairs": len(pairs), "prompts": len(prompts), "prompt_tokens": [len(t) for t in prompts],
        "heads": len(heads), "rows": rows, "machine": benchlib.machine_info(), "seconds": seconds,
        "rows_per_s": {n: rows / seconds[n] for n in names},
        "speedup": {"vs_loop_full_logits": t_full / t_engine, "vs_loop_last_logits": t_last / t_engine},
        "first_difference": first_difference,
        "row_layers": {"engine": row_layers, "loop": row_layers_loop, "engine_over_loop": row_layers / row_layers_loop},
        "row_positions": {"engine": row_positions, "loop": row_positions_loop,
                          "engine_over_loop": row_positions / row_positions_loop},
        "max_abs_log_odds_diff": diff,
        "patching_effect_range": [float((got - base).min()), float((got - base).max())],
    }
    if args.profile:
        result["engine_profile"] = profile(lambda: engine(0))
    benchlib.print_table(
        f"{loaded.name}: every head alone, resample, {len(pairs)} pair(s) both ways ({rows} rows, "
        f"{min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens, {torch.get_num_threads()} thread(s))",
        ["variant", "seconds", "rows/s", "engine speed-up"],
        [["loop, full logits", t_full, rows / t_full, t_full / t_engine],
         ["loop, last-position logits", t_last, rows / t_last, t_last / t_engine],
         ["engine (cache + score)", t_engine, rows / t_engine, 1.0]],
    )
    print(f"engine: partners' cache {t_cache:.2f} s, scoring {t_score:.2f} s; row-layers {row_layers} vs the "
          f"loop's {row_layers_loop} ({row_layers / row_layers_loop:.3f}x); row-positions {row_positions} vs "
          f"{row_positions_loop} ({row_positions / row_positions_loop:.3f}x; first difference at {first_difference}); "
          f"max |log-odds| loop - engine {diff:.2e}")
    if args.profile:
        print("engine, one prompt, CPU time by operator group (torch.profiler): " + ", ".join(
            f"{k} {v:.0%}" for k, v in result["engine_profile"].items()))
    benchlib.write_json(result, args.out, "patching")
    return 0


if __name__ == "__main__":
    sys.exit(main())
