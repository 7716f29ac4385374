"""What sharing the un-ablated trunk saves on a single-head sweep (baseline + every head alone).

A condition that ablates only head h of layer l computes layers 0..l-1 exactly as the baseline does;
the engine runs those once per prompt and branches each condition off at its layer. On the
seed-shaped model (36 layers x 16 heads = 576 single-head conditions) this compares, in one run:

* the row-layer count (one row through one decoder layer) of the shared path against evaluating
  every (prompt, condition) pair independently (`share_trunk=False`): must be <= 0.6;
* the wall time of both, measured interleaved;
* the largest difference between their results (must be ~0 in float32: < 1e-5).

    python benchmarks/bench_shared_prefix.py                     # default: 2 prompts, 64 tokens
    python benchmarks/bench_shared_prefix.py --n-prompts 4 --max-tokens 0 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

import benchlib
from verif.design.conditions import build_conditions
from verif.model.engine import EngineOptions, Scorer
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no
from tests.support.models import build_seed_shaped_model

ROW_LAYER_RATIO_MAX = 0.6
RESULT_DIFF_MAX = 1e-5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64, help="keep each prompt's last N tokens (0: whole prompt)")
    p.add_argument("--head-dim", type=int, default=8, help="width of the seed-shaped model's heads")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="timing rounds (best of)")
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/shared_prefix.json)")
    args = p.parse_args(argv)
    benchlib.set_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(build_seed_shaped_model(tmp, head_dim=args.head_dim)), dtype="float32", device="cpu")
    arch = loaded.arch
    ids = resolve_yes_no(loaded.tokenizer)
    tokens = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in benchlib.study_prompts(args.n_prompts)]
    if args.max_tokens:
        tokens = [t[-args.max_tokens:] for t in tokens]  # the tail keeps "...the final answer is"
    conditions = build_conditions(arch.n_layers, arch.n_heads, (), 0, 0, sweeps=("single_head",))
    head_sets = [c.heads for c in conditions]
    n, c = len(tokens), len(head_sets)

    shared = Scorer(loaded, ids, EngineOptions(max_rows=args.max_rows, share_trunk=True))
    independent = Scorer(loaded, ids, EngineOptions(max_rows=args.max_rows, share_trunk=False))
    for scorer in (shared, independent):  # first calls pay one-off costs (thread pools, allocator)
        scorer.score_tokens([t[-8:] for t in tokens[:1]], head_sets[:40])
    tables = {}
    start = time.perf_counter()
    wall = benchlib.best_of_rounds(
        {
            "shared": lambda: tables.__setitem__("shared", shared.score_tokens(tokens, head_sets)),
            "independent": lambda: tables.__setitem__("independent", independent.score_tokens(tokens, head_sets)),
        },
        args.rounds,
    )
    s, i = tables["shared"], tables["independent"]
    first = [min((layer for layer, _ in hs), default=arch.n_layers) for hs in head_sets]
    expected_shared = n * (arch.n_layers + sum(arch.n_layers - f for f in first))
    row_ratio = s.row_layers / i.row_layers
    diff_norm = float(np.abs(s.p_yes_norm - i.p_yes_norm).max())
    diff_log_odds = float(np.abs(s.log_odds - i.log_odds).max())
    result = {
        "benchmark": "shared_prefix",
        "machine": benchlib.machine_info(),
        "model": f"seed-shaped Qwen2 {arch.n_layers}x{arch.n_heads} heads, head_dim {arch.head_dim}, float32, CPU",
        "n_prompts": n,
        "prompt_tokens": [len(t) for t in tokens],
        "n_conditions": c,
        "rows_scored": n * c,
        "row_layers": {"shared": s.row_layers, "independent": i.row_layers, "shared_expected": expected_shared},
        "row_layer_ratio": row_ratio,
        "wall_s": wall,
        "wall_ratio": wall["shared"] / wall["independent"],
        "rows_per_s": {k: n * c / v for k, v in wall.items()},
        "max_abs_diff": {"p_yes_norm": diff_norm, "log_odds": diff_log_odds},
        "checks": {
            f"row_layer_ratio<={ROW_LAYER_RATIO_MAX}": row_ratio <= ROW_LAYER_RATIO_MAX,
            f"p_yes_norm_diff<{RESULT_DIFF_MAX}": diff_norm < RESULT_DIFF_MAX,
            "row_layers_as_expected": s.row_layers == expected_shared and i.row_layers == n * c * arch.n_layers,
        },
        "elapsed_s": time.perf_counter() - start,
    }
    benchlib.print_table(
        f"single_head sweep: {n} prompts x {c} conditions ({n * c} rows), seed-shaped {arch.n_layers}x{arch.n_heads}",
        ["path", "row-layers", "wall s", "rows/s"],
        [[k, result["row_layers"][k], wall[k], result["rows_per_s"][k]] for k in ("shared", "independent")],
    )
    print(f"row-layer ratio shared/independent: {row_ratio:.3f} (must be <= {ROW_LAYER_RATIO_MAX})")
    print(f"wall-time ratio shared/independent: {result['wall_ratio']:.3f}")
    print(f"max |diff| p_yes_norm {diff_norm:.2e}, log_odds {diff_log_odds:.2e} (must be < {RESULT_DIFF_MAX:g})")
    benchlib.write_json(result, args.out, "shared_prefix")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
