"""The engine against the usual ways of running this experiment, on a CPU, in one run.

For each model and real verification prompts (`verif.task.prompts.render_prompt` over `verif.task.countdown`
attempts) it times, under baseline + target + control sets:

* SmolLM2-135M (packaged, real weights) with the default sweep's conditions (configs/default.yaml:
  a target in layers 20-27, layer-matched controls);
* the seed-shaped test model (the study's 36 x 16 heads at tiny width) with the study's conditions
  (its 29 heads, random 29-head controls, which mostly ablate a head in the first layers);
* the same shape as Qwen3 (fast path with per-head q/k norms) and as Gemma 2 (no fast path: the
  engine runs the hook path, the model's own forward with batched rows and ablation hooks), random
  weights, same conditions (`--models smollm2,seed` for the first two only);

the three ways:

* notebook: one prompt and one condition per forward, full-vocab logits at every position, o_proj
  hooks (`verif.model.score.score_plain(..., full_logits=True)`, batch 1), as the study's notebook did;
* nnsight: one trace per condition over a batch of prompts, zeroing each ablated head's slice of the
  o_proj input inside the trace and reading the last position of the LM head's output, as a
  typical nnsight user would;
* engine: `verif.model.engine.Scorer` with default options (shared trunk, last-token logits).

Reported as scored (prompt x condition) rows per second and speed-up ratios, plus the largest
difference of p_yes_norm between nnsight / the notebook loop and the engine (must be ~0), and the cost
of the worker's self-check (`verif.model.selfcheck.self_check` on the first prompt) against scoring
one shard of `--shard-rows` rows at the engine's measured rate.

    python benchmarks/bench_cpu_engine.py                          # default: < 3 min on 2 cores
    python benchmarks/bench_cpu_engine.py --n-prompts 16 --n-random 6 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import benchlib
from verif.model.ablation import HookedAblation, head_masks
from verif.model.engine import EngineOptions, Scorer
from verif.design.heads import HeadSet
from verif.model.loading import LoadedModel, load_model
from verif.model.score import YesNoIds, left_pad, resolve_yes_no, score_plain, scores_from_log_probs, yes_no_log_probs
from verif.model.selfcheck import self_check
from tests.support.models import build_seed_shaped_model

MODELS = ("smollm2", "seed", "qwen3", "gemma2")
# The seed-shaped layout (36 layers x 16 heads, 2 kv heads, head_dim 8) in another family's config.
SEED_SHAPE = dict(num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, head_dim=8, hidden_size=128,
                  intermediate_size=256)


def notebook_loop(loaded: LoadedModel, ids: YesNoIds, tokens, head_sets: Sequence[HeadSet]) -> np.ndarray:
    """One forward per (prompt, condition), full logits, hooks: `[n, c]` p_yes_norm."""
    masks = head_masks(head_sets, loaded.arch)
    pad = loaded.tokenizer.pad_token_id
    out = np.zeros((len(tokens), len(head_sets)))
    with HookedAblation(loaded.model, loaded.arch) as hooks:
        for i, toks in enumerate(tokens):
            for j in range(len(head_sets)):
                out[i, j] = score_plain(loaded.model, hooks, [toks], masks[j:j + 1], ids, pad, full_logits=True).p_yes_norm[0]
    return out


def nnsight_traces(nn_model, loaded: LoadedModel, ids: YesNoIds, tokens, head_sets, batch: int) -> np.ndarray:
    """One nnsight trace per (condition, batch of prompts): zero the o_proj input slice of every ablated
    head, save the LM head's last position. Inputs are left padded with real position ids."""
    d, pad = loaded.arch.head_dim, loaded.tokenizer.pad_token_id
    # Gemma 2 soft-caps its logits after the LM head (in the causal LM's forward): the LM head's output
    # is not yet the model's logits, so the cap is applied here as the model applies it.
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    out = np.zeros((len(tokens), len(head_sets)))
    for j, heads in enumerate(head_sets):
        by_layer: dict[int, list[int]] = {}
        for layer, head in sorted(heads):
            by_layer.setdefault(layer, []).append(head)
        for a in range(0, len(tokens), batch):
            input_ids, attn, positions = left_pad(tokens[a:a + batch], pad)
            with torch.inference_mode():
                with nn_model.trace({"input_ids": input_ids, "attention_mask": attn, "position_ids": positions}):
                    for layer, layer_heads in by_layer.items():
                        x = nn_model.model.layers[layer].self_attn.o_proj.input
                        for head in layer_heads:
                            x[:, :, head * d:(head + 1) * d] = 0
                    logits = nn_model.lm_head.output[:, -1].save()
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            log_yes, log_no = yes_no_log_probs(logits, ids)
            out[a:a + batch, j] = scores_from_log_probs(log_yes.numpy(), log_no.numpy()).p_yes_norm
    return out


