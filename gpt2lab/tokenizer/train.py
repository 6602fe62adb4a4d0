"""Training a byte-level BPE vocabulary, deterministically and fast enough for laptops.

The result plugs straight into `BPETokenizer` and the tiktoken fast path:

* text is cut into pieces with GPT-2's regex, so merges never cross a piece;
* ids 0..255 are the single bytes in byte-value order, merge r makes id 256 + r,
  and `<|endoftext|>` is the one special token, with the last id;
* a literal `<|endoftext|>` in the training text separates documents and is never
  learned from.

How it runs: every distinct piece is counted once; the trainer then works on the
distinct pieces ("words") with their counts. It keeps the count of every adjacent
pair of tokens, an index from each pair to the words that hold it, and a max-heap
of pairs. A merge rewrites only the words that hold the merged pair, and pushes
the new counts of the pairs it changed; heap entries whose count is out of date
are dropped when they surface ("lazy invalidation").

Ties are broken by the bytes of the pair (smallest left bytes, then smallest right
bytes), so the same text always gives the same tokenizer. A pair whose bytes
already form a token is never merged again: two merges must not make the same
token, or the fast path's "token of merge r has id 256 + r" could not hold.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.sources import ReadStats, expand_inputs, iter_pieces
from gpt2lab.tokenizer.bpe import EOT, GPT2_PATTERN, BPETokenizer, bytes_to_token

MIN_VOCAB = 257  # the 256 single bytes and <|endoftext|>
MAX_VOCAB = 1 << 20


class TrainStats:
    """What a training run saw and did; `train_bpe` attaches it to the tokenizer as `.train_stats`."""

    def __init__(self) -> None:
        self.requested_vocab = 0
        self.chars = 0
        self.words = 0  # distinct pre-tokenised pieces
        self.merges = 0
        self.skipped_pairs = 0  # best pairs whose bytes were already a token
        self.stopped_early = False  # no pair left that occurs at least twice
        self.files = 0
        self.seconds = 0.0


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise UserError(f"vocab size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"vocab size {vocab_size} is out of range: it must be between {MIN_VOCAB} "
                        f"(the 256 bytes and <|endoftext|>) and {MAX_VOCAB:,}; pass a --vocab-size "
                        "in that range")


# ------------------------------------------------------------------ counting


def count_words(texts: Iterable[str], pattern: str = GPT2_PATTERN) -> Counter:
    """Distinct pre-tokenised pieces and how often each occurs.

    Each text is first split at literal `<|endoftext|>` strings, which are
    document boundaries and contribute nothing themselves.
    """
    findall = regex.compile(pattern).findall
    counts: Counter = Counter()
    for text in texts:
        for part in text.split(EOT):
            if part:
                counts.update(findall(part))
    return counts


def _limit_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    if max_chars is None:
        yield from texts
        return
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        if len(text) > left:
            text = text[:left]
        left -= len(text)
        yield text


# ------------------------------------------------------------------ merging


def _learn_merges(word_counts: Counter, n_merges: int, stats: TrainStats,
                  progress: bool) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Up to `n_merges` merges over the counted words: (bytes of every token id, merges as id pairs)."""
    # words of one byte hold no pair; drop them. Sorting fixes the word order (not
    # that the result depends on it: every choice below depends on counts and bytes only)
    items = sorted((w.encode("utf-8"), c) for w, c in word_counts.items())
    words: list[list[int]] = [list(b) for b, _ in items if len(b) > 1]
    freqs: list[int] = [c for b, c in items if len(b) > 1]

    tok_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    known: set[bytes] = set(tok_bytes)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            s = where.get(pair)
            if s is None:
                where[pair] = {wi}
            else:
                s.add(wi)

    # max-heap on count, then the smallest (left bytes, right bytes)
    heap = [(-c, tok_bytes[a], tok_bytes[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    banned: set[tuple[int, int]] = set()
    merges: list[tuple[int, int]] = []

    bar = None
    if progress and n_merges > 0:
        bar = progress_bar(total=n_merges, desc="merges", unit="merge", mininterval=0.5, leave=False)
    try:
        while len(merges) < n_merges:
            if not heap:
                stats.stopped_early = True
                break
            neg, lb, rb, a, b = heapq.heappop(heap)
            pair = (a, b)
            count = pair_counts.get(pair, 0)
            if count != -neg or pair in banned:
                continue  # a stale entry: the pair's current count was pushed too
            if count < 2:
                stats.stopped_early = True
                break
            new_bytes = lb + rb
            if new_bytes in known:
                banned.add(pair)
                stats.skipped_pairs += 1
                continue
            new_id = len(tok_bytes)
            tok_bytes.append(new_bytes)
            known.add(new_bytes)
            merges.append(pair)
            _apply_merge(pair, new_id, words, freqs, pair_counts, where, heap, tok_bytes, banned)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return tok_bytes, merges


def _apply_merge(pair, new_id, words, freqs, pair_counts, where, heap, tok_bytes, banned) -> None:
    """Fuse `pair` into `new_id` in every word holding it; update counts, index and heap."""
    a, b = pair
    delta: dict[tuple[int, int], int] = {}
    for wi in where.pop(pair, ()):
        w = words[wi]
        n = len(w)
        # merge left to right, as the encoder does
        out: list[int] = []
        i = 0
        hit = False
        while i < n:
            if i < n - 1 and w[i] == a and w[i + 1] == b:
                out.append(new_id)
                i += 2
                hit = True
            else:
                out.append(w[i])
                i += 1
        if not hit:
            continue  # the index is a superset: this word lost the pair to an earlier merge
        f = freqs[wi]
        for p in zip(w, w[1:]):
            delta[p] = delta.get(p, 0) - f
        for p in zip(out, out[1:]):
            delta[p] = delta.get(p, 0) + f
            if p[0] == new_id or p[1] == new_id:
                s = where.get(p)
                if s is None:
                    where[p] = {wi}
                else:
                    s.add(wi)
        words[wi] = out
    pair_counts.pop(pair, None)
    for p, d in delta.items():
        if d == 0 or p == pair:
            continue
        c = pair_counts.get(p, 0) + d
        if c > 0:
            pair_counts[p] = c
            if p not in banned:
                heapq.heappush(heap, (-c, tok_bytes[p[0]], tok_bytes[p[1]], p[0], p[1]))
        else:
            pair_counts.pop(p, None)
            where.pop(p, None)


# ------------------------------------------------------------------ public API


def _build(tok_bytes: list[bytes], merges: list[tuple[int, int]], name: str) -> BPETokenizer:
    vocab = {bytes_to_token(bs): i for i, bs in enumerate(tok_bytes)}
    merge_strs = [(bytes_to_token(tok_bytes[a]), bytes_to_token(tok_bytes[b])) for a, b in merges]
    return BPETokenizer(vocab, merge_strs, {EOT: len(tok_bytes)}, GPT2_PATTERN, name)


def _train(texts: Iterable[str], vocab_size: int, name: str, progress: bool,
           stats: TrainStats) -> BPETokenizer:
    check_vocab_size(vocab_size)
    start = time.perf_counter()
    stats.requested_vocab = vocab_size

    def counted(ts: Iterable[str]) -> Iterator[str]:
        for t in ts:
            stats.chars += len(t)
            yield t

    word_counts = count_words(counted(texts))
    stats.words = len(word_counts)
    if not word_counts:
        raise UserError("the training text is empty (after removing <|endoftext|>); "
                        "give input files that hold some text")
    tok_bytes, merges = _learn_merges(word_counts, vocab_size - MIN_VOCAB, stats, progress)
    stats.merges = len(merges)
    tok = _build(tok_bytes, merges, name)
    stats.seconds = time.perf_counter() - start
    tok.train_stats = stats
    return tok


def train_bpe_from_texts(texts: Iterable[str], vocab_size: int, *, name: str = "custom",
                         progress: bool = False) -> BPETokenizer:
    """Train on strings in memory (each one a document, or several split by `<|endoftext|>`)."""
    if isinstance(texts, str):
        texts = [texts]
    return _train(texts, vocab_size, name, progress, TrainStats())


def train_bpe(inputs: list[str], vocab_size: int, *, name: str = "custom", text_field: str = "text",
              max_chars: int | None = None, progress: bool = True) -> BPETokenizer:
    """Train on files, directories or globs (.txt, .gz, .jsonl), as `iter_pieces` reads them."""
    check_vocab_size(vocab_size)
    if max_chars is not None and max_chars < 1:
        raise UserError(f"max_chars must be at least 1, got {max_chars}; leave it out to use all input")
    expand_inputs(list(inputs))  # report a missing input before any progress output
    read = ReadStats()
    stats = TrainStats()
    texts = (p.text for p in iter_pieces(list(inputs), text_field=text_field, stats=read))
    if progress:
        texts = _chars_bar(texts, max_chars)
    tok = _train(_limit_chars(texts, max_chars), vocab_size, name, progress, stats)
    stats.files = read.files
    return tok


def _chars_bar(texts: Iterable[str], total: int | None) -> Iterator[str]:
    with progress_bar(total=total, desc="reading", unit="char", unit_scale=True, mininterval=0.5,
              leave=False) as bar:
        for t in texts:
            yield t
            bar.update(len(t))


def train_bpe_to_dir(inputs: list[str], out: str | os.PathLike, *, vocab_size: int, name: str | None = None,
                     text_field: str = "text", max_chars: int | None = None, overwrite: bool = False,
                     progress: bool = True) -> BPETokenizer:
    """Train, then write `out/tokenizer.json` and print a one-line summary."""
    check_vocab_size(vocab_size)
    out = Path(out)

    io.check_output_dir(out, "tokenizer", overwrite=overwrite, flag="--out", inputs=list(inputs))
    if name is None:
        name = out.resolve().name or "custom"
    tok = train_bpe(inputs, vocab_size, name=name, text_field=text_field, max_chars=max_chars,
                    progress=progress)
    path = tok.save(out)
    s: TrainStats = tok.train_stats
    line = (f"trained tokenizer {name!r}: vocab {tok.vocab_size} ({s.merges} merges) from "
            f"{s.chars:,} chars in {s.files} file(s), {s.seconds:.1f}s -> {path}")
    if s.stopped_early:
        line += (f" (stopped early: no pair occurs twice any more, so the vocab is smaller than "
                 f"the {vocab_size} asked for; give more text)")
    print(line, flush=True)
    return tok


__all__ = ["TrainStats", "count_words", "train_bpe", "train_bpe_from_texts", "train_bpe_to_dir"]
