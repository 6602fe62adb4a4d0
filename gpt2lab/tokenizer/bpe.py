"""GPT-2's byte-level BPE, written out in full.

How GPT-2 turns text into ids:

1. Pre-tokenise: a regex cuts the text into pieces (words with their leading
   space, runs of digits, runs of punctuation, whitespace). Merges never cross
   a piece boundary, so " the" and "the" are learned separately.
2. Each piece becomes its UTF-8 bytes; every byte is a token of its own to
   begin with, so any string can be encoded and nothing is ever unknown.
3. Merge: repeatedly find the adjacent pair with the lowest merge rank (the
   order in which training learned it) and fuse every occurrence of it, until
   no adjacent pair has a rank.

The vocabulary files write bytes as printable characters (the `bytes_to_unicode`
table below), so that a space is stored as "Ġ" and a newline as "Ċ". Token ids
are looked up in that form. Special tokens such as `<|endoftext|>` are never
produced from text by `encode` unless the caller allows them explicitly.

`BPETokenizer` is this algorithm in plain Python. `FastTokenizer` (fast.py)
gives the same ids through tiktoken's Rust implementation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import regex

from gpt2lab import io
from gpt2lab.errors import UserError

# GPT-2's pre-tokenisation pattern, from OpenAI's encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
FORMAT = "gpt2lab-bpe"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
MAX_ID = 1 << 21  # no real vocabulary comes near this many ids (the largest in use have ~260k)
# text a pre-tokenisation pattern must reproduce piece by piece: letters, digits, punctuation, spaces, tabs,
# newlines, accents, CJK, emoji, a no-break space and a control character
_PATTERN_PROBE = "Hello, world! It's 2024 -- na\u00efve caf\u00e9 \u6771\u4eac \n\n\t  x\u00a0y \U0001F600 a\x00b  "


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the rest (control characters,
    space, ...) are shifted up to code points 256 and beyond, so every token
    can be stored as a visible string in the vocabulary files.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {}
    shift = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes:
    """'Ġthe' -> b' the'."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in token)


