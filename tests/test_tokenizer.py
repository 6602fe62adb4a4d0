"""GPT-2's tokenizer: the from-scratch encoder, the tiktoken fast path, and an independent reference.

The reference is tiktoken built offline from `gpt2.tiktoken` (a different file,
from a different package, than the encoder.json/vocab.bpe bundled with gpt2lab),
so agreement means both the algorithm and the vocabulary are right.
"""

import gzip
import hashlib
import inspect
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from gpt2lab.errors import UserError
from gpt2lab.tokenizer import GPT2_PATTERN, bytes_to_unicode, get_tokenizer
from gpt2lab.tokenizer.bpe import BPETokenizer

ASSETS = Path(__file__).resolve().parents[1] / "gpt2lab" / "assets" / "gpt2"
EOT = "<|endoftext|>"
SAMPLE_CHARS = 250_000

# the hashes tiktoken pins for OpenAI's gpt2 files (tiktoken_ext/openai_public.py)
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

HARD_TEXTS = [
    "",
    " ",
    "Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "trailing newline\n",
    "\n\n\nthree newlines, then text\n\n",
    "tabs\tand\t\ttabs \t mixed \t\n\t",
    "a      b        c\n        indented code\n    return x",
    "\r\n windows \r\n line endings \r\n",
    "   \n   \n\t\t\n",
    "digits 0 1 12 123 1234 12345 3.14159 2,718,281 -42 +7 1e10 0x1F",
    "long number 12345678901234567890123456789012345678901234567890",
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D JOHN'S",
    "rock 'n' roll, ''quoted'' and 'single' ' s 's",
    "café naïve résumé Ångström façade Zürich coöperate",
    "e\u0301 decomposed accents o\u0308",
    "日本語のテキストと中文文本，还有한국어。",
    "emoji 😀 🤖🚀 flags 🇫🇷🇯🇵 skin 👍🏽",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 zwj sequences",
    "mixed Русский English العربية עברית हिन्दी ελληνικά",
    "math ∑ ∫ √ ≠ ≤ ∞ and symbols © ® ™ § ¶ • …",
    "punctuation!!! ??? ... --- === *** ((())) [[]] {{}} <<<>>> ~~~ ```python```",
    "urls https://example.com/a?b=c&d=e#f and e-mail name@example.org",
    "before <|endoftext|> after",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>x<|endoftext|>",
    "almost <|endoftext| special <|endof",
    "\x00\x01 control \x7f chars \u200b zero width \ufeff bom",
    "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


@pytest.fixture(scope="module")
def slow():
    return get_tokenizer("gpt2", fast=False)


@pytest.fixture(scope="module")
def fast():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def ref_ranks(shared_data):
    return tiktoken.load.load_tiktoken_bpe(str(shared_data / "gpt2-tokenizer" / "gpt2.tiktoken"))


@pytest.fixture(scope="module")
def ref(ref_ranks):
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ref_ranks,
                             special_tokens={EOT: 50256})


