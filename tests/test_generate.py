"""Sampling, the KV cache, the context window, batches, streaming text, and the generate/chat commands.

The models are tiny and random. With GPT-2's init (std 0.02) a random model
predicts the same token forever, which would make "greedy output is identical"
say little; scaling the weights up gives outputs that move around (checked in
test_test_model_is_not_degenerate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lab
import gpt2lab.generate as gen
from gpt2lab.checkpoint import write_run_config
from gpt2lab.generate import check_settings, generate, generate_batch, sample_next, stream, stream_answer
from gpt2lab.model.cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.templates import encode_messages, get_format
from gpt2lab.text import StreamDecoder
from gpt2lab.weights import save_weights

VOCAB, BLOCK = 97, 32


def lively(vocab_size: int = VOCAB, block_size: int = BLOCK, seed: int = 0, **kw) -> GPT:
    """A tiny random GPT whose greedy output is not one token repeated."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0 if name in ("transformer.wte.weight", "transformer.wpe.weight") else 20.0)
    return model



@pytest.fixture(scope="module")
def model() -> GPT:
    return lively()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    """|a - b| <= atol everywhere (torch.testing.assert_close costs seconds of imports on first use)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"max |difference| {diff:.3g} > {atol}"


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole window through the model at every step, no cache,
    with generate.py's context policy (past block_size, keep the newest block_size // 2 and go on)."""
    block, keep = model.config.block_size, model.config.block_size // 2
    context, out = list(prompt), []
    start = max(0, len(context) - block)
    with torch.no_grad():
        for _ in range(n):
            if len(context) - start > block:
                start = len(context) - keep
            token = int(model(torch.tensor([context[start:]]))[0, -1].argmax())
            out.append(token)
            context.append(token)
    return out


def test_test_model_is_not_degenerate(model):
    out = generate(model, [1, 2, 3, 4, 5], max_new_tokens=40, temperature=0)
    assert len(set(out)) >= 8, out
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (1, 20)))
    assert logits.abs().max() < 50  # small enough for 1e-5 comparisons in fp32


# ----------------------------------------------------------------------------- the KV cache


def test_cache_logits_equal_full_recompute_at_every_step(model):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache, cache_last = KVCache(model.config, 2), KVCache(model.config, 2)
        pos, pointers = 0, set()
        # a prefill, a second (chunked) prefill, single tokens, then a chunk again
        for size in [7, 5, 1, 1, 1, 3, 1, 1, 10]:
            chunk = ids[:, pos:pos + size]
            assert_close(model(chunk, kv_cache=cache), full[:, pos:pos + size], atol=1e-5)
            last = model(chunk, kv_cache=cache_last, last_only=True)
            assert last.shape == (2, 1, VOCAB)
            assert_close(last[:, 0], full[:, pos + size - 1], atol=1e-5)
            pos += size
            pointers.add(tuple(t.data_ptr() for layer in cache.layers for t in layer))
    assert pos == 30 and cache.pos == 30
    assert len(pointers) == 1  # preallocated: the buffers never move


def test_cache_refuses_to_overflow(model):
    cache = KVCache(model.config, 1, max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="holds 8 positions; 6 are used and 3 more"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        KVCache(model.config, 1, max_len=BLOCK + 1)


def test_cache_rows_of_different_lengths_equal_each_prompt_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])  # right-padded
    more = torch.tensor([[20, 21], [22, 23], [24, 25]])
    with torch.no_grad():
        cache = KVCache(model.config, 3)
        first = model(ids, kv_cache=cache)
        cache.rewind([len(p) for p in prompts])  # each row keeps its own tokens; the next go after them
        steps = []
        for i in range(2):
            steps.append(model(more[:, i:i + 1], kv_cache=cache))
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + more[b].tolist()]))[0]
            assert_close(first[b, :len(p)], alone[:len(p)], atol=1e-5)
            for i in range(2):
                assert_close(steps[i][b, 0], alone[len(p) + i], atol=1e-5)


