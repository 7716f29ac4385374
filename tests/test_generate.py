"""Batched generation (verif.model.generate) on the packaged SmolLM2, against a one-prompt-at-a-time loop."""

import pytest
import torch

from verif.model.generate import _finish, eos_ids, generate
from verif.task.validator import Problem
from verif.task.tinyzero import generation_prompt

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n"
)
# Three prompts of different lengths (so left padding is real); SmolLM2 ends the chat with its eos,
# counts into the stop string, and runs the TinyZero prompt to the token limit.
PROMPTS = [CHAT, "Count: 1, 2, 3,", generation_prompt(Problem((79, 17, 60), 36).numbers, 36)]
STOP = (" 6,",)
MAX_NEW = 32


@pytest.fixture(scope="module")
def batched(smollm2):
    return generate(smollm2, PROMPTS, max_new_tokens=MAX_NEW, batch_size=4, stop=STOP)


def _loop_reference(lm, prompt):
    """Plain `model.generate` on one prompt: new token ids (to eos, inclusive) and each step's top-2 gap."""
    enc = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(
        **enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=sorted(eos_ids(lm)), output_scores=True, return_dict_in_generate=True,
    )
    ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return ids, gaps


def test_finish_reasons_text_and_counts(batched):
    eos, stop, length = batched.samples
    assert [s.prompt_index for s in batched.samples] == [0, 1, 2]
    assert (eos.finish, stop.finish, length.finish) == ("eos", "stop", "length")
    assert stop.text.endswith(" 6,") and " 7" not in stop.text  # cut right after the stop string
    assert length.n_new_tokens == MAX_NEW
    assert 0 < eos.n_new_tokens < MAX_NEW and "<|im_end|>" not in eos.text
    assert batched.new_tokens == sum(s.n_new_tokens for s in batched.samples)
    assert batched.tokens_per_s > 0


def test_greedy_batch_equals_one_prompt_at_a_time(smollm2, batched, rounding):
    # A greedy step whose two best logits are this close may flip between a padded batch and a single
    # prompt: two float32 forwards move each logit by <= 3 delta (tests/tolerances.py), the two best in
    # opposite directions at worst.
    tie_gap = 2 * 3 * rounding(smollm2)
    for sample, prompt in zip(batched.samples, PROMPTS):
        ids, gaps = _loop_reference(smollm2, prompt)
        ends = [i for i, t in enumerate(ids) if t in eos_ids(smollm2)]
        tie = next((i for i, g in enumerate(gaps) if g < tie_gap), None)
        if tie is not None:  # only the steps before a near-tie must agree
            assert sample.text.startswith(smollm2.tokenizer.decode(ids[:tie])) or smollm2.tokenizer.decode(
                ids[:tie]).startswith(sample.text)
            continue
        text = smollm2.tokenizer.decode(ids[: ends[0]] if ends else ids)
        if sample.finish == "stop":  # the loop ran on past the stop string
            assert text.startswith(sample.text) and len(text) > len(sample.text)
        else:
            assert text == sample.text
            assert sample.n_new_tokens == (ends[0] + 1 if ends else len(ids))


def test_sampling_is_reproducible_per_seed_and_leaves_the_global_rng_alone(smollm2):
    prompts = PROMPTS[1:]
    state = torch.get_rng_state()
    a = generate(smollm2, prompts, max_new_tokens=8, n=2, do_sample=True, seed=3, batch_size=4, stop=())
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(smollm2, prompts, max_new_tokens=8, n=2, do_sample=True, seed=3, batch_size=4, stop=())
    c = generate(smollm2, prompts, max_new_tokens=8, n=2, do_sample=True, seed=4, batch_size=4, stop=())
    assert a.samples == b.samples
    assert [s.text for s in a.samples] != [s.text for s in c.samples]
    assert [(s.prompt_index, s.sample) for s in a.samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert a.samples[2].text != a.samples[3].text  # two draws on the open-ended prompt, not one copied
    # a shard of the run (cut at a batch boundary) draws what the whole run drew for its prompts
    shard = generate(smollm2, prompts[1:], max_new_tokens=8, n=2, do_sample=True, seed=3, batch_size=2,
                     stop=(), first_index=1)
    whole = generate(smollm2, prompts, max_new_tokens=8, n=2, do_sample=True, seed=3, batch_size=2, stop=())
    assert shard.samples == whole.samples[2:]


def test_finish_when_pad_is_not_an_end_token(smollm2):
    tok = smollm2.tokenizer
    pad = tok.encode(" x")[0]
    ids = tok.encode(" 1, 2") + [pad, pad]  # a row that stopped on a stop string, then was padded
    assert _finish(ids, tok, {2}, pad, (" 2",)) == (" 1, 2", "stop", len(ids) - 2)
    assert _finish(ids[:-2] + [2, pad], tok, {2}, pad, ()) == (" 1, 2", "eos", len(ids) - 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "generate.max_new_tokens 0"),
        ({"n": 2}, "generate.n 2: must be 1 for greedy"),
        ({"do_sample": True, "temperature": 0.0}, "generate.temperature"),
        ({"do_sample": True, "top_p": 1.5}, "generate.top_p"),
        ({"batch_size": 0}, "generate.batch_size"),
    ],
)
def test_bad_settings_are_refused_before_any_work(smollm2, kwargs, message):
    settings = {"max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(smollm2, PROMPTS, **settings)
