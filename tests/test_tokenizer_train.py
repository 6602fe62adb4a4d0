"""The byte-level BPE trainer: exact vocab layout, determinism, agreement with a naive trainer,
fast path == from-scratch ids, and the `gpt2lab tokenizer train` command."""

import gzip
import json
import random
import subprocess
import sys

import pytest

from gpt2lab.errors import UserError
from gpt2lab.tokenizer import EOT, GPT2_PATTERN, BPETokenizer, FastTokenizer, get_tokenizer
from gpt2lab.tokenizer.bpe import TOKENIZER_FILE
from gpt2lab.tokenizer.train import count_words, train_bpe, train_bpe_from_texts, train_bpe_to_dir

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "The dog sleeps; the fox runs away from the dog.",
    "A lazy afternoon: the sun, the river, the trees and the birds.",
    "Then the fox came back, and the dog barked at the fox again!",
    "Numbers like 2024 and 1999 appear in the text, then 2024 again.",
]
UNSEEN = [
    "Completely unseen words: xylophone, quartz, zephyr, jinx.",
    "emoji 😀🤖 and 👨‍👩‍👧 with CJK 日本語 中文 한국어",
    "  odd   spacing\t\ttabs\n\n\nand trailing   ",
    "Ünïcödé àccents, numbers 3.14159 and 1234567890",
    "it's they're I'M we'd",
    "",
]


def _check_layout(tok: BPETokenizer, vocab_size: int) -> None:
    """256 bytes in byte order, merge r -> id 256 + r, <|endoftext|> last."""
    assert tok.vocab_size == vocab_size
    assert len(tok.merges) == vocab_size - 257
    assert tok.eot_id == vocab_size - 1
    assert tok.special_tokens == {EOT: vocab_size - 1}
    for i in range(256):
        assert tok.id_to_bytes[i] == bytes([i])
    for r, (a, b) in enumerate(tok.merges):
        assert tok.vocab[a + b] == 256 + r
    assert sorted(tok.vocab.values()) == list(range(vocab_size - 1))
    assert len(set(tok.id_to_bytes.values())) == vocab_size  # no token made twice
    assert tok.pattern == GPT2_PATTERN


def _naive_merges(texts: list[str], n_merges: int) -> list[tuple[bytes, bytes]]:
    """Textbook BPE: recount every pair before every merge. Ties: most frequent, then smallest bytes."""
    counts = count_words(texts)
    words = [([bytes([c]) for c in w.encode("utf-8")], f) for w, f in counts.items()]
    known = {bytes([i]) for i in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    banned: set[tuple[bytes, bytes]] = set()
    while len(merges) < n_merges:
        pairs: dict[tuple[bytes, bytes], int] = {}
        for w, f in words:
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + f
        candidates = [(-c, p) for p, c in pairs.items() if p not in banned]
        if not candidates:
            break
        neg, best = min(candidates)
        if -neg < 2:
            break
        if best[0] + best[1] in known:
            banned.add(best)
            continue
        known.add(best[0] + best[1])
        merges.append(best)
        for w, _ in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    return merges


@pytest.fixture(scope="module")
def shakespeare_300k(shared_data) -> str:
    with gzip.open(shared_data / "corpora" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        return f.read(300_000)


@pytest.fixture(scope="module")
def shakespeare_tok(shakespeare_300k) -> BPETokenizer:
    return train_bpe_from_texts([shakespeare_300k], 1000, name="shakespeare")


# ------------------------------------------------------------------ hermetic


def test_small_corpus_layout_and_round_trip():
    tok = train_bpe_from_texts(SENTENCES * 3, 300, name="tiny")
    _check_layout(tok, 300)
    assert tok.name == "tiny"
    fast = FastTokenizer(tok)
    for text in SENTENCES + UNSEEN:
        ids = tok.encode(text)
        assert fast.encode(text) == ids
        assert tok.decode(ids) == text
        assert fast.decode(ids) == text
        assert all(0 <= i < 299 for i in ids)
    # training did something: the training text is much shorter than its bytes
    assert len(tok.encode(SENTENCES[0])) < len(SENTENCES[0].encode()) / 2


def test_tie_break_by_count_then_bytes():
    # pairs "a"+"b", " "+"c", "c"+"d" all occur twice: the smallest bytes go first,
    # then " c"+"d" (count 2, b" c" < b"a"), then "a"+"b"
    tok = train_bpe_from_texts(["ab cd ab cd"], 260)
    assert tok.merges == [("Ġ", "c"), ("Ġc", "d"), ("a", "b")]
    # a pair seen three times beats one seen twice, whatever its bytes
    tok = train_bpe_from_texts(["zz zz zz ab ab"], 258)
    assert tok.merges == [("z", "z")]


@pytest.mark.parametrize("seed", range(12))
def test_matches_naive_trainer(seed):
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "ab c", "xyz.!", "aé😀 "])
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(25)]
    text = " ".join(rng.choice(vocab) for _ in range(400))
    n = rng.randint(5, 120)
    tok = train_bpe_from_texts([text], 257 + n)
    expected = _naive_merges([text], n)
    got = [(tok.id_to_bytes[tok.vocab[a]], tok.id_to_bytes[tok.vocab[b]]) for a, b in tok.merges]
    assert got == expected
    fast = FastTokenizer(tok)
    assert fast.encode(text) == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_endoftext_in_training_text_is_a_boundary():
    docs = ["alpha beta gamma", "delta epsilon", "alpha gamma delta"] * 40
    tok = train_bpe_from_texts([EOT.join(docs) + EOT + EOT], 400)
    learned = [tok.id_to_bytes[i] for i in range(256, tok.eot_id)]
    for frag in (b"<|", b"|>", b"endo", b"text", b"of"):
        assert not any(frag in t for t in learned), frag
    assert tok.encode(EOT, allowed_special="all") == [tok.eot_id]
    assert tok.decode(tok.encode("gamma" + EOT + "delta")) == "gamma" + EOT + "delta"