def test_cache_buffers_follow_what_attention_stores(model):
    """The cache only stores: its buffers take the shape of what each layer writes."""
    cache = KVCache(model.config, 2, max_len=16)
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)
    c = model.config
    for layer in cache.layers:
        assert [tuple(t.shape) for t in layer] == [(2, c.n_head, 16, c.head_dim)] * 2
    assert cache.pos == 5
    cache.reset()
    assert cache.pos == 0 and cache.layers[0] is not None


def test_decoding_step_sees_changed_weights(model):
    m = lively(seed=3)
    prompt = [1, 2, 3]
    before = generate(m, prompt, max_new_tokens=12, temperature=0)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight.mul_(-1.5)
    after = generate(m, prompt, max_new_tokens=12, temperature=0)
    assert after == generate(m, prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert after != before


class Shifted(torch.nn.Linear):
    """A linear layer that adds 0.5: a stand-in for any wrapped layer (LoRA adapters, say)."""

    def forward(self, x):
        return super().forward(x) + 0.5


def test_models_with_other_layers_decode_through_their_forward():
    m = lively(seed=4)
    prompt = [1, 2, 3]
    plain = generate(m, prompt, max_new_tokens=12, temperature=0)
    old = m.transformer.h[1].mlp.c_fc
    m.transformer.h[1].mlp.c_fc = Shifted(old.in_features, old.out_features)
    m.transformer.h[1].mlp.c_fc.load_state_dict(old.state_dict())
    shifted = generate(m, prompt, max_new_tokens=12, temperature=0)
    assert shifted == generate(m, prompt, max_new_tokens=12, temperature=0, use_cache=False) != plain
    assert generate_batch(m, [prompt, [4]], 12, temperature=0) == \
        [shifted, generate(m, [4], 12, temperature=0, use_cache=False)]
    # and a hook is honoured too
    m.transformer.h[1].mlp.c_fc = old
    m.transformer.h[0].register_forward_hook(lambda mod, args, out: out * 1.5)
    hooked = generate(m, prompt, max_new_tokens=12, temperature=0)
    assert hooked == generate(m, prompt, max_new_tokens=12, temperature=0, use_cache=False) != plain


def test_a_model_made_under_inference_mode(model):
    with torch.inference_mode():
        m = lively()
    prompt = [3, 5, 7]
    expected = generate(model, prompt, 10, temperature=0)
    assert generate(m, prompt, 10, temperature=0) == expected
    with torch.inference_mode():
        m.transformer.h[0].mlp.c_fc.weight.mul_(-1.5)
    assert generate(m, prompt, 10, temperature=0) == generate(m, prompt, 10, temperature=0, use_cache=False)


@pytest.mark.parametrize("kw", [{"bias": False}, {"pad_vocab_multiple": 64}])
def test_other_model_configs_decode_the_same_with_and_without_cache(kw):
    m = lively(seed=6, **kw)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    alone = [generate(m, p, 12, temperature=0) for p in prompts]
    assert alone == [generate(m, p, 12, temperature=0, use_cache=False) for p in prompts]
    assert generate_batch(m, prompts, 12, temperature=0) == alone
    assert max(max(a) for a in alone) < VOCAB


def test_generation_under_cpu_autocast(model):
    """The trainer samples under autocast when it trains in bf16."""
    prompts = [[1, 2, 3], [4, 5]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = generate(model, prompts[0], 10, temperature=0.8, seed=0)
        two = generate_batch(model, prompts, 10, temperature=0)
    assert len(one) == 10 and [len(r) for r in two] == [10, 10]


def test_greedy_is_the_same_with_and_without_cache(model):
    prompt = [4, 8, 15, 16, 23, 42]
    cached = generate(model, prompt, max_new_tokens=24, temperature=0)
    assert cached == generate(model, prompt, max_new_tokens=24, temperature=0, use_cache=False)
    assert cached == greedy_reference(model, prompt, 24)
    assert len(set(cached)) > 3


def test_sliding_window_past_the_context(model):
    # 10 + 70 tokens pass a 32-token context twice: the cache is refilled from the newest 16
    prompt = list(range(10, 20))
    cached = generate(model, prompt, max_new_tokens=70, temperature=0)
    uncached = generate(model, prompt, max_new_tokens=70, temperature=0, use_cache=False)
    assert len(cached) == 70
    assert cached == uncached == greedy_reference(model, prompt, 70)
    # a prompt longer than the context keeps its last block_size tokens
    long_prompt = [int(t) for t in torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))]
    assert generate(model, long_prompt, max_new_tokens=20, temperature=0) == \
        generate(model, long_prompt[-BLOCK:], max_new_tokens=20, temperature=0)


