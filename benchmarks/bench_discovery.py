"""Attribution patching against the exact single-head sweep, on a CPU, with real weights.

On the packaged SmolLM2-135M (30 layers x 9 heads, MLP width 1536) and the default prompts
(generated Countdown attempts rendered with the study's template, `benchlib.study_prompts`), over
the prompts the discovery objective averages (`--which`, default `correct` as `discover.prompts`):

* AtP screen: one forward and one backward per batch (`atp_sums`), which scores all 270 heads and
  all 30 x 1536 neurons at once;
* exact screen: the 271-condition single-head sweep (baseline + every head alone) through the
  sweep's engine (`delta_sums` over `verif.model.engine.Scorer`, shared trunk);

and reports the wall-time ratio exact / AtP, the Spearman and Pearson correlations between `atp`
and `exact` over all heads, how many of the exact top heads AtP puts in its own top, and the cost
of the two cheap head/neuron heuristics (attention to the target, value-vector logits) for
reference. The AtP pass is timed best of `--rounds` (it is short, so one slow spell of a shared
machine would dominate it); the exact sweep once (it is long, spells average out).

On one CPU thread the exact sweep costs about 1-3 minutes per prompt (271 conditions x ~220 tokens,
half the layers each on average thanks to the shared trunk), so 64 prompts take hours: use
`--n-prompts` to fit the time you have (the ratio does not depend on it; the correlation does).
M from the two paths must agree (same prompts, float32 forwards): a check that they measure the
same objective.

    python benchmarks/bench_discovery.py                       # 64 generated attempts: hours on one thread
    python benchmarks/bench_discovery.py --n-prompts 6         # its 3 correct attempts: ~10 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import benchlib
from verif.analysis.discovery.atp import atp_sums
from verif.analysis.discovery.attention import attn_to_target_sums, encode_with_target_positions
from verif.analysis.discovery.exact import delta_sums, heads_to_screen, single_head_sets
from verif.analysis.discovery.metric import PROMPT_CHOICES, choose_prompts
from verif.analysis.discovery.neurons import logit_yes_no
from verif.analysis.discovery.ranking import pearson, ranked, spearman
from verif.model.engine import EngineOptions, Scorer
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no
from verif.task.countdown import generate_problems, make_attempts
from verif.task.prompts import render_prompt


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """How many of b's top k components (by |score|) are in a's top k."""
    return len(set(ranked(a, "atp")[:k]) & set(ranked(b, "exact")[:k]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-prompts", type=int, default=64, help="generated attempts (half correct)")
    p.add_argument("--which", default="correct", choices=PROMPT_CHOICES, help="prompts M averages (discover.prompts)")
    p.add_argument("--batch", type=int, default=8, help="prompts per AtP forward/backward")
    p.add_argument("--rounds", type=int, default=2, help="AtP timing rounds (best of)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/discovery_cpu.json)")
    args = p.parse_args(argv)
    benchlib.set_threads(args.threads)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    load_s, loaded = benchlib.timed(lambda: load_model("packaged:smollm2-135m", dtype="float32", device="cpu"))
    arch, tok = loaded.arch, loaded.tokenizer
    ids = resolve_yes_no(tok)
    attempts = make_attempts(generate_problems(args.n_prompts, args.seed), args.seed)
    prompts = [render_prompt(a.problem.numbers, a.problem.target, a.text) for a in attempts]
    tokens, target_positions = encode_with_target_positions(tok, prompts, [a.problem.target for a in attempts])
    chosen = choose_prompts([a.label for a in attempts], args.which)
    chosen_tokens = [tokens[i] for i in chosen]
    scorer = Scorer(loaded, ids, EngineOptions())
    pad = scorer.pad_id
    print(f"loaded in {load_s:.0f}s; {len(chosen)} of {len(prompts)} prompts ({args.which})", flush=True)

    # First calls pay one-off costs (allocator, weight fusing); warm both paths on a short input.
    warm = [chosen_tokens[0][-16:]]
    atp_sums(loaded.model, arch, warm, ids, pad)
    delta_sums(scorer, warm, single_head_sets([(0, 0)]))

    atp_runs = [benchlib.timed(lambda: atp_sums(loaded.model, arch, chosen_tokens, ids, pad, args.batch))
                for _ in range(max(1, args.rounds))]
    atp_s, atp = min(atp_runs, key=lambda r: r[0])
    print(f"AtP screen (all heads and neurons): {atp_s:.1f}s", flush=True)
    heads = heads_to_screen(atp.mean("atp_heads"), "all")
    exact_s, exact = benchlib.timed(lambda: delta_sums(scorer, chosen_tokens, single_head_sets(heads)))
    print(f"exact single-head sweep ({len(heads) + 1} conditions): {exact_s:.1f}s", flush=True)
    attn_s, _ = benchlib.timed(lambda: attn_to_target_sums(loaded.model, arch, chosen_tokens, [target_positions[i] for i in chosen], args.batch))
    logit_s, _ = benchlib.timed(lambda: logit_yes_no(loaded.model, ids))

    a_map, e_map = atp.mean("atp_heads"), exact.mean("delta").reshape(arch.n_layers, arch.n_heads)
    lengths = [len(t) for t in chosen_tokens]
    result = {
        "benchmark": "discovery_cpu",
        "machine": benchlib.machine_info(),
        "model": f"SmolLM2-135M: {arch.family} {arch.n_layers}x{arch.n_heads} heads, MLP width {arch.intermediate_size}, float32",
        "load_s": load_s,
        "prompts": f"{args.n_prompts} generated attempts (seed {args.seed}), M over the {args.which} ones",
        "n_prompts_scored": len(chosen),
        "tokens_mean": float(np.mean(lengths)),
        "tokens_min_max": [min(lengths), max(lengths)],
        "atp_batch": args.batch,
        "n_heads": len(heads),
        "n_neurons": arch.n_layers * arch.intermediate_size,
        "exact_conditions": len(heads) + 1,
        "atp_rounds": len(atp_runs),
        "wall_s": {"atp_heads_and_neurons": atp_s, "exact_single_head_sweep": exact_s, "attn_to_target": attn_s,
                   "logit_yes_no": logit_s},
        "exact_over_atp_time": exact_s / atp_s,
        "atp_over_exact_time": atp_s / exact_s,
        "spearman_atp_exact_heads": spearman(a_map, e_map),
        "pearson_atp_exact_heads": pearson(a_map, e_map),
        "top10_overlap": top_overlap(a_map, e_map, 10),
        "top29_overlap": top_overlap(a_map, e_map, 29),
        "sign_agreement": float(np.mean(np.sign(a_map) == np.sign(e_map))),
        "max_abs_exact": float(np.abs(e_map).max()),
        "objective_atp_path": float(atp.mean("log_odds")),
        "objective_engine": float(exact.mean("log_odds")),
    }
    result["elapsed_s"] = time.perf_counter() - t0
    # A shared machine slows both passes; the 1/5/15-minute load averages say how busy it was.
    result["load_avg_start_end"] = [list(load_start), list(os.getloadavg())]
    benchlib.print_table(
        f"{result['model']}: {len(chosen)} prompts ({result['tokens_mean']:.0f} tokens), M over {args.which}",
        ["pass", "wall s"], [[k, v] for k, v in result["wall_s"].items()],
    )
    print(f"exact / AtP time: {result['exact_over_atp_time']:.1f}x; Spearman {result['spearman_atp_exact_heads']:.3f}, "
          f"Pearson {result['pearson_atp_exact_heads']:.3f}; top-10 overlap {result['top10_overlap']}/10, "
          f"top-29 {result['top29_overlap']}/29; M {result['objective_atp_path']:.6f} (AtP path) vs "
          f"{result['objective_engine']:.6f} (engine)")
    benchlib.write_json(result, args.out, "discovery_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
