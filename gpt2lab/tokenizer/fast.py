"""The same ids as `BPETokenizer`, through tiktoken's Rust encoder.

tiktoken describes a byte-level BPE by "mergeable ranks": token bytes -> rank,
and merges the adjacent pair whose *concatenation* has the lowest rank. Our
vocabularies give the token made by merge r the id 256 + r, so ranks are ids
and both algorithms merge in the same order. The encoding is built offline
from the tokenizer's own vocabulary; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import tiktoken

from gpt2lab.errors import UserError
from gpt2lab.tokenizer.bpe import BPETokenizer


class FastTokenizer:
    """Wraps a `BPETokenizer`; encodes and decodes through tiktoken."""

    fast = True

    def __init__(self, slow: BPETokenizer):
        self.slow = slow
        ranks = {slow.id_to_bytes[i]: i for i in slow.vocab.values()}
        for r, (a, b) in enumerate(slow.merges):
            # tiktoken ranks merged tokens by id; check ids follow merge order
            merged = slow.vocab[a + b]
            if merged != 256 + r:
                raise ValueError(f"tokenizer {slow.name!r}: merge {r} makes id {merged}, not in "
                                 "merge order; use fast=False for this vocabulary")
        self.enc = tiktoken.Encoding(
            name=f"gpt2lab-{slow.name}",
            pat_str=slow.pattern,
            mergeable_ranks=ranks,
            special_tokens=slow.special_tokens,
        )

    # metadata and persistence come from the from-scratch tokenizer
    name = property(lambda self: self.slow.name)
    vocab_size = property(lambda self: self.slow.vocab_size)
    eot_id = property(lambda self: self.slow.eot_id)
    special_tokens = property(lambda self: self.slow.special_tokens)
    fingerprint = property(lambda self: self.slow.fingerprint)

    def identity(self) -> dict:
        return self.slow.identity()

    def save(self, directory):
        return self.slow.save(directory)

    def to_dict(self) -> dict:
        return self.slow.to_dict()

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        allowed = self.slow._allowed(allowed_special)
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str], allowed_special: Iterable[str] | str = (),
                     num_threads: int = 8) -> list[list[int]]:
        allowed = self.slow._allowed(allowed_special)
        return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special=allowed,
                                     disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i not in self.slow.id_to_bytes]
        if bad:
            raise UserError(f"token id {bad[0]} is not in the vocabulary "
                             f"(valid ids are 0..{self.vocab_size - 1})")
        return self.enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
