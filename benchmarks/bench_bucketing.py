"""Length bucketing and the engine's memory bound (issue 14): the unit plans before and after, and their cost.

Inputs, from study prompts (`benchlib.study_prompts`: 190-246 Qwen2.5 tokens; the issue's ~170 were
SmolLM2 tokens) and prompts whose attempt is a long sum:

* `long_among_short`: the issue's case, one ~5,164-token prompt among three study prompts, 6 conditions;
* `shard_200_300`: a shard of 8 study prompts and 8 ~300-token prompts, 12 conditions (the issue's
  shard of 170- and 300-token prompts);
* `huge_among_short`: one ~80,000-token prompt among three study prompts (planned only, never run);
* `gpu_benchmark`: the 512 prompts x 8 conditions `gpu_throughput.py` times (172-299 tokens), planned
  with `max_rows: auto` as on a GPU with ample memory (before: `AUTO_TOKENS_PER_CALL` // the longest
  prompt of the call for every unit; after: // each unit's own length): bucketing must not cost the
  GPU its full chunks (planned only).

For each, from the unit plans alone (exact, no timing): the padding fraction (padded token-rows over
all token-rows, a row being a prompt's trunk or one condition's branch), the token-rows, the largest
forward chunk in tokens (rows x padded length), the mean rows of a forward chunk (a unit's rows in
near-equal chunks, as the engine cuts them) and the bytes of the padded attention masks of the
largest padded unit (its `[prompts, 1, T, T]` mask and one chunk's). Then the wall time of `Scorer.score_tokens` on the seed-shaped model (36 x 16 heads at
tiny width, random weights, float32, one thread) with each plan. "before" is the planner up to commit
9e332c1 (kept below as `plan_before`): prompts sorted by length, one unit while it is smaller than one
forward chunk whatever the lengths, `max_rows` rows per chunk whatever the length. Timing uses
`--layers` of the 36 layers (default 4: the long prompt's attention dominates and the "before" plan of
the issue's case took over 500 s with all 36); the ratios do not depend on the depth.

    python benchmarks/bench_bucketing.py                  # ~2 min on 2 cores
    python benchmarks/bench_bucketing.py --layers 36      # the full seed shape (~15 min)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import benchlib
from tests.support.models import build_seed_shaped_model
from tests.support.tokenizer import qwen25_tokenizer
from verif.design.heads import random_head_sets
from verif.model import engine
from verif.model.engine import AUTO_TOKENS_PER_CALL, EngineOptions, Scorer, Unit, chunk_rows, plan_units
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no
from verif.task.prompts import render_prompt


GPU_DATA = Path(__file__).resolve().parent / "data" / "qwen25_prompts.json"


def plan_before(lengths: Sequence[int], n_conditions: int, opts: EngineOptions, rows_for=None) -> list[Unit]:
    """The planner before issue 14: a unit changes length only once it fills a forward chunk, however
    different the lengths; every chunk has `max_rows` rows, however long the prompts."""
    max_rows = int(opts.max_rows)
    cond_per_unit = max(1, min(n_conditions, opts.max_unit_rows - 1))
    cond_groups = [list(range(a, min(a + cond_per_unit, n_conditions))) for a in range(0, n_conditions, cond_per_unit)]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    units: list[Unit] = []
    for conds in cond_groups:
        rows_per_prompt = len(conds) + 1
        current: list[int] = []
        for i in order:
            full = (len(current) + 1) * rows_per_prompt > opts.max_unit_rows
            new_length = current and lengths[i] != lengths[current[-1]]
            if current and (full or (new_length and len(current) * rows_per_prompt >= max_rows)):
                units.append(Unit(current, conds, max_rows))
                current = []
            current.append(i)
        if current:
            units.append(Unit(current, conds, max_rows))
    return units


def plan_stats(units: list[Unit], lengths: Sequence[int]) -> dict:
    """Padding and memory of a plan, counted from its units (a row: a prompt's trunk or one condition)."""
    token_rows = padded = largest_chunk = mask_bytes = n_rows = n_chunks = 0
    for u in units:
        rows_per_prompt = len(u.conditions) + 1
        longest = max(lengths[i] for i in u.prompts)
        token_rows += rows_per_prompt * len(u.prompts) * longest
        padded += rows_per_prompt * sum(longest - lengths[i] for i in u.prompts)
        rows = rows_per_prompt * len(u.prompts)
        chunks = math.ceil(rows / u.chunk_rows)
        n_rows, n_chunks = n_rows + rows, n_chunks + chunks
        largest_chunk = max(largest_chunk, math.ceil(rows / chunks) * longest)
        if len({lengths[i] for i in u.prompts}) > 1:  # a padded unit: [prompts, 1, T, T] mask, and one per chunk
            mask_bytes = max(mask_bytes, (len(u.prompts) + math.ceil(rows / chunks)) * longest**2)
    return {"units": len(units), "token_rows": token_rows, "padding_fraction": padded / token_rows,
            "largest_chunk_tokens": largest_chunk, "mean_chunk_rows": n_rows / n_chunks,
            "padded_mask_bytes": mask_bytes}


def _attempt(n_terms: int) -> str:
    return " + ".join(["1"] * n_terms) + f" = {n_terms}"


def inputs(tok) -> dict[str, tuple[list[list[int]], int]]:
    """Token ids of each case's prompts and its number of conditions."""
    study = [tok.encode(p, add_special_tokens=False) for p in benchlib.study_prompts(8)]

    def long(n_terms: int) -> list[int]:
        return tok.encode(render_prompt([1, 2], n_terms, _attempt(n_terms)), add_special_tokens=False)

    return {
        "long_among_short": ([study[0], study[1], long(835), study[2]], 6),
        "shard_200_300": (study + [long(25 + i % 4) for i in range(8)], 12),
        "huge_among_short": ([study[0], study[1], long(13_333), study[2]], 6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the seed-shaped model timed (36: all)")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds, best kept")
    ap.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    ap.add_argument("--out", help="JSON file or folder (default benchmarks/results/bucketing.json)")
    args = ap.parse_args()
    benchlib.set_threads(args.threads)
    opts = EngineOptions()
    cases = inputs(qwen25_tokenizer())
    gpu_lengths = [len(t) for t in json.loads(GPU_DATA.read_text())["tokens"][:512]]
    result: dict = {"benchmark": "bucketing", "machine": benchlib.machine_info(), "layers_timed": args.layers,
                    "engine": {"max_rows": opts.max_rows, "max_chunk_tokens": opts.max_chunk_tokens,
                               "max_unit_tokens": opts.max_unit_tokens, "bucket_ratio": opts.bucket_ratio},
                    "cases": {}}
    rows = []
    for name, (toks, n_cond) in cases.items():
        lengths = [len(t) for t in toks]
        entry = {"lengths": lengths, "conditions": n_cond, "before": plan_stats(plan_before(lengths, n_cond, opts), lengths)}
        try:
            entry["after"] = plan_stats(plan_units(lengths, n_cond, opts), lengths)
        except ValueError as e:  # over the engine's budgets: refused before anything is allocated
            entry["after"] = {"refused": str(e)}
        result["cases"][name] = entry
    auto = EngineOptions(max_rows=AUTO_TOKENS_PER_CALL // max(gpu_lengths))  # before: one row count per call
    result["cases"]["gpu_benchmark"] = {
        "lengths": [min(gpu_lengths), max(gpu_lengths)], "conditions": 8,
        "before": plan_stats(plan_before(gpu_lengths, 8, auto), gpu_lengths),
        "after": plan_stats(plan_units(gpu_lengths, 8, opts, lambda t: chunk_rows(AUTO_TOKENS_PER_CALL // t, t, opts)),
                            gpu_lengths)}
    for name, entry in result["cases"].items():
        for when in ("before", "after"):
            s = entry[when]
            if "refused" in s:
                rows.append([name, when, "-", "-", "refused", "-", "-", "-"])
                continue
            rows.append([name, when, s["units"], s["token_rows"], f"{s['padding_fraction']:.1%}",
                         s["largest_chunk_tokens"], round(s["mean_chunk_rows"], 1), f"{s['padded_mask_bytes'] / 2**20:.1f}"])
    benchlib.print_table("unit plans (exact, from the planner)",
                         ["case", "plan", "units", "token-rows", "padding", "largest chunk (tokens)", "rows/chunk",
                          "padded mask MiB"], rows)

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(build_seed_shaped_model(tmp, n_layers=args.layers)), dtype="float32", device="cpu")
    ids = resolve_yes_no(loaded.tokenizer)
    arch = loaded.arch
    scorer = Scorer(loaded, ids, opts)
    timing_rows = []
    for name in ("long_among_short", "shard_200_300"):
        toks, n_cond = cases[name]
        sets = [[], *random_head_sets(n_cond - 1, 4, arch.n_layers, arch.n_heads, seed=3)]

        def run(planner, toks=toks, sets=sets):
            engine.plan_units = planner  # Scorer.score_tokens plans with the module's planner
            try:
                return scorer.score_tokens(toks, sets)
            finally:
                engine.plan_units = plan_units

        scorer.score_tokens(toks[:1], sets)  # warm-up: first-call costs land on neither plan
        times = benchlib.best_of_rounds({"before": lambda: run(plan_before), "after": lambda: run(plan_units)},
                                        args.rounds)
        result["cases"][name]["seconds"] = times
        timing_rows.append([name, times["before"], times["after"], times["before"] / times["after"]])
    benchlib.print_table(f"Scorer.score_tokens wall seconds (seed shape, {args.layers} of 36 layers, "
                         f"{args.threads} thread)", ["case", "before", "after", "speed-up"], timing_rows)
    benchlib.write_json(result, args.out, "bucketing")


if __name__ == "__main__":
    main()