def default_sweep_head_sets(n_layers: int, n_heads: int, n_random: int) -> tuple[list[HeadSet], str]:
    """The default sweep's conditions (configs/default.yaml): its demonstration target in layers
    20-27 and layer-matched controls, so every condition shares layers 0-19 with the baseline."""
    from jobs.config import load_config
    from verif.design.conditions import build_conditions
    from verif.design.heads import parse_heads

    ab = load_config().ablation
    target = parse_heads(ab.target_heads)
    conditions = build_conditions(n_layers, n_heads, target, n_random, ab.seed, ab.exclude_target, ab.match_layers)
    return [c.heads for c in conditions], f"configs/default.yaml target ({len(target)} heads), layer-matched controls"


def load(name: str, tmp: str) -> LoadedModel:
    if name == "smollm2":
        return load_model("packaged:smollm2-135m", dtype="float32", device="cpu")
    if name == "seed":
        return load_model(str(build_seed_shaped_model(f"{tmp}/seed")), dtype="float32", device="cpu")
    from tests.support.families import build_family_model, family_config
    from tests.support.tokenizer import qwen25_tokenizer

    overrides = dict(SEED_SHAPE, sliding_window=4096) if name == "gemma2" else SEED_SHAPE
    folder = build_family_model(f"{tmp}/{name}", family_config(name, **overrides), qwen25_tokenizer())
    return load_model(str(folder), dtype="float32", device="cpu")