def _corpus_samples(shared_data: Path) -> dict[str, str]:
    """The first ~250 KB of every corpus, and a few files of the Python docs."""
    corpora = shared_data / "corpora"
    samples = {}
    for path in sorted(corpora.rglob("*.txt.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            samples[str(path.relative_to(corpora))] = f.read(SAMPLE_CHARS)
    for path in sorted(corpora.rglob("*.tar.gz")):
        with tarfile.open(path) as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
            text, taken = "", 0
            for m in members[::40]:  # spread over the archive: tutorial, library, reference, ...
                text += tf.extractfile(m).read().decode("utf-8") + EOT
                taken += 1
                if len(text) > SAMPLE_CHARS:
                    break
            samples[f"{path.relative_to(corpora)} ({taken} files)"] = text
    return samples


# ------------------------------------------------------------------ ids


def test_hello_world_anchor(slow, fast, ref):
    assert slow.encode("Hello world") == [15496, 995]
    assert fast.encode("Hello world") == [15496, 995]
    assert ref.encode("Hello world") == [15496, 995]


def test_vocabulary_matches_independent_copy(slow, ref_ranks):
    # every token's bytes have the same id as in the .tiktoken file from another package
    ours = {b: i for i, b in slow.id_to_bytes.items() if i != slow.eot_id}
    assert len(ours) == len(ref_ranks) == 50256
    assert ours == ref_ranks


def test_every_corpus_identical_ids(slow, fast, ref, shared_data):
    samples = _corpus_samples(shared_data)
    names = " ".join(samples)
    assert "shakespeare.txt.gz" in names and "python-docs.tar.gz" in names and "austen/emma.txt.gz" in names
    assert len(samples) >= 13  # 6 novels, 6 other texts, the Python docs
    for name, text in samples.items():
        assert len(text) > 10_000, name
        expected = ref.encode_ordinary(text)
        assert slow.encode_ordinary(text) == expected, f"from-scratch encoder differs on {name}"
        assert fast.encode_ordinary(text) == expected, f"fast path differs on {name}"
        assert fast.encode(text) == expected, name
        assert slow.decode(expected) == text, name
        assert fast.decode(expected) == text, name
        # the ids are GPT-2's: a sanity bound on compression for these English texts
        assert 2.0 < len(text) / len(expected) < 6.0, name


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_hard_text_identical_ids_and_round_trip(slow, fast, ref, text):
    expected = ref.encode_ordinary(text)
    assert slow.encode_ordinary(text) == expected
    assert fast.encode_ordinary(text) == expected
    # by default a special token's text is ordinary text
    assert slow.encode(text) == expected
    assert fast.encode(text) == expected
    assert 50256 not in expected
    assert slow.decode(expected) == text
    assert fast.decode(expected) == text
    assert slow.decode_bytes(expected) == text.encode("utf-8")


def test_empty_string(slow, fast):
    assert slow.encode("") == [] and fast.encode("") == []
    assert slow.decode([]) == "" and fast.decode([]) == ""


def test_contractions_split_like_gpt2(slow):
    ids = slow.encode("it's")
    assert [slow.decode([i]) for i in ids] == ["it", "'s"]
    # only lower-case contractions are special in GPT-2's regex
    upper = [slow.decode([i]) for i in slow.encode("IT'S")]
    assert upper[-1] != "'S" and "".join(upper) == "IT'S"


def test_whitespace_runs_keep_last_space_for_next_word(slow):
    pieces = [slow.decode([i]) for i in slow.encode("a   b")]
    assert "".join(pieces) == "a   b"
    assert pieces[-1] == " b"


def test_batch_matches_single(slow, fast):
    texts = HARD_TEXTS[:12]
    expected = [slow.encode(t) for t in texts]
    assert slow.encode_batch(texts) == expected
    assert fast.encode_batch(texts) == expected


# ------------------------------------------------------------------ special tokens


def test_eot_and_vocab_size(slow, fast):
    for tok in (slow, fast):
        assert tok.eot_id == 50256
        assert tok.vocab_size == 50257
        assert tok.special_tokens == {EOT: 50256}
        assert tok.decode([50256]) == EOT


@pytest.mark.parametrize("text", [
    "before <|endoftext|> after",
    "<|endoftext|>",
    "a<|endoftext|>b<|endoftext|><|endoftext|>c",
    "no special here",
    "",
])
@pytest.mark.parametrize("allowed", ["all", {EOT}, frozenset([EOT])])
def test_allowed_special_like_tiktoken(slow, fast, ref, text, allowed):
    expected = ref.encode(text, allowed_special=allowed)
    assert slow.encode(text, allowed_special=allowed) == expected
    assert fast.encode(text, allowed_special=allowed) == expected
    assert expected.count(50256) == text.count(EOT)
    assert slow.decode(expected) == text


def test_special_text_is_ordinary_by_default(slow, fast, ref):
    text = "x <|endoftext|> y"
    assert slow.encode(text) == fast.encode(text) == ref.encode_ordinary(text)
    assert 50256 not in slow.encode(text)
    assert 50256 in slow.encode(text, allowed_special="all")


@pytest.mark.parametrize("allowed", [{"<|im_start|>"}, {EOT, "<|pad|>"}, ["endoftext"]])
def test_unknown_special_raises(slow, fast, allowed):
    for tok in (slow, fast):
        with pytest.raises(ValueError, match="unknown special"):
            tok.encode("hello", allowed_special=allowed)


# ------------------------------------------------------------------ decode errors


@pytest.mark.parametrize("bad", [50257, 10**9, -1])
def test_decode_invalid_id_names_it(slow, fast, bad):
    for tok in (slow, fast):
        with pytest.raises(ValueError, match=rf"token id {bad}\b"):
            tok.decode([15496, bad])


def test_decode_partial_utf8_is_replaced(slow, fast):
    ids = slow.encode("😀")
    assert len(ids) > 1  # an emoji takes several byte-level tokens
    for tok in (slow, fast):
        assert tok.decode_bytes(ids[:1]) == "😀".encode()[: len(tok.decode_bytes(ids[:1]))]
        assert "\ufffd" in tok.decode(ids[:1])
        assert tok.decode(ids) == "😀"


# ------------------------------------------------------------------ assets and loading


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_assets_match_tiktoken_pins():
    assert _sha256(ASSETS / "encoder.json") == ENCODER_JSON_SHA256
    assert _sha256(ASSETS / "vocab.bpe") == VOCAB_BPE_SHA256
    # the constants above are the ones tiktoken itself pins for "gpt2"
    import tiktoken_ext.openai_public as openai_public

    source = inspect.getsource(openai_public.gpt2)
    assert ENCODER_JSON_SHA256 in source and VOCAB_BPE_SHA256 in source


def test_bundled_assets_equal_shared_copy(shared_data):
    for name in ("encoder.json", "vocab.bpe"):
        assert _sha256(ASSETS / name) == _sha256(shared_data / "gpt2-tokenizer" / name)


def test_unknown_name_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer at"):
        get_tokenizer("gpt3-does-not-exist")
    with pytest.raises(UserError):
        get_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError):
        get_tokenizer(tmp_path)  # a directory without tokenizer.json


def _doc(**fields) -> str:
    base = {"format": "gpt2lab-bpe", "version": 1, "name": "t", "pattern": GPT2_PATTERN,
            "special_tokens": {EOT: 256}, "vocab": _BYTE_VOCAB, "merges": []}
    base.update(fields)
    return json.dumps(base)


_BYTE_VOCAB = {bytes_to_unicode()[b]: b for b in range(256)}


@pytest.mark.parametrize("content", [
    "{not json",
    b"\xff\xfe not utf-8",
    "",
    json.dumps({"format": "something-else"}),
    json.dumps({"format": "gpt2lab-bpe", "version": 99}),
    json.dumps({"format": "gpt2lab-bpe", "version": 1, "vocab": {}}),
    _doc(merges=["Ġt"]),
    _doc(vocab=[1, 2]),
    json.dumps([1, 2, 3]),
    _doc(merges=[5]),
    _doc(pattern="(unclosed"),
    _doc(vocab={"a": 0}),
    _doc(merges=["Ġ t"]),
])
@pytest.mark.parametrize("fast_path", [True, False])
def test_corrupt_tokenizer_file_is_user_error_naming_it(tmp_path, content, fast_path):
    path = tmp_path / "tokenizer.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        get_tokenizer(tmp_path, fast=fast_path)
    assert str(path.resolve()) in str(info.value)
    assert "\n" not in str(info.value)


def test_save_and_reload_same_ids(slow, tmp_path):
    slow.save(tmp_path)
    again = get_tokenizer(tmp_path, fast=False)
    assert isinstance(again, BPETokenizer)
    assert again.fingerprint == slow.fingerprint
    text = " ".join(HARD_TEXTS)
    assert again.encode(text) == slow.encode(text)
    assert get_tokenizer(tmp_path).encode(text) == slow.encode(text)


# ------------------------------------------------------------------ CLI


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_encode_hello_world():
    r = _cli("tokenizer", "encode", "--text", "Hello world")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [15496, 995]


def test_cli_encode_slow_stdin_and_decode():
    r = _cli("tokenizer", "encode", "--slow", "--allow-special", stdin="Hello world<|endoftext|>")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [15496, 995, 50256]
    r = _cli("tokenizer", "decode", "--ids", "[15496, 995]")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello world\n"


def test_cli_unknown_tokenizer_is_one_line_error(tmp_path):
    r = _cli("tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"), "--text", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- hostile or corrupt tokenizer files

def _gpt2_dict():
    import copy

    return copy.deepcopy(get_tokenizer("gpt2", fast=False).to_dict())


@pytest.mark.parametrize("change,message", [
    (lambda d: d["special_tokens"].update({EOT: 5}), "also the id of another token"),
    (lambda d: d["special_tokens"].update({EOT: 10**9}), "ids must be integers"),
    (lambda d: d["special_tokens"].update({"": 50257}), "empty or non-text special token"),
    (lambda d: d["vocab"].update({"Ġthe": -5}), "has id -5"),
    (lambda d: d["vocab"].update({"Ġthe": 1}), "same id to two tokens"),
    (lambda d: d.update(pattern=r"\w+"), "drops text"),
    (lambda d: d["special_tokens"].update({"<|x|>": 900_000}), "contiguous"),
])
def test_hostile_tokenizer_files_are_refused(tmp_path, change, message):
    """A tokenizer.json that no training could have made is one clear error, before it is used."""
    d = _gpt2_dict()
    change(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match=message):
        BPETokenizer.from_file(path)


def test_cli_encode_with_a_hostile_tokenizer_is_one_line_not_a_hang(tmp_path):
    d = _gpt2_dict()
    d["special_tokens"][""] = 50257  # once made `--allow-special` search for "" forever
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "tokenizer", "encode", "--tokenizer", str(tmp_path),
                        "--allow-special", "--text", "hello"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