def test_stops_early_when_no_pair_repeats(tmp_path, capsys):
    tok = train_bpe_from_texts(["hello hello"], 100_000)
    assert tok.train_stats.stopped_early
    assert tok.vocab_size == 257 + len(tok.merges) < 300
    assert tok.eot_id == tok.vocab_size - 1
    _check_layout(tok, tok.vocab_size)
    src = tmp_path / "in.txt"
    src.write_text("hello hello", encoding="utf-8")
    train_bpe_to_dir([str(src)], tmp_path / "tok", vocab_size=100_000, progress=False)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "stopped early" in out


@pytest.mark.parametrize("bad", [0, 100, 256, 10**9])
def test_vocab_size_out_of_range(bad):
    with pytest.raises(UserError, match="257"):
        train_bpe_from_texts(SENTENCES, bad)


def test_empty_text_is_user_error():
    with pytest.raises(UserError, match="empty"):
        train_bpe_from_texts(["", EOT], 300)


def test_inputs_files_jsonl_max_chars(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(SENTENCES), encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(reversed(SENTENCES)))
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for s in SENTENCES:
            f.write(json.dumps({"body": s}) + "\n")
    tok = train_bpe([str(tmp_path)], 320, text_field="body", progress=False)
    _check_layout(tok, 320)
    assert tok.train_stats.files == 3
    limited = train_bpe([str(tmp_path / "a.txt")], 320, max_chars=50, progress=False)
    assert limited.train_stats.chars == 50
    with pytest.raises(UserError, match="does not exist"):
        train_bpe([str(tmp_path / "missing.txt")], 300, progress=False)


# ------------------------------------------------------------------ real text


def test_shakespeare_layout_and_common_words(shakespeare_tok):
    tok = shakespeare_tok
    _check_layout(tok, 1000)
    for word in (" the", " and", " to", " of", " my", " that", " you"):
        assert len(tok.encode(word)) == 1, word
    # better compression than raw bytes by a wide margin
    sample = "To be, or not to be, that is the question."
    assert len(tok.encode(sample)) < len(sample) / 2.5


