"""What the cross-model statistics add to a sweep's end at the study's scale (issue 21).

Synthetic results of two models (random normalised P(Yes) per row, log-odds consistent with it, half
the prompts correct) under the study config's conditions (baseline, the target, `--random` random sets)
and, with `--single-head`, one condition per head of a 36 x 16 model; times `cross_model_table` (every
shared condition: the paired bootstrap of four metrics, AUROCs recomputed per resample, Pearson and
Spearman per resample) and `effect_maps_table` (the per-head maps), each the best of `--rounds`. The
numbers do not depend on the values, only on prompts x conditions x resamples.

    python benchmarks/bench_cross_model.py                                  # the study: 1024 prompts, 102 conditions
    python benchmarks/bench_cross_model.py --single-head                    # and the 576 single-head conditions
    python benchmarks/bench_cross_model.py --prompts 32 --random 4 --n-boot 100 --out /tmp   # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

import benchlib
from verif.analysis.cross_model import cross_model_table, effect_maps_table

N_LAYERS, N_HEADS = 36, 16


def frames(n_prompts: int, n_random: int, single_head: bool, seed: int = 0):
    """(results, prompts, conditions) of two models, a and b."""
    names = ["baseline", "target"] + [f"random-{i:03d}" for i in range(n_random)]
    kinds = ["baseline", "target"] + ["random"] * n_random
    layer, head = [None] * len(names), [None] * len(names)
    if single_head:
        cells = [(lay, h) for lay in range(N_LAYERS) for h in range(N_HEADS)]
        names += [f"head-L{lay:02d}H{h:02d}" for lay, h in cells]
        kinds += ["single_head"] * len(cells)
        layer += [lay for lay, _ in cells]
        head += [h for _, h in cells]
    conditions = pl.DataFrame({"condition": names, "kind": kinds, "n_heads": [29] * len(names),
                               "layer": pl.Series(layer, dtype=pl.Int64), "head": pl.Series(head, dtype=pl.Int64)})
    prompts = pl.DataFrame({"prompt_id": np.arange(n_prompts), "label": np.arange(n_prompts) % 2 == 0})
    rng = np.random.default_rng(seed)
    parts = []
    for model in ("a", "b"):
        p = rng.uniform(0.01, 0.99, (len(names), n_prompts))
        parts.append(pl.DataFrame({"model": model, "prompt_id": np.tile(np.arange(n_prompts), len(names)),
                                   "condition": np.repeat(names, n_prompts), "p_yes_norm": p.ravel(),
                                   "log_odds": np.log(p / (1 - p)).ravel()}))
    return pl.concat(parts), prompts, conditions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--random", type=int, default=100, help="random sets (the study config: 100)")
    ap.add_argument("--single-head", action="store_true", help="add one condition per head of 36 x 16")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", help="JSON file or folder (default benchmarks/results/cross_model.json)")
    args = ap.parse_args()
    results, prompts, conditions = frames(args.prompts, args.random, args.single_head)
    n_conditions = conditions.height - 1
    best = {"cross_model_table": float("inf"), "effect_maps_table": float("inf")}
    for _ in range(args.rounds):
        start = time.perf_counter()
        table = cross_model_table(results, prompts, conditions, ["a", "b"], n_boot=args.n_boot)
        best["cross_model_table"] = min(best["cross_model_table"], time.perf_counter() - start)
        start = time.perf_counter()
        maps = effect_maps_table(results, prompts, conditions, ["a", "b"], n_boot=args.n_boot)
        best["effect_maps_table"] = min(best["effect_maps_table"], time.perf_counter() - start)
    rows = [["cross_model_table", n_conditions, table.height, best["cross_model_table"],
             best["cross_model_table"] / n_conditions]]
    if maps.height:
        rows.append(["effect_maps_table", N_LAYERS * N_HEADS, maps.height, best["effect_maps_table"], None])
    benchlib.print_table(f"one model pair, {args.prompts} prompts, {args.n_boot} resamples",
                         ["step", "conditions", "rows", "seconds", "s per condition"],
                         [[v if v is not None else "-" for v in r] for r in rows])
    benchlib.write_json({"prompts": args.prompts, "random_sets": args.random, "single_head": args.single_head,
                         "n_boot": args.n_boot, "conditions": n_conditions, "seconds": best,
                         "seconds_per_condition": best["cross_model_table"] / n_conditions,
                         "machine": benchlib.machine_info()}, args.out, "cross_model")


if __name__ == "__main__":
    main()
