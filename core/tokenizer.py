"""A byte-level tokenizer for the built-in model: ids 0-255 are bytes, then BOS and EOS."""

from __future__ import annotations


class ByteTokenizer:
    """Encodes text as UTF-8 bytes. ``decode`` replaces incomplete characters with U+FFFD."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.eos_token_id}

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
