"""Batched generation (`verif.model.generate`) against a plain one-prompt-at-a-time `model.generate` loop.

TinyZero prompts over generated Countdown problems, greedy, the same settings on both sides (stop
string `</answer>`, the model's eos). Reports new tokens per second of each, their ratio (best of
interleaved rounds, after a warm-up on the widest batch), and whether the greedy texts agree.

    python benchmarks/bench_generate.py                          # SmolLM2 on the CPU, 8 prompts, 32 tokens
    python benchmarks/bench_generate.py --model Qwen/Qwen2.5-3B --device cuda --n-prompts 64 --batch-size 64
"""

from __future__ import annotations

import argparse

import benchlib
from verif.model.generate import DEFAULT_STOP, eos_ids, generate
from verif.model.loading import load_model
from verif.task.countdown import generate_problems
from verif.task.tinyzero import generation_prompt


def plain_loop(lm, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """The notebook way: one `model.generate` call per prompt; texts and the new-token count."""
    tok, texts, tokens = lm.tokenizer, [], 0
    ends = eos_ids(lm)
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(lm.model.device)
        out = lm.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(ends), stop_strings=list(DEFAULT_STOP), tokenizer=tok,
        )
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        tokens += len(new)
        texts.append(tok.decode([t for t in new if t not in ends]))
    return texts, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="packaged:smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="timing rounds (best of)")
    p.add_argument("--threads", type=int, default=1, help=benchlib.THREADS_HELP)
    p.add_argument("--out", help="JSON file or folder (default benchmarks/results/generate.json)")
    args = p.parse_args(argv)
    benchlib.set_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = [generation_prompt(q.numbers, q.target) for q in generate_problems(args.n_prompts, seed=0)]
    runs: dict[str, object] = {}

    def batched():
        runs["batched"] = generate(lm, prompts, args.max_new_tokens, batch_size=args.batch_size)

    def loop():
        runs["loop"] = plain_loop(lm, prompts, args.max_new_tokens)

    batched()  # warm-up on the widest batch (allocations, kernel choice)
    best = benchlib.best_of_rounds({"batched": batched, "loop": loop}, args.rounds, args.device)
    batched_tokens = runs["batched"].new_tokens
    loop_texts, loop_tokens = runs["loop"]
    rate = {"batched": batched_tokens / best["batched"], "loop": loop_tokens / best["loop"]}
    same = sum(s.text == t for s, t in zip(runs["batched"].samples, loop_texts))
    benchlib.print_table(
        f"{lm.name}, {len(prompts)} TinyZero prompts, {args.max_new_tokens} new tokens, greedy",
        ["variant", "seconds", "new tokens", "tokens/s"],
        [[k, best[k], n, rate[k]] for k, n in (("batched", batched_tokens), ("loop", loop_tokens))],
    )
    ratio = rate["batched"] / rate["loop"]
    print(f"batched / loop tokens/s: {ratio:.2f}x; greedy texts equal: {same}/{len(prompts)}")
    benchlib.write_json(
        {
            "model": lm.name, "device": args.device, "n_prompts": len(prompts), "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "seconds": best, "new_tokens": {"batched": batched_tokens,
            "loop": loop_tokens}, "tokens_per_s": rate, "ratio": ratio, "texts_equal": same,
            "machine": benchlib.machine_info(),
        },
        args.out, "generate",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
