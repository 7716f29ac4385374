"""Shared trunk on a GPU: a single-head sweep (baseline + every head alone) at Qwen2.5-3B's shape.

Each single-head condition computes the baseline's layers below its head's layer; the engine runs
those once per prompt. This measures, in one run on random bf16 weights of the 3B architecture and
real Qwen2.5-tokenised verification prompts: wall time and row-layer work with `share_trunk` on and
off (both warmed up on every timed shape first, then timed in interleaved rounds, best of each), and the largest difference of their results.
Needs only torch, transformers and `verif` (runs on the GPU machine with PYTHONPATH=.:benchmarks).

    PYTHONPATH=.:benchmarks python benchmarks/gpu_single_head.py            # GPU
    python benchmarks/gpu_single_head.py --device cpu --tiny                # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import benchlib
from gpu_throughput import DATA, build_model, qwen25_3b_config
from verif.design.conditions import build_conditions
from verif.model.engine import EngineOptions, Scorer
from verif.model.score import YesNoIds
from tests.support.models import seed_shaped_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="seed-shaped tiny-width model, short prompts (CPU)")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (best of)")
    p.add_argument("--out", help="output folder (default $OUT, else benchmarks/results)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    data = json.loads(DATA.read_text())
    ids = YesNoIds(tuple(data["yes_ids"]), tuple(data["no_ids"]))
    tokens = [t[-32:] if args.tiny else t for t in data["tokens"][: args.n_prompts]]
    cfg = seed_shaped_config() if args.tiny else qwen25_3b_config()
    dtype = torch.bfloat16 if cuda and not args.tiny else torch.float32
    loaded = build_model(cfg, dtype, args.device, 0.2 if args.tiny else None)
    arch = loaded.arch
    conds = build_conditions(arch.n_layers, arch.n_heads, (), 0, 0, sweeps=["single_head"])
    head_sets = [c.heads for c in conds]
    res = {"benchmark": "gpu_single_head", "machine": benchlib.machine_info(), "device": args.device,
           "n_prompts": len(tokens), "n_conditions": len(head_sets), "tokens_mean": float(np.mean([len(t) for t in tokens]))}
    scorers = {share: Scorer(loaded, ids, EngineOptions(max_rows=128, share_trunk=share, pad_id=151643))
               for share in (True, False)}
    for scorer in scorers.values():  # warm-up on every shape of the timed run: no allocation is timed
        scorer.score_tokens(tokens, head_sets)
    tables, best = {}, {True: float("inf"), False: float("inf")}
    for _ in range(args.rounds):  # interleaved rounds, best of each
        for share, scorer in scorers.items():
            seconds, tables[share] = benchlib.timed(lambda s=scorer: s.score_tokens(tokens, head_sets), args.device)
            best[share] = min(best[share], seconds)
    for share, seconds in best.items():
        res[f"share_trunk={share}"] = {"seconds": seconds, "rows_per_s": len(tokens) * len(head_sets) / seconds,
                                       "row_layers": tables[share].row_layers}
    on, off = res["share_trunk=True"], res["share_trunk=False"]
    res["row_layer_ratio"] = on["row_layers"] / off["row_layers"]
    res["wall_time_ratio"] = on["seconds"] / off["seconds"]
    res["max_abs_diff_p_yes_norm"] = float(np.abs(tables[True].p_yes_norm - tables[False].p_yes_norm).max())
    res["dtype"] = str(dtype).replace("torch.", "")
    out = Path(args.out or os.environ.get("OUT") or benchlib.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_single_head.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
