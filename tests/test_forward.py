"""One forward pass: every way gpt2lab runs a model computes the same numbers.

For every model configuration the project supports, the training forward (the whole sequence at
once) equals a prefill followed by token-by-token decoding through the KV cache, a right-padded
batch row, packed multiple-choice scoring (evaluation) and the classifier's features. A new
architecture option adds its configuration to CONFIGS.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.evals.scoring import Request, score_requests
from gpt2lab.model.cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, GPTClassifier

VOCAB, BLOCK = 97, 48

LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False,
         "tie_embeddings": False}
CONFIGS = {
    "gpt2": {},
    "no-bias": {"bias": False},
    "padded-vocab": {"pad_vocab_multiple": 64},
    "dropout": {"dropout": 0.1},  # off in eval mode: the same numbers
    "one-head": {"n_head": 1},
    "rope": {"pos_embedding": "rope"},
    "yarn": {"pos_embedding": "rope", "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_context": 12},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk-norm": {"qk_norm": True},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2"},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "untied": {"tie_embeddings": False},
    "moe": {"n_experts": 4, "experts_per_token": 2},
    "moe-shared-bias": {"n_experts": 3, "experts_per_token": 1, "shared_expert": True, "moe_balance": "bias"},
    "mla": {"attention": "mla", "kv_lora_rank": 8},
    "mla-rope": {"attention": "mla", "pos_embedding": "rope", "kv_lora_rank": 8},
    "llama": LLAMA,
    "everything": {**LLAMA, "qk_norm": True, "mlp": "relu2", "n_experts": 2, "experts_per_token": 1,
                   "n_kv_head": 0, "attention": "mla"},
}


def make(kw: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 4, "n_embd": 32, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init: differences would show
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"max |difference| {diff:.3g} > {atol}"


@pytest.mark.parametrize("kw", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_path_computes_the_same_forward(kw):
    model = make(kw)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        full = model(ids)  # the training forward
        assert full.shape == (1, 30, VOCAB)

        # prefill, then one token at a time through the KV cache
        cache = KVCache(model.config, 1)
        decoded = [model(ids[:, :11], kv_cache=cache)]
        for t in range(11, 30):
            decoded.append(model(ids[:, t:t + 1], kv_cache=cache))
        assert_close(torch.cat(decoded, dim=1), full)

        # a row of a batch whose rows hold different numbers of tokens, decoded the same way: a right-padded
        # prefill, each row then keeping its own tokens, then one token per row after its own
        other = torch.randint(0, VOCAB, (1, 30))
        batch = torch.cat([torch.cat([ids[:, :15], torch.zeros(1, 5, dtype=torch.long)], 1), other[:, :20]], 0)
        cache = KVCache(model.config, 2)
        first = model(batch, kv_cache=cache)
        cache.rewind([15, 20])
        steps = [model(torch.stack([ids[0, t], other[0, t + 5]])[:, None], kv_cache=cache) for t in range(15, 25)]
        out = torch.cat(steps, dim=1)
        assert_close(torch.cat([first[0, :15], out[0]]), full[0, :25])
        assert_close(torch.cat([first[1], out[1]]), model(other)[0])

        # the classifier's features are the last position's hidden state
        classifier = GPTClassifier.from_lm(model, 3).eval()
        hidden = model.hidden_states(ids)
        assert_close(classifier.features(ids), hidden[:, -1])
        assert_close(classifier.features(ids[:, :12], torch.tensor([7])), hidden[:, 6])
        assert_close(model.head(hidden), full)

    # packed multiple-choice scoring: context once, each choice after it, one sequence
    logp = F.log_softmax(full[0].double(), dim=-1)
    choices = [ids[0, 10:14].tolist(), ids[0, 10:13].tolist(), ids[0, 10:11].tolist()]
    (scores,) = score_requests(model, [Request(ids[0, :10].tolist(), choices)], batch_size=1)
    for choice, score in zip(choices, scores):
        expected = sum(logp[9 + i, tok].item() for i, tok in enumerate(choice))
        assert math.isclose(score.logprob, expected, abs_tol=1e-4), (score.logprob, expected)
        assert score.greedy == all(int(full[0, 9 + i].argmax()) == tok for i, tok in enumerate(choice))