def test_the_window_slide_is_what_changes_the_output(model):
    """Past the context, the output follows the half-context policy, not a window slid by one."""
    prompt = list(range(30, 40))
    ours = generate(model, prompt, max_new_tokens=60, temperature=0)
    context, by_one = list(prompt), []
    with torch.no_grad():
        for _ in range(60):
            token = int(model(torch.tensor([context[-BLOCK:]]))[0, -1].argmax())
            by_one.append(token)
            context.append(token)
    first_slide = BLOCK - len(prompt)  # the first token predicted from a slid window
    assert ours[:first_slide + 1] == by_one[:first_slide + 1]
    assert ours != by_one


# ----------------------------------------------------------------------------------- batches


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14, 15, 16, 17, 18], [7], [20, 21, 22, 23, 24, 25]]
    alone = [generate(model, p, max_new_tokens=16, temperature=0) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=16, temperature=0) == alone
    assert generate_batch(model, prompts, max_new_tokens=16, temperature=0, use_cache=False) == alone
    # stop ids that end the rows at different steps
    stops = {alone[0][3], alone[1][9]}
    expected = [generate(model, p, max_new_tokens=16, temperature=0, stop_ids=stops) for p in prompts]
    assert len({len(e) for e in expected}) >= 2, expected
    assert generate_batch(model, prompts, max_new_tokens=16, temperature=0, stop_ids=stops) == expected
    # a batch whose every row stops early stops there
    early = {alone[r][1] for r in range(4)}
    assert all(len(r) <= 1 for r in generate_batch(model, prompts, 16, temperature=0, stop_ids=early))


def test_batch_without_padding_and_batch_errors(model):
    prompts = [[1, 2, 3], [4, 5, 6]]
    assert generate_batch(model, prompts, 8, temperature=0) == \
        [generate(model, p, 8, temperature=0) for p in prompts]
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [[1], []], 4)
    with pytest.raises(ValueError, match=r"\(30 tokens\) plus max_new_tokens \(3\)"):
        generate_batch(model, [[1] * 30], 3)
    assert generate_batch(model, prompts, 0) == [[], []]


def test_seeded_batch_sampling_is_reproducible(model):
    prompts = [[1, 2], [3, 4, 5, 6]]
    a = generate_batch(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    assert a == generate_batch(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    assert a != generate_batch(model, prompts, 12, temperature=1.0, top_k=20, seed=4)


# ---------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    prompt = [1, 2, 3]
    a = generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=1)
    assert a == generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=1)
    assert a == generate(model, prompt, max_new_tokens=20, temperature=1.0,
                         generator=torch.Generator().manual_seed(1))
    assert a != generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=2)
    assert a == generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=1, use_cache=False)
    b = generate(model, prompt, max_new_tokens=20, temperature=0.9, top_k=10, top_p=0.9, seed=5)
    assert b == generate(model, prompt, max_new_tokens=20, temperature=0.9, top_k=10, top_p=0.9, seed=5)


def test_top_k_1_and_a_tiny_top_p_are_greedy(model):
    prompt = [5, 6, 7]
    greedy = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert generate(model, prompt, max_new_tokens=20, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, prompt, max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=0) == greedy
    assert generate(model, prompt, max_new_tokens=20, temperature=1.5, seed=0) != greedy


