"""Fast local inference: int8 weights (model/quantize.py), the compiled decoding step (generate/compiled.py)
and speculative decoding (generate/speculative.py). Each changes the speed; int8 changes the logits a
little, the other two change nothing: the same greedy tokens, the same sampling distribution."""

import math

import pytest
import torch
from test_generate import lively

from gpt2lab.generate import generate
from gpt2lab.generate.sampling import next_token_probs
from gpt2lab.generate.speculative import DraftModel, PromptLookup
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.quantize import Int8Linear, quantize
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.pretrain import pretrain
from gpt2lab.weights import unique_state_dict

# ----------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny model trained for a few hundred steps: its logits mean something, unlike a random model's."""
    out = tmp_path_factory.mktemp("int8") / "run"
    pretrain(TrainConfig(data=str(tiny_data), out=str(out), model="tiny", max_steps=150, batch_size=16, lr=3e-3,
                         warmup_steps=10, eval_every=150, sample_tokens=0, tensorboard=False, device="cpu",
                         log_every=150))
    return out


def test_int8_swaps_every_linear_layer_and_keeps_the_embedding(trained):
    import gpt2lab

    model, _ = gpt2lab.load(trained)
    embedding = model.transformer.wte.weight.detach().clone()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantize(model)
    assert linears and all(isinstance(model.get_submodule(n), Int8Linear) for n in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the LM head too
    assert torch.equal(model.transformer.wte.weight, embedding)  # the tied embedding stays as it was


def test_int8_logits_stay_close_to_fp32_on_a_trained_model(trained, tiny_data):
    import gpt2lab
    from gpt2lab.data.shards import load_tokens

    fp32, _ = gpt2lab.load(trained)
    int8, _ = gpt2lab.load(trained)
    quantize(int8)
    val = torch.from_numpy(load_tokens(tiny_data, "val")[:4 * 64 + 1].astype("int64"))
    x, y = val[:-1].view(4, 64), val[1:].view(4, 64)
    with torch.no_grad():
        a, b = fp32(x), int8(x)
    loss = [torch.nn.functional.cross_entropy(t.reshape(-1, t.size(-1)), y.reshape(-1)).item() for t in (a, b)]
    assert abs(loss[1] - loss[0]) / loss[0] < 0.01, loss  # held-out loss within 1%
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95  # greedy predictions agree
    # greedy continuations agree on most tokens
    prompt = val[:20].tolist()
    same = sum(u == v for u, v in zip(generate(fp32, prompt, 40, temperature=0),
                                      generate(int8, prompt, 40, temperature=0)))
    assert same >= 30


def test_generate_and_eval_take_quantize(trained, tiny_data, capsys):
    from gpt2lab import cli

    for argv in (["generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
                  "--device", "cpu", "--quantize", "int8"],
                 ["eval", str(trained), "--task", "loss", "--data", str(tiny_data), "--limit", "5", "--device",
                  "cpu", "--quantize", "int8", "--quiet"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(trained), "--quantize", "int4"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- the compiled step


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_and_compiles_once():
    from torch._dynamo.utils import counters

    from gpt2lab.generate.compiled import compiled_step

    model = lively(block_size=64)
    torch._dynamo.reset()
    counters.clear()
    for prompt, n in (([1, 2, 3], 40), ([5] * 10, 50), (list(range(30)), 90)):  # the last one slides
        assert generate(model, prompt, n, temperature=0, compile=True) == generate(model, prompt, n, temperature=0)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, whatever the cache's fill
    step = compiled_step(model, 1, 64)
    assert compiled_step(model, 1, 64) is step  # kept on the model


# ----------------------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("drafter", ["lookup", "draft-other", "draft-self"])
def test_speculative_greedy_is_plain_greedy(drafter):
    model = lively(block_size=64)
    make = {"lookup": lambda: PromptLookup(k=4), "draft-other": lambda: DraftModel(lively(block_size=64, seed=3), 3),
            "draft-self": lambda: DraftModel(model, 5)}[drafter]
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        prompt = torch.randint(0, 97, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(1, 100, (1,), generator=g))  # past the context of 64: the window slides
        d = make()
        assert generate(model, prompt, n, temperature=0, drafter=d) == generate(model, prompt, n, temperature=0)
        assert d.stats.tokens == n or d.stats.tokens < n  # counted
    d = DraftModel(model, 5)
    generate(model, [1, 2, 3], 40, temperature=0, drafter=d)
    assert d.stats.acceptance == 1.0 and d.stats.tokens_per_step > 4  # a model drafting for itself
    d = PromptLookup(k=4)
    generate(model, [7, 8, 9, 10] * 8, 30, temperature=0, drafter=d)
    assert d.stats.steps < 30  # guesses were kept


def _chi2_quantile(df: int, p: float = 0.999) -> float:
    """Wilson-Hilferty: the p-quantile of chi-square with df degrees of freedom."""
    z = {0.999: 3.0902}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("drafter,settings", [("draft", (1.0, None, None)), ("draft", (0.8, 4, 0.9)),
                                              ("lookup", (1.0, None, None))])
def test_speculative_sampling_follows_the_models_distribution(drafter, settings):
    """Two sampled tokens after a prompt: their frequencies over many draws against the exact p(x1) p(x2|x1)
    of the target, with its temperature, top-k and top-p (a chi-square test, rejecting at 0.1%)."""
    temperature, top_k, top_p = settings
    vocab = 6
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    draft_model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = [1, 2, 3, 1, 2]  # the lookup drafter guesses "3, 1" after the last "2"
    with torch.no_grad():
        p1 = next_token_probs(model(torch.tensor([prompt]))[0, -1], temperature, top_k, top_p)
        rows = torch.tensor([prompt + [x] for x in range(vocab)])
        p2 = next_token_probs(model(rows)[:, -1], temperature, top_k, top_p)
    expected = (p1[:, None] * p2).reshape(-1)
    n = 3000
    counts = torch.zeros(vocab * vocab)
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        d = DraftModel(draft_model, 2) if drafter == "draft" else PromptLookup(k=2)
        a, b = generate(model, prompt, 2, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                        drafter=d)
        counts[a * vocab + b] += 1
    keep = expected * n >= 5  # cells too rare for the test are pooled
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep] * n, (expected[~keep].sum() * n)[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        assert counts[~keep].sum() <= 5  # tokens of (near) zero probability are (nearly) never drawn
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_quantile(len(obs) - 1), (chi2, len(obs))


def test_a_quantized_model_has_no_weights_to_save(trained):
    import gpt2lab

    model, _ = gpt2lab.load(trained)
    before = set(unique_state_dict(model))
    quantize(model)
    assert not set(unique_state_dict(model)) >= before  # the int8 layers keep packed weights, not parameters