def test_shakespeare_fast_equals_slow_on_unseen_text(shakespeare_tok, shakespeare_300k, shared_data):
    fast = FastTokenizer(shakespeare_tok)
    with gzip.open(shared_data / "corpora" / "austen" / "emma.txt.gz", "rt", encoding="utf-8") as f:
        unseen = f.read(100_000)
    for text in [unseen, shakespeare_300k[:50_000], *UNSEEN, " ".join(UNSEEN)]:
        ids = shakespeare_tok.encode_ordinary(text)
        assert fast.encode_ordinary(text) == ids
        assert shakespeare_tok.decode(ids) == text
        assert fast.decode(ids) == text


def test_deterministic_and_loads_both_ways(shakespeare_300k, tmp_path, capsys):
    src = tmp_path / "shakespeare.txt"
    src.write_text(shakespeare_300k, encoding="utf-8")
    for run in ("one", "two"):
        train_bpe_to_dir([str(src)], tmp_path / run / "tok", vocab_size=700, progress=False)
    first = (tmp_path / "one" / "tok" / TOKENIZER_FILE).read_bytes()
    assert first == (tmp_path / "two" / "tok" / TOKENIZER_FILE).read_bytes()
    summary = capsys.readouterr().out.splitlines()
    assert len(summary) == 2 and "vocab 700" in summary[0] and "443 merges" in summary[0]
    assert json.loads(first)["name"] == "tok"  # the out dir's name

    slow = get_tokenizer(tmp_path / "one" / "tok", fast=False)
    fast = get_tokenizer(tmp_path / "one" / "tok")
    assert isinstance(fast, FastTokenizer) and not isinstance(slow, FastTokenizer)
    assert fast.fingerprint == slow.fingerprint
    text = shakespeare_300k[-20_000:] + " ".join(UNSEEN)
    assert fast.encode(text) == slow.encode(text)
    assert slow.vocab_size == fast.vocab_size == 700 and slow.eot_id == 699


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(" ".join(SENTENCES), encoding="utf-8")
    out = tmp_path / "tok"
    train_bpe_to_dir([str(src)], out, vocab_size=280, progress=False)
    before = (out / TOKENIZER_FILE).read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        train_bpe_to_dir([str(src)], out, vocab_size=290, progress=False)
    assert (out / TOKENIZER_FILE).read_bytes() == before
    tok = train_bpe_to_dir([str(src)], out, vocab_size=290, progress=False, overwrite=True)
    assert get_tokenizer(out).vocab_size == tok.vocab_size == 290


# ------------------------------------------------------------------ CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True,
                          timeout=120)


def _assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in r.stderr


def test_cli_train_end_to_end(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES * 4), encoding="utf-8")
    out = tmp_path / "mytok"
    r = _cli("tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "vocab 300" in r.stdout
    assert (out / TOKENIZER_FILE).is_file()
    assert [p.name for p in out.iterdir()] == [TOKENIZER_FILE]  # no temporary file left
    tok = get_tokenizer(out)
    assert tok.name == "mytok" and tok.vocab_size == 300
    r = _cli("tokenizer", "encode", "--tokenizer", str(out), "--text", SENTENCES[0])
    assert r.returncode == 0 and json.loads(r.stdout) == tok.encode(SENTENCES[0])

    # existing output without --overwrite: refused, file untouched; with it: replaced
    before = (out / TOKENIZER_FILE).read_bytes()
    r = _cli("tokenizer", "train", "--input", str(src), "--vocab-size", "280", "--out", str(out))
    _assert_one_line_error(r, "--overwrite")
    assert (out / TOKENIZER_FILE).read_bytes() == before
    r = _cli("tokenizer", "train", "--input", str(src), "--vocab-size", "280", "--out", str(out),
             "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert get_tokenizer(out).vocab_size == 280


def test_cli_train_errors_leave_nothing(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(" ".join(SENTENCES), encoding="utf-8")
    out = tmp_path / "out"
    r = _cli("tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
             "--out", str(out))
    _assert_one_line_error(r, "missing.txt")
    assert not out.exists()
    r = _cli("tokenizer", "train", "--input", str(src), "--vocab-size", "100", "--out", str(out))
    _assert_one_line_error(r, "257")
    assert not out.exists()