PROBS = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])


def frequencies(n: int = 20000, **kw) -> torch.Tensor:
    logits = PROBS.log().expand(n, -1)
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=len(PROBS)).float() / n


@pytest.mark.parametrize("kw,allowed", [
    ({}, [0, 1, 2, 3, 4]),
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_p": 0.5}, [0, 1]),  # 0.4 is not enough, 0.4 + 0.3 is
    ({"top_p": 0.75}, [0, 1, 2]),
    ({"top_p": 0.95}, [0, 1, 2, 3]),
    ({"top_k": 3, "top_p": 0.6}, [0, 1]),
    ({"top_k": 2, "top_p": 0.95}, [0, 1]),
])
def test_top_k_and_top_p_sample_only_the_allowed_tokens(kw, allowed):
    freq = frequencies(**kw)
    outside = [i for i in range(len(PROBS)) if i not in allowed]
    assert freq[outside].sum() == 0
    # the allowed tokens keep their relative probabilities
    expected = PROBS[allowed] / PROBS[allowed].sum()
    assert_close(freq[allowed], expected, atol=0.02)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        expected = PROBS ** (1 / t) / (PROBS ** (1 / t)).sum()
        assert_close(frequencies(temperature=t), expected, atol=0.02)
    assert sample_next(PROBS.log()[None], temperature=0).tolist() == [0]


BAD_SETTINGS = [
    ({"max_new_tokens": -1}, r"max_new_tokens.*-1"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens.*2\.5"),
    ({"temperature": -0.5}, r"temperature.*-0\.5"),
    ({"temperature": float("nan")}, r"temperature.*nan"),
    ({"top_k": 0}, r"top_k.*got 0"),
    ({"top_p": 0.0}, r"top_p.*0\.0"),
    ({"top_p": 1.5}, r"top_p.*1\.5"),
    ({"top_p": -0.1}, r"top_p.*-0\.1"),
]


@pytest.mark.parametrize("bad,message", BAD_SETTINGS)
def test_invalid_settings_raise_naming_the_value(model, bad, message):
    kw = {"max_new_tokens": 5, "temperature": 1.0, "top_k": None, "top_p": None, **bad}
    with pytest.raises(ValueError, match=message):
        check_settings(**kw)
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], **kw)
    with pytest.raises(ValueError, match=message):
        stream(model, [1, 2], **kw)  # at the call, before any token is asked for
    with pytest.raises(ValueError, match=message):
        generate_batch(model, [[1, 2]], **kw)


def test_empty_prompt_starts_from_end_of_text(model):
    eot = VOCAB - 1
    assert list(stream(model, [], 12, temperature=0, start_id=eot)) == \
        list(stream(model, [eot], 12, temperature=0))
    with pytest.raises(ValueError, match="prompt is empty"):
        stream(model, [], 12)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 12)


def test_stops_at_end_of_text_stop_ids_and_max_new_tokens(model):
    prompt = [2, 7, 1, 8]
    full = generate(model, prompt, max_new_tokens=30, temperature=0)
    assert len(full) == 30 and generate(model, prompt, max_new_tokens=0) == []
    k = next(i for i in range(3, 30) if full[i] not in full[:i])  # a token's first appearance
    assert generate(model, prompt, max_new_tokens=30, temperature=0, eot_id=full[k]) == full[:k]
    assert generate(model, prompt, max_new_tokens=30, temperature=0, stop_ids=[full[k], 1000]) == full[:k]
    assert list(stream(model, prompt, 30, temperature=0, stop_ids={full[k]})) == full[:k]


