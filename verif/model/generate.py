"""Batched text generation on a loaded model: HF `generate` with left padding, greedy or sampled.

Many prompts go through one `generate` call (left-padded, so every row continues from its own last
token), `n` samples per prompt. Each sample comes back as the decoded continuation only, why it
ended and how many tokens it took:

* ``eos``: the model emitted an end-of-sequence token (not part of the text);
* ``stop``: the text reached a stop string (``</answer>`` by default, where TinyZero's answer
  ends); the text is cut right after it, since the last token may run past it;
* ``length``: `max_new_tokens` ran out.

Reproducibility: greedy decoding depends on nothing random, and sampling draws from a torch
generator seeded per batch from (`seed`, run index of the batch's first prompt) inside `fork_rng`,
so the caller's random state is untouched. The same prompts, `batch_size`, `n`, settings, model,
device and library versions give the same samples. A prompt's samples can change when its batch
changes (other prompts, other padding: the random draws and float rounding are shared by the
batch), and greedy outputs of a batch can differ from one-at-a-time ones where two tokens are
within float rounding of each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verif.model.loading import LoadedModel

FINISH_REASONS = ("eos", "stop", "length")
DEFAULT_STOP = ("</answer>",)


@dataclass(frozen=True)
class Sample:
    """One generated continuation of prompt `prompt_index` (its `sample`-th, from 0)."""

    prompt_index: int
    sample: int
    text: str
    finish: str
    n_new_tokens: int


@dataclass(frozen=True)
class GenerationRun:
    """All samples, in prompt order then sample order, and the wall time they took."""

    samples: list[Sample]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(s.n_new_tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _check_settings(
    max_new_tokens: int, n: int, do_sample: bool, temperature: float, top_p: float, batch_size: int
) -> None:
    def bad(key: str, value: object, valid: str) -> ValueError:
        return ValueError(f"generate.{key} {value!r}: must be {valid}")

    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise bad("max_new_tokens", max_new_tokens, "an integer >= 1")
    if type(n) is not int or n < 1:
        raise bad("n", n, "an integer >= 1")
    if n > 1 and not do_sample:
        raise bad("n", n, "1 for greedy decoding (greedy samples are identical); sample to draw more")
    if not temperature > 0:
        raise bad("temperature", temperature, "> 0")
    if not 0 < top_p <= 1:
        raise bad("top_p", top_p, "in (0, 1]")
    if type(batch_size) is not int or batch_size < 1:
        raise bad("batch_size", batch_size, "an integer >= 1 (sequences per generate call)")


def eos_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end a sequence: the generation config's (one or several) and the tokenizer's."""
    configured = lm.model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(lm.tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def _finish(
    new_ids: list[int], tokenizer, ends: set[int], pad_id: int, stop: Sequence[str]
) -> tuple[str, str, int]:
    """(text, finish reason, number of new tokens) of one row of `generate`'s new tokens.

    After a row finishes, `generate` fills it with the pad token (often the eos token itself), so
    the row's own tokens end at its first eos; with a pad that is no eos, trailing pads go too.
    """
    first_end = next((i for i, t in enumerate(new_ids) if t in ends), None)
    content = new_ids if first_end is None else new_ids[:first_end]
    if first_end is None and pad_id not in ends:
        while content and content[-1] == pad_id:
            content = content[:-1]
    text = tokenizer.decode(content, skip_special_tokens=False)
    hits = [text.find(s) + len(s) for s in stop if s in text]
    if hits:
        return text[: min(hits)], "stop", len(content)
    if first_end is not None:
        return text, "eos", first_end + 1
    return text, "length", len(content)


def _batch_seed(seed: int, first_prompt: int) -> int:
    """A seed for one batch that depends only on the run's seed and where the batch starts."""
    return int(np.random.SeedSequence([seed, first_prompt]).generate_state(1)[0])


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    n: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    stop: Sequence[str] = DEFAULT_STOP,
    progress: Callable[[int, int], None] | None = None,
    first_index: int = 0,
) -> GenerationRun:
    """Continue every prompt `n` times; `batch_size` counts sequences (prompts x n) per call.

    `first_index` is the index of `prompts[0]` in the whole run: samples are numbered from it and
    batch seeds depend on it, so a shard of a run (cut at batch boundaries) draws what the whole
    run draws for the same prompts.

    Greedy by default; `do_sample` draws with `temperature` and nucleus `top_p` (no top-k cut,
    whatever the model's generation config says). `progress(samples, new_tokens)` is called after
    each batch. Prompts are tokenised with the tokenizer's defaults (as the study's code did).
    """
    _check_settings(max_new_tokens, n, do_sample, temperature, top_p, batch_size)
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    ends, pad_id = eos_ids(lm), tok.pad_token_id
    settings = dict(
        max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=do_sample, num_beams=1,
        repetition_penalty=1.0, pad_token_id=pad_id, eos_token_id=sorted(ends),
    )
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop:
        settings.update(stop_strings=list(stop), tokenizer=tok)
    per_call = max(1, batch_size // n)
    samples: list[Sample] = []
    start = time.perf_counter()
    for first in range(0, len(prompts), per_call):
        batch = list(prompts[first:first + per_call])
        enc = tok(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_batch_seed(seed, first_index + first))
            out = model.generate(**enc, **settings)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        done = []
        for row, ids in enumerate(new):
            text, finish, count = _finish(ids, tok, ends, pad_id, stop)
            done.append(Sample(first_index + first + row // n, row % n, text, finish, count))
        samples.extend(done)
        if progress is not None:
            progress(len(done), sum(s.n_new_tokens for s in done))
    return GenerationRun(samples, time.perf_counter() - start)
