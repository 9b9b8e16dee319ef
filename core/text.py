"""Incremental detokenisation for streaming."""

from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """Turns committed token ids into text pieces as they arrive.

    Uses mlx-lm's streaming detokenizer when the tokenizer has one (``TokenizerWrapper``), else
    re-decodes the generated ids and holds back a trailing incomplete character (``\\ufffd``).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.detok = getattr(tokenizer, "detokenizer", None)
        if self.detok is not None:
            self.detok.reset()
        self.ids: list[int] = []
        self.printed = 0

    def add(self, ids: Sequence[int]) -> str:
        if self.detok is not None:
            for t in ids:
                self.detok.add_token(int(t))
            return self.detok.last_segment
        self.ids.extend(int(t) for t in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new

    def flush(self) -> str:
        if self.detok is not None:
            self.detok.finalize()
            return self.detok.last_segment
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[self.printed :], len(text)
        return new