def test_generation_leaves_the_model_in_its_mode(model):
    m = lively(seed=5)
    m.train()
    generate(m, [1, 2], 3, temperature=0)
    generate_batch(m, [[1, 2], [3]], 3, temperature=0)
    assert m.training
    m.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_and_bf16(model):
    m = lively().cuda()
    prompt = [1, 2, 3, 4]
    assert generate(m, prompt, 20, temperature=0) == generate(model, prompt, 20, temperature=0)
    assert generate(m, prompt, 20, temperature=0) == generate(m, prompt, 20, temperature=0, use_cache=False)
    out = generate(m.to(torch.bfloat16), prompt, 20, temperature=0.8, seed=0)
    assert len(out) == 20


# ------------------------------------------------------------------------------ text streams


@pytest.fixture(scope="module")
def gpt2_tok():
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


def test_stream_decoder_never_shows_half_a_character(gpt2_tok):
    text = "naïve café: 🙂👍🏽 日本語のテキスト, 한국어 🎉 Ωμέγα done"
    ids = gpt2_tok.encode(text)
    # the test means something: some tokens are parts of a character
    assert any("\ufffd" in gpt2_tok.decode([i]) for i in ids)
    decoder = StreamDecoder(gpt2_tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back until the character was whole
    assert "".join(pieces) == text == gpt2_tok.decode(ids)


def test_stream_decoder_equals_decode_on_any_ids(gpt2_tok):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, gpt2_tok.vocab_size, (60,), generator=g).tolist()
        decoder = StreamDecoder(gpt2_tok)
        assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == gpt2_tok.decode(ids)


def fake_stream(monkeypatch, tok, pieces: list[str]):
    """Make stream_answer's generator produce exactly these pieces, one token list each."""
    ids = [i for p in pieces for i in tok.encode(p)]

    def fake(*args, **kwargs):
        return iter(ids)

    monkeypatch.setattr(gen.decode, "stream", fake)


def test_stream_answer_stops_at_a_stop_string_across_tokens(monkeypatch, gpt2_tok):
    fake_stream(monkeypatch, gpt2_tok, ["The answer", " is", " 42", ".\n", "##", "# Instruction", " more"])
    pieces = list(stream_answer(None, gpt2_tok, "q", stop=["\n### "]))
    assert "".join(pieces) == "The answer is 42."
    assert not any("#" in p or "\n" in p for p in pieces)
    # streaming: the text came in more than one piece, as it was produced
    assert len(pieces) >= 3


def test_stream_answer_releases_what_only_looked_like_a_stop(monkeypatch, gpt2_tok):
    fake_stream(monkeypatch, gpt2_tok, ["one", " ##", " two", " #"])
    assert "".join(stream_answer(None, gpt2_tok, "q", stop=["###"])) == "one ## two #"
    fake_stream(monkeypatch, gpt2_tok, ["Hello", " wor", "ld"])
    assert "".join(stream_answer(None, gpt2_tok, "q", stop=["world"])) == "Hello "
    assert "".join(stream_answer(None, gpt2_tok, "q")) == "Hello world"


# ---------------------------------------------------------------------- run dirs and commands

TEXT = ("The quick brown fox jumps over the lazy dog. A café in Zürich serves crème brûlée. "
        "Hello world, hello there! Numbers: 1, 2, 3, 42. ") * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    tok = train_bpe_from_texts([TEXT], 300, name="tiny")
    out = tmp_path_factory.mktemp("gen") / "run"
    out.mkdir()
    model = lively(vocab_size=tok.vocab_size, block_size=64)
    write_run_config(out, model.config, tokenizer_identity=tok.identity())
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def alpaca_run_dir(run_dir, tmp_path_factory):
    import shutil

    out = tmp_path_factory.mktemp("gen") / "alpaca"
    shutil.copytree(run_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "template": "alpaca"}))
    return out


@pytest.fixture(scope="module")
def chat_run_dir(tmp_path_factory):
    """A run dir in the "chat" format with a context of 256 tokens: room for a few turns."""
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    tok = train_bpe_from_texts([TEXT], 300, name="tiny")
    out = tmp_path_factory.mktemp("gen") / "chat"
    out.mkdir()
    model = lively(vocab_size=tok.vocab_size, block_size=256)
    write_run_config(out, model.config, tokenizer_identity=tok.identity(), extra={"template": "chat"})
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