def bytes_to_token(data: bytes) -> str:
    """b' the' -> 'Ġthe'."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


class BPETokenizer:
    """Byte-level BPE encoder/decoder in plain Python.

    vocab: token string (in `bytes_to_unicode` form) -> id, ordinary tokens only.
    merges: pairs of token strings, in rank order (rank 0 merges first).
    special_tokens: e.g. {"<|endoftext|>": 50256}.
    """

    fast = False

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        special_tokens: dict[str, int],
        pattern: str = GPT2_PATTERN,
        name: str = "custom",
    ):
        self.vocab = vocab
        self.merges = merges
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self.name = name
        self._regex = regex.compile(pattern)
        self._check(name)

        b2u = bytes_to_unicode()
        try:
            # the 256 single-byte tokens every byte-level vocabulary starts from
            self._byte_ids = [vocab[b2u[b]] for b in range(256)]
        except KeyError as e:
            raise UserError(f"tokenizer {name!r} lacks the single-byte token {e.args[0]!r}; "
                            "rebuild it with `gpt2lab tokenizer train`") from None
        # (left id, right id) -> (rank, merged id)
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merges):
            try:
                self._ranks[(vocab[a], vocab[b])] = (rank, vocab[a + b])
            except KeyError:
                raise UserError(f"tokenizer {name!r}: merge {rank} ({a!r} {b!r}) uses a token "
                                "missing from the vocabulary; the tokenizer files are corrupt") from None
        self.id_to_bytes: dict[int, bytes] = {i: token_to_bytes(t) for t, i in vocab.items()}
        for tok, i in self.special_tokens.items():
            self.id_to_bytes[i] = tok.encode("utf-8")
        self.vocab_size = max(self.id_to_bytes) + 1
        self.eot_id = self.special_tokens.get(EOT)
        self._special_regex = None
        self._cache: dict[str, list[int]] = {}

    def _check(self, name: str) -> None:
        """Refuse a vocabulary that could not have come from training: ids out of range or shared, empty
        special tokens, a pattern that loses text."""
        where = f"tokenizer {name!r}"
        for table, what in ((self.vocab, "token"), (self.special_tokens, "special token")):
            if not isinstance(table, dict):
                raise UserError(f"{where}: its {what}s are not a mapping of text to ids")
            for tok, i in table.items():
                if not isinstance(tok, str) or not tok:
                    raise UserError(f"{where} has an empty or non-text {what} {tok!r}")
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_ID:
                    raise UserError(f"{where}: {what} {tok!r} has id {i!r}; ids must be integers from 0 to "
                                    f"{MAX_ID - 1}")
        ids = list(self.vocab.values())
        if len(set(ids)) != len(ids):
            raise UserError(f"{where} gives the same id to two tokens")
        clash = sorted(set(self.special_tokens.values()) & set(ids))
        if clash or len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise UserError(f"{where}: special token id {clash[0] if clash else '?'} is also the id of another "
                            "token; special tokens need ids of their own")
        count = len(ids) + len(self.special_tokens)
        top = max(ids + list(self.special_tokens.values()), default=0)
        if top >= 2 * count + 256:
            raise UserError(f"{where} has {count} tokens but ids up to {top}; its ids must be (nearly) "
                            "contiguous, or every model built on it would hold rows for ids that do not exist")
        probe = _PATTERN_PROBE
        if "".join(self._regex.findall(probe)) != probe:
            raise UserError(f"{where}: its pre-tokenisation pattern drops text (it does not match every "
                            "character); a byte-level BPE must see all of its input")

    # ---------------------------------------------------------------- encode

    def _bpe(self, piece: str) -> list[int]:
        """Merge the bytes of one pre-tokenised piece into token ids."""
        ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
        ranks = self._ranks
        while len(ids) >= 2:
            # the adjacent pair that training learned first
            best_rank, best = None, None
            for pair in zip(ids, ids[1:]):
                found = ranks.get(pair)
                if found is not None and (best_rank is None or found[0] < best_rank):
                    best_rank, best = found[0], pair
            if best is None:
                break
            merged = ranks[best][1]
            first, second = best
            out, i, n = [], 0, len(ids)
            while i < n:  # fuse every occurrence, left to right
                if i < n - 1 and ids[i] == first and ids[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text; a special token's text is encoded as ordinary text."""
        out: list[int] = []
        cache = self._cache
        for piece in self._regex.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(cache) > 200_000:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Encode text. Special tokens are recognised only where allowed.

        `allowed_special="all"` or a set such as `{"<|endoftext|>"}` turns
        their text into their ids; by default they are ordinary text, as with
        tiktoken's `encode_ordinary`.
        """
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        pattern = "(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        out: list[int] = []
        for i, part in enumerate(regex.split(pattern, text)):
            if i % 2:
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode_ordinary(part))
        return out

    def encode_batch(self, texts: list[str], allowed_special: Iterable[str] | str = ()) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def _allowed(self, allowed_special: Iterable[str] | str) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise UserError(f"unknown special tokens {sorted(unknown)}; this tokenizer has "
                             f"{sorted(self.special_tokens)}")
        return allowed

    # ---------------------------------------------------------------- decode

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.id_to_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise UserError(f"token id {e.args[0]} is not in the vocabulary "
                             f"(valid ids are 0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": self.vocab,
            "merges": [f"{a} {b}" for a, b in self.merges],
        }

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides the ids: the identity of a tokenizer."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256()
            h.update(self.pattern.encode())
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
            h.update(json.dumps(by_id, ensure_ascii=False).encode())
            h.update("\n".join(f"{a} {b}" for a, b in self.merges).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        """What data dirs and run dirs record to check they use the same tokenizer."""
        return {"name": self.name, "sha256": self.fingerprint, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into `directory` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        io.write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer.json") -> BPETokenizer:
        fix = "retrain it with `gpt2lab tokenizer train`"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{source} is not a gpt2lab tokenizer (format {found!r}); "
                            "make one with `gpt2lab tokenizer train`")
        if d.get("version") != FORMAT_VERSION:
            raise UserError(f"{source} has tokenizer format version {d.get('version')}, this gpt2lab "
                            f"reads version {FORMAT_VERSION}; upgrade gpt2lab or {fix}")
        try:
            merges = [tuple(m.split(" ")) for m in d["merges"]]
            if any(len(m) != 2 for m in merges):
                raise ValueError("a merge is not two tokens separated by one space")
            regex.compile(d["pattern"])
            return cls(d["vocab"], merges, d["special_tokens"], d["pattern"], d.get("name", "custom"))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, regex.error) as e:
            raise UserError(f"{source} is missing or has a malformed field ({type(e).__name__}: {e}); "
                            f"the file is corrupt, {fix}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} does not exist; train a tokenizer with "
                            "`gpt2lab tokenizer train` or use 'gpt2'") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); the tokenizer file is corrupt, "
                            "retrain it with `gpt2lab tokenizer train`") from None
        return cls.from_dict(d, str(path))


def load_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike,
                    name: str = "gpt2") -> BPETokenizer:
    """Build the tokenizer from OpenAI's `encoder.json` and `vocab.bpe`."""
    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    special = {EOT: vocab.pop(EOT)}
    lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    # the first line is "#version: 0.2"; the last one is empty
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    return BPETokenizer(vocab, merges, special, GPT2_PATTERN, name)
