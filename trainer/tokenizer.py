"""Byte-level tokenizer: every byte is a token, plus a few special tokens.

Ids 0..255 are the raw bytes, so any text in any encoding round-trips exactly and no
vocabulary file has to be shipped or agreed on between peers. The specials follow the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
SPECIAL_IDS = {"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID}


class TokenIdError(ValueError):
    """A token id outside the tokenizer's vocabulary."""


class ByteTokenizer:
    """Text <-> token ids, one id per UTF-8 byte; BOS/EOS/PAD after the 256 byte ids."""

    vocab_size: int = BYTE_VOCAB + len(SPECIAL_IDS)
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Encode a str (as UTF-8) or raw bytes; optionally wrap in BOS/EOS."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = list(data)
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`; special tokens are dropped, unknown ids are rejected."""
        out = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < BYTE_VOCAB:
                out.append(token)
            elif token in (BOS_ID, EOS_ID, PAD_ID):
                continue
            else:
                raise TokenIdError(
                    f"token id {token} is outside the byte vocabulary (0..{self.vocab_size - 1})"
                )
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