def test_load_round_trip(run_dir):
    from gpt2lab.tokenizer import load_tokenizer_file

    model, tok = gpt2lab.load(run_dir)
    assert not model.training
    assert tok.encode("hello café") == load_tokenizer_file(run_dir / "tokenizer.json").encode("hello café")
    again, _ = gpt2lab.load(str(run_dir), device="cpu")
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        assert_close(model(ids), again(ids), atol=0)
    reference = lively(vocab_size=tok.vocab_size, block_size=64)
    with torch.no_grad():
        assert_close(model(ids), reference(ids), atol=0)


def test_stream_answer_with_a_model_is_its_generate(run_dir):
    model, tok = gpt2lab.load(run_dir)
    ids = generate(model, tok.encode("Hello"), 15, temperature=0, eot_id=tok.eot_id)
    assert "".join(stream_answer(model, tok, "Hello", 15, temperature=0)) == tok.decode(ids)


# The command tests run `gpt2lab ...` in processes forked from one server process that has
# imported torch once: each command is a real process (own stdin, stdout, stderr, exit status)
# without paying seconds of imports each time.
_SERVER = r"""
import json, os, sys, traceback
import torch
import gpt2lab.checkpoint, gpt2lab.cli, gpt2lab.cli.generate, gpt2lab.generate  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path, flags in ((0, job["stdin"], os.O_RDONLY), (1, job["out"], os.O_WRONLY | os.O_CREAT),
                                (2, job["err"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, flags, 0o644), fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        code = 1
        try:
            torch.set_num_threads(1)
            gpt2lab.cli.main(job["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Command:
    def __init__(self, tmp: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("GPT2LAB_DEBUG", None)
        self.tmp, self.n, self.ready = tmp, 0, False
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        if not self.ready:
            assert self.proc.stdout.readline().strip() == "ready"
            self.ready = True
        self.n += 1
        paths = {k: self.tmp / f"job{self.n}.{k}" for k in ("stdin", "out", "err")}
        paths["stdin"].write_text(stdin, encoding="utf-8")
        job = {"argv": [str(a) for a in argv], **{k: str(p) for k, p in paths.items()}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return subprocess.CompletedProcess(argv, rc, paths["out"].read_text(encoding="utf-8"),
                                           paths["err"].read_text(encoding="utf-8"))

    def close(self):
        self.proc.stdin.close()
        self.proc.kill()  # nothing left to finish; exiting a process that loaded torch takes seconds
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def gpt2lab_cmd(tmp_path_factory):
    """Started with the module's first test, so the server imports torch while the others run."""
    cmd = Command(tmp_path_factory.mktemp("cmd"))
    yield cmd
    cmd.close()


GREEDY = ["--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]


def test_generate_command_streams_the_continuation(gpt2lab_cmd, run_dir, tmp_path):
    model, tok = gpt2lab.load(run_dir)
    expected = "".join(stream_answer(model, tok, "Hello world", 12, temperature=0))
    r = gpt2lab_cmd("generate", run_dir, "--prompt", "Hello world", *GREEDY)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "Hello world" + expected + "\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hello world", encoding="utf-8")
    r2 = gpt2lab_cmd("generate", run_dir, "--prompt-file", prompt_file, *GREEDY)
    assert (r2.returncode, r2.stdout) == (0, r.stdout)