def bench_model(name: str, args: argparse.Namespace, tmp: str) -> dict:
    from nnsight import LanguageModel

    t0 = time.perf_counter()
    loaded = load(name, tmp)
    load_s = time.perf_counter() - t0
    arch = loaded.arch
    ids = resolve_yes_no(loaded.tokenizer)
    tokens = [loaded.tokenizer.encode(p, add_special_tokens=False) for p in benchlib.study_prompts(args.n_prompts)]
    if name == "smollm2":
        head_sets, conditions = default_sweep_head_sets(arch.n_layers, arch.n_heads, args.n_random)
    else:  # seed-shaped: 36 x 16 heads
        head_sets, _ = benchlib.study_head_sets(arch.n_layers, arch.n_heads, args.n_random)
        conditions = "the study's 29 heads, random 29-head controls"
    n_rows = len(tokens) * len(head_sets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice: it is still the documented way
        nn_model = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-path notice for Gemma 2 (reported as engine_path)
        scorer = Scorer(loaded, ids, EngineOptions())
    batch = args.nnsight_batch or len(tokens)
    results: dict[str, np.ndarray] = {}
    variants = {
        "notebook": lambda toks, hs: notebook_loop(loaded, ids, toks, hs),
        "nnsight": lambda toks, hs: nnsight_traces(nn_model, loaded, ids, toks, hs, batch),
        "engine": lambda toks, hs: engine_scores(toks, hs),
    }
    row_layers: list[int] = []

    def engine_scores(toks, hs) -> np.ndarray:
        table = scorer.score_tokens(toks, hs)
        row_layers.append(table.row_layers)
        return table.p_yes_norm

    for fn in variants.values():  # first calls pay one-off costs (nnsight's tracing setup, allocator)
        fn([t[-16:] for t in tokens[:2]], head_sets[:2])
    wall = benchlib.best_of_rounds(
        {k: (lambda k=k, fn=fn: results.__setitem__(k, fn(tokens, head_sets))) for k, fn in variants.items()},
        args.rounds,
    )
    rate = {k: n_rows / v for k, v in wall.items()}
    t0 = time.perf_counter()
    self_check(loaded, ids, tokens[0])
    check_s = time.perf_counter() - t0
    shard_s = args.shard_rows / rate["engine"]
    lengths = [len(t) for t in tokens]
    label = {"smollm2": "SmolLM2-135M", "seed": "seed-shaped test model"}.get(name, f"seed-shaped {name}, random weights")
    return {
        "model": f"{label}: {arch.family} {arch.n_layers}x{arch.n_heads} heads, hidden {arch.hidden_size}, float32",
        "engine_path": scorer.path,
        "load_s": load_s,
        "n_prompts": len(tokens),
        "tokens_mean": float(np.mean(lengths)),
        "tokens_min_max": [min(lengths), max(lengths)],
        "n_conditions": len(head_sets),
        "conditions": f"baseline + {conditions}",
        "rows": n_rows,
        "nnsight_batch": batch,
        "wall_s": wall,
        "rows_per_s": rate,
        # layer work of the engine against one full forward per row (the trunk serves the baseline)
        "engine_row_layers_per_row": row_layers[-1] / (n_rows * arch.n_layers),
        "speedup_engine_vs": {k: rate["engine"] / rate[k] for k in ("notebook", "nnsight")},
        "self_check_s": check_s,
        "shard_rows": args.shard_rows,
        "self_check_vs_shard": check_s / shard_s,
        "max_abs_diff_p_yes_norm_vs_engine": {
            k: float(np.abs(results[k] - results["engine"]).max()) for k in ("notebook", "nnsight")
        },
        # the conditions do move the answer (so equal results are not two unablated runs agreeing)
        "max_abs_effect_vs_baseline": {k: float(np.abs(v[:, 1:] - v[:, :1]).max()) for k, v in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma separated: {', '.join(MODELS)}")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--n-random", type=int, default=2, help="random control sets (conditions = 2 + this)")
    p.add_argument("--nnsight-batch", type=int, default=0, help="prompts per nnsight trace (0: all)")
    p.add_argument("--rounds", type=int, default=1, help="timing rounds, variants interleaved (best of)")
    p.add_argument("--shard-rows", type=int, default=16 * 12, help="rows of a shard, for the self-check's relative cost")
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/cpu_engine.json)")
    args = p.parse_args(argv)
    benchlib.set_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    t0 = time.perf_counter()
    result = {"benchmark": "cpu_engine", "machine": benchlib.machine_info(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            result["models"][name] = r = bench_model(name, args, tmp)
            print(f"{name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    result["elapsed_s"] = time.perf_counter() - t0
    for name, r in result["models"].items():
        benchlib.print_table(
            f"{r['model']}: {r['n_prompts']} prompts ({r['tokens_mean']:.0f} tokens) x {r['n_conditions']} conditions, "
            f"engine on the {r['engine_path']} path",
            ["variant", "rows/s", "engine speed-up", "max |diff| p_yes_norm vs engine"],
            [[k, r["rows_per_s"][k], r["speedup_engine_vs"].get(k, 1.0), r["max_abs_diff_p_yes_norm_vs_engine"].get(k, 0.0)]
             for k in ("notebook", "nnsight", "engine")],
        )
        print(f"self-check {r['self_check_s']:.2f} s = {100 * r['self_check_vs_shard']:.1f}% of a {r['shard_rows']}-row shard")
    benchlib.write_json(result, args.out, "cpu_engine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
