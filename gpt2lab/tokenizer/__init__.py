"""Tokenizers: GPT-2's byte-level BPE from scratch, a tiktoken fast path, and a trainer.

    tok = get_tokenizer("gpt2")            # OpenAI's vocabulary, tiktoken fast path
    tok = get_tokenizer("gpt2", fast=False)  # the plain-Python encoder, same ids
    tok = get_tokenizer("runs/tok")        # a directory made by `gpt2lab tokenizer train`
    ids = tok.encode("Hello world")        # [15496, 995]
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from gpt2lab.errors import UserError
from gpt2lab.tokenizer.bpe import (
    EOT,
    GPT2_PATTERN,
    TOKENIZER_FILE,
    BPETokenizer,
    bytes_to_unicode,
    load_gpt2_files,
)
from gpt2lab.tokenizer.fast import FastTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"

__all__ = ["EOT", "GPT2_PATTERN", "BPETokenizer", "FastTokenizer", "Tokenizer", "bytes_to_unicode",
           "get_tokenizer", "load_tokenizer_file"]

Tokenizer = BPETokenizer | FastTokenizer


@lru_cache(maxsize=1)
def _gpt2() -> BPETokenizer:
    return load_gpt2_files(ASSETS / "gpt2" / "encoder.json", ASSETS / "gpt2" / "vocab.bpe", "gpt2")


@lru_cache(maxsize=8)
def _from_file(path: str, mtime: float) -> BPETokenizer:
    return BPETokenizer.from_file(path)


@lru_cache(maxsize=8)
def _fast(slow: BPETokenizer) -> FastTokenizer:
    return FastTokenizer(slow)


def _wrap(slow: BPETokenizer, fast: bool) -> Tokenizer:
    if not fast:
        return slow
    try:
        return _fast(slow)
    except ValueError:
        # ids not in merge order (a vocabulary from elsewhere): tiktoken cannot express
        # it, the from-scratch encoder can
        return slow


def get_tokenizer(name_or_dir: str | os.PathLike = "gpt2", fast: bool = True) -> Tokenizer:
    """'gpt2', a directory holding tokenizer.json, or the path of a tokenizer.json."""
    spec = str(name_or_dir)
    if spec == "gpt2":
        return _wrap(_gpt2(), fast)
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer at {spec!r}: use 'gpt2' or a directory made by "
                        "`gpt2lab tokenizer train` (it holds tokenizer.json)")
    return _wrap(_from_file(str(path.resolve()), path.stat().st_mtime), fast)


def load_tokenizer_file(path: str | os.PathLike, fast: bool = True) -> Tokenizer:
    """Load a tokenizer.json as stored in data and run dirs."""
    return _wrap(BPETokenizer.from_file(path), fast)