def test_generate_command_samples_seeds_and_no_cache(gpt2lab_cmd, run_dir):
    args = ("generate", run_dir, "--prompt", "The", "--max-new-tokens", "15", "--temperature", "1.0")
    a = gpt2lab_cmd(*args, "--seed", "7", "--num-samples", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("--- sample 1 ---\nThe") and "\n--- sample 2 ---\nThe" in a.stdout
    first, second = a.stdout.split("--- sample 2 ---\n")
    assert first.removeprefix("--- sample 1 ---\n") != second  # seeds 7 and 8
    assert gpt2lab_cmd(*args, "--seed", "7", "--num-samples", "2").stdout == a.stdout
    assert gpt2lab_cmd(*args, "--seed", "7", "--no-cache").stdout == first.removeprefix("--- sample 1 ---\n")


@pytest.mark.parametrize("bad,word", [(["--top-p", "1.5"], "--top-p"), (["--top-p", "0"], "--top-p"),
                                      (["--temperature", "-1"], "--temperature"),
                                      (["--top-k", "0"], "--top-k"), (["--max-new-tokens", "-3"], "-3")])
def test_generate_command_rejects_bad_settings_in_one_line(gpt2lab_cmd, run_dir, bad, word):
    r = gpt2lab_cmd("generate", run_dir, "--prompt", "x", *bad)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0] and bad[1] in lines[0]


def test_generate_command_is_a_real_program(run_dir):
    """The installed entry point, in a process of its own (argument errors need no torch)."""
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "generate", str(run_dir), "--top-p", "1.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: argument --top-p: 1.5 must be in (0, 1]") and r.stderr.count("\n") == 1


def test_chat_once_answers_and_exits(gpt2lab_cmd, run_dir):
    model, tok = gpt2lab.load(run_dir)
    expected = "".join(stream_answer(model, tok, "Hello", 12, temperature=0))
    r = gpt2lab_cmd("chat", run_dir, "-p", "Hello", *GREEDY)
    assert (r.returncode, r.stdout, r.stderr) == (0, expected + "\n", "")


def test_chat_session_clear_and_quit(gpt2lab_cmd, run_dir):
    r = gpt2lab_cmd("chat", run_dir, *GREEDY, stdin="hello\n/clear\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert "base model" in r.stdout and "(history cleared)" in r.stdout
    assert r.stdout.count("> ") == 3  # hello, /clear, /quit: then it left
    r = gpt2lab_cmd("chat", run_dir, *GREEDY, stdin="hello\n")  # then end of input: Ctrl-D
    assert r.returncode == 0 and r.stdout.count("> ") == 2


def alpaca_prompt(tok, text: str) -> list[int]:
    return encode_messages(tok, [{"role": "user", "content": text}], "alpaca", add_generation_prompt=True)[0]


def test_chat_with_alpaca_template_prints_only_the_answer(gpt2lab_cmd, alpaca_run_dir):
    r = gpt2lab_cmd("chat", alpaca_run_dir, "-p", "Name a color.", *GREEDY)
    assert r.returncode == 0, r.stderr
    assert "Instruction" not in r.stdout and "Below is" not in r.stdout
    model, tok = gpt2lab.load(alpaca_run_dir)
    expected = "".join(stream_answer(model, tok, alpaca_prompt(tok, "Name a color."), 12, temperature=0,
                                     stop=get_format("alpaca").stop))
    assert r.stdout == expected + "\n"


def run_cli_in_process(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str]:
    import io

    from gpt2lab.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().out


def recording_stream_answer(monkeypatch, answers):
    """Replace the text generator: record each prompt (ids or text) and stop strings, answer from `answers`."""
    calls = []

    def fake(model, tok, prompt, *args, stop=(), **kwargs):
        calls.append((prompt, tuple(stop)))
        yield from answers[len(calls) - 1]

    monkeypatch.setattr(gen, "stream_answer", fake)
    return calls


def test_chat_puts_the_question_in_the_template(monkeypatch, capsys, alpaca_run_dir):
    calls = recording_stream_answer(monkeypatch, [["Blue", "."]])
    code, out = run_cli_in_process(monkeypatch, capsys, ["chat", alpaca_run_dir, "-p", "Name a color."])
    assert code == 0 and out == "Blue.\n"
    _, tok = gpt2lab.load(alpaca_run_dir)
    assert calls == [(alpaca_prompt(tok, "Name a color."), get_format("alpaca").stop)]
    assert "### Instruction:\nName a color.\n\n### Response:\n" in tok.decode(calls[0][0])


def test_chat_p_understands_newlines_and_tabs(monkeypatch, capsys, alpaca_run_dir):
    calls = recording_stream_answer(monkeypatch, [["ok"]])
    code, _ = run_cli_in_process(monkeypatch, capsys, ["chat", alpaca_run_dir, "-p", "Spell it.\\n\\tgarden"])
    assert code == 0
    _, tok = gpt2lab.load(alpaca_run_dir)
    assert "### Instruction:\nSpell it.\n\tgarden\n\n" in tok.decode(calls[0][0])
    assert "\\n" not in tok.decode(calls[0][0])


def test_chat_base_model_continues_the_history_until_cleared(monkeypatch, capsys, run_dir):
    calls = recording_stream_answer(monkeypatch, [[" one"], [" two"], [" three"]])
    code, out = run_cli_in_process(monkeypatch, capsys, ["chat", run_dir], stdin="a\nb\n/clear\nc\n")
    assert code == 0
    _, tok = gpt2lab.load(run_dir)
    assert [tok.decode(prompt) for prompt, _ in calls] == ["a", "a one\nb", "c"]
    assert " one\n" in out and " two\n" in out and "(history cleared)" in out


def chat_prompt(tok, messages) -> list[int]:
    return encode_messages(tok, messages, "chat", add_generation_prompt=True)[0]


def test_chat_instruction_model_keeps_the_conversation(monkeypatch, capsys, chat_run_dir):
    calls = recording_stream_answer(monkeypatch, [["Blue"], ["Red"], ["Green"]])
    code, _ = run_cli_in_process(monkeypatch, capsys, ["chat", chat_run_dir, "--max-new-tokens", "20"],
                                 stdin="First color?\nSecond color?\n/clear\nThird?\n")
    assert code == 0
    _, tok = gpt2lab.load(chat_run_dir)
    first = [{"role": "user", "content": "First color?"}]
    history = first + [{"role": "assistant", "content": "Blue"}, {"role": "user", "content": "Second color?"}]
    assert calls[0][0] == chat_prompt(tok, first)
    assert calls[1][0] == chat_prompt(tok, history)
    second = tok.decode(calls[1][0])
    assert second == ("### User:\nFirst color?\n\n### Assistant:\nBlue<|endoftext|>\n\n"
                      "### User:\nSecond color?\n\n### Assistant:\n")
    assert calls[2][0] == chat_prompt(tok, [{"role": "user", "content": "Third?"}])  # /clear forgot the rest


def test_chat_drops_the_oldest_turns_when_the_context_fills(monkeypatch, capsys, chat_run_dir):
    long = "word " * 10
    calls = recording_stream_answer(monkeypatch, [[f"answer {i}"] for i in range(8)])
    questions = "".join(f"{long}{i}\n" for i in range(8))
    code, _ = run_cli_in_process(monkeypatch, capsys, ["chat", chat_run_dir, "--max-new-tokens", "16"],
                                 stdin=questions)
    assert code == 0 and len(calls) == 8
    _, tok = gpt2lab.load(chat_run_dir)
    assert all(len(ids) <= 256 - 16 for ids, _ in calls)
    assert len(calls[1][0]) > len(calls[0][0])  # the second prompt still holds the first exchange
    last = tok.decode(calls[-1][0])
    assert f"{long}7" in last and f"{long}0\n" not in last  # the newest question kept, the oldest gone
    assert last.startswith("### User:\n")  # turns are dropped whole


def test_generate_with_a_template_shows_only_the_answer(monkeypatch, capsys, alpaca_run_dir):
    calls = recording_stream_answer(monkeypatch, [["Red"]])
    code, out = run_cli_in_process(monkeypatch, capsys, ["generate", alpaca_run_dir, "--prompt", "Color?"])
    assert (code, out) == (0, "Red\n")
    _, tok = gpt2lab.load(alpaca_run_dir)
    assert calls[0][0] == alpaca_prompt(tok, "Color?") and "\n### " in calls[0][1]
