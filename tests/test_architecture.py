"""The options of newer models: RoPE and YaRN, RMSNorm, QK-norm, SwiGLU and ReLU², GQA, an untied head,
a mixture of experts, multi-head latent attention, and Muon. Each trains, and each computes what it
claims (tests/test_forward.py checks that every path through the model agrees for each of them)."""

import math

import pytest
import torch

from gpt2lab.errors import UserError
from gpt2lab.model.cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, MLP
from gpt2lab.model.options import MoE, Rotary, apply_rotary, collect_moe, yarn_frequencies
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.optim import CombinedOptimizer, make_optimizer, zeropower
from gpt2lab.train.plan import count_params, flops_per_token
from gpt2lab.train.pretrain import pretrain

OPTIONS = {
    "rope": dict(pos_embedding="rope"),
    "rmsnorm+qk_norm": dict(norm="rmsnorm", qk_norm=True),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "gqa": dict(n_kv_head=1),
    "untied": dict(tie_embeddings=False),
    "moe": dict(n_experts=4, experts_per_token=2),
    "moe-bias": dict(n_experts=4, experts_per_token=1, moe_balance="bias", shared_expert=True),
    "mla": dict(attention="mla", pos_embedding="rope"),
    "muon": dict(optimizer="muon"),
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_each_option_trains_and_its_loss_falls(tiny_data, tmp_path, options):
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model="tiny", block_size=32, batch_size=8,
                      max_steps=40, lr=1e-2, warmup_steps=4, eval_every=1000, eval_batches=2, log_every=10,
                      checkpoint_every=1000, tensorboard=False, device="cpu", dtype="fp32", sample_tokens=0,
                      **options)
    result = pretrain(cfg)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    if "n_experts" in options:  # the router's load and its balancing loss are logged
        import json

        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "moe_max_load" in r]
        assert logged and all(1.0 <= r["moe_max_load"] <= 4.0 and r["moe_aux"] > 0 for r in logged)


def model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 50, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32,
                            **kw})).eval()


def test_gqa_shares_each_key_value_head_among_its_group_of_query_heads():
    """A GQA model equals a multi-head model whose key/value heads are copies, head h using head h // 2."""
    gqa = model(n_kv_head=2)
    mha = model()
    D, H = 8, 4
    with torch.no_grad():
        mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if "c_attn" not in k}, strict=False)
        for a, b in zip(gqa.transformer.h, mha.transformer.h):
            q, k, v = a.attn.c_attn.weight.split([H * D, 2 * D, 2 * D])
            qb, kb, vb = a.attn.c_attn.bias.split([H * D, 2 * D, 2 * D])
            widen = lambda t: t.view(2, D, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(H * D, *t.shape[1:])
            b.attn.c_attn.weight.copy_(torch.cat([q, widen(k), widen(v)]))
            b.attn.c_attn.bias.copy_(torch.cat([qb, widen(kb), widen(vb)]))
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=0)
    assert count_params(gqa) < count_params(mha)
    # n_kv_head = n_head is plain multi-head attention
    assert model(n_kv_head=4).state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (3 * 32, 32)


def test_rope_scores_depend_only_on_relative_positions():
    cfg = GPTConfig(pos_embedding="rope", n_embd=32, n_head=2)
    rotary = Rotary(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cq, sq = rotary(torch.tensor([m]))
        ck, sk = rotary(torch.tensor([n]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    for shift in (1, 7, 100):
        assert score(5, 2) == pytest.approx(score(5 + shift, 2 + shift), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_yarn_with_factor_1_is_plain_rope_and_stretches_long_wavelengths():
    plain, _ = Rotary(GPTConfig(pos_embedding="rope", n_embd=64, n_head=1)).inv_freq, None
    same, temperature = yarn_frequencies(64, 10000.0, 1.0, 256)
    torch.testing.assert_close(same, plain)
    assert temperature == 1.0
    stretched, temperature = yarn_frequencies(64, 10000.0, 4.0, 256)
    assert stretched[0] == pytest.approx(plain[0].item())  # the fastest rotation is kept (local order)
    assert stretched[-1] == pytest.approx(plain[-1].item() / 4, rel=1e-6)  # the slowest is interpolated
    assert temperature == pytest.approx(0.1 * math.log(4) + 1)
    a = model(pos_embedding="rope", rope_scaling="yarn", rope_factor=1.0)
    b = model(pos_embedding="rope")
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)


def test_moe_with_one_expert_is_the_dense_mlp():
    cfg = GPTConfig(n_embd=32, n_head=4, n_experts=1, experts_per_token=1)
    torch.manual_seed(0)
    moe, dense = MoE(cfg, MLP), MLP(cfg)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 32)
    with collect_moe() as stats:  # (a module is in training mode when built)
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=0)
    assert stats.aux_loss().item() == pytest.approx(1.0)  # one expert: perfectly balanced


def test_moe_routes_each_token_to_its_best_experts_and_balances_with_a_bias():
    cfg = GPTConfig(n_embd=32, n_head=4, n_experts=4, experts_per_token=2, moe_balance="bias")
    torch.manual_seed(0)
    moe = MoE(cfg, MLP)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = moe(x)
        flat = x.reshape(-1, 32)
        scores = moe.router(flat).softmax(-1)
        top = scores.topk(2, dim=-1)
        expected = torch.zeros_like(flat)
        for n in range(flat.size(0)):  # token by token, the slow way
            w = top.values[n] / top.values[n].sum()
            for j in range(2):
                expected[n] += w[j] * moe.experts[int(top.indices[n, j])](flat[n:n + 1])[0]
    torch.testing.assert_close(out.reshape(-1, 32), expected, atol=1e-5, rtol=0)
    moe.train()
    moe.route_bias.zero_()
    with collect_moe() as stats:
        moe(x)
    load = stats.loads[0]
    moe.update_bias(load)
    assert torch.equal(moe.route_bias > 0, load < load.mean())  # the underused experts are favoured next time


def test_mla_cache_holds_the_latent():
    m = model(attention="mla", pos_embedding="rope", kv_lora_rank=6, mla_rope_dim=4)
    cache = KVCache(m.config, 2, max_len=20)
    with torch.no_grad():
        m(torch.randint(0, 50, (2, 9)), kv_cache=cache)
    for latent, rope_key in cache.layers:
        assert latent.shape == (2, 1, 20, 6) and rope_key.shape == (2, 1, 20, 4)
    mha = model()
    mha_cache = KVCache(mha.config, 2, max_len=20)
    with torch.no_grad():
        mha(torch.randint(0, 50, (2, 9)), kv_cache=mha_cache)
    per_token = lambda c: sum(t[0, :, 0].numel() for layer in c.layers for t in layer)
    assert per_token(cache) == 2 * (6 + 4) and per_token(mha_cache) == 2 * 2 * 32  # 10 numbers a token, not 64


def test_flops_count_the_experts_a_token_runs():
    dense = model(mlp="relu2")
    moe = model(mlp="relu2", n_experts=4, experts_per_token=1)
    router = 2 * 4 * 32  # two layers' routers
    expert = sum(p.numel() for p in dense.transformer.h[0].mlp.parameters())
    assert count_params(moe) - count_params(dense) == 2 * 3 * expert + router  # three more experts a layer
    assert flops_per_token(moe, 16) - flops_per_token(dense, 16) == 6 * router


def test_muon_step_equals_a_computation_by_hand():
    torch.manual_seed(0)
    m = model()
    opt = make_optimizer(m, kind="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95)
    assert isinstance(opt, CombinedOptimizer)
    muon_params = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon_params}
    assert names == {n for n, p in m.named_parameters() if ".h." in n and p.dim() == 2}  # the blocks' matrices
    w = m.transformer.h[0].mlp.c_fc.weight  # (128, 32): tall
    before = w.detach().clone()
    ids = torch.randint(0, 50, (2, 16))
    m.train()
    m(ids).logsumexp(-1).mean().backward()
    g = w.grad.detach().clone()
    for group in opt.param_groups:
        group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
    opt.step()
    # by hand: Nesterov momentum from zero (buf = (1 - 0.95) g; update = lerp(g, buf, 0.95)), orthogonalised,
    # scaled by sqrt(max(1, rows / cols)), after decoupled weight decay
    buf = 0.05 * g
    update = g + 0.95 * (buf - g)
    expected = before * (1 - 0.02 * 0.1) - 0.02 * math.sqrt(128 / 32) * zeropower(update).float()
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)
    s = torch.linalg.svdvals(zeropower(torch.randn(64, 16)).float())
    assert s.min() > 0.5 and s.max() < 1.5  # roughly orthogonal


def test_invalid_combinations_are_one_clear_error():
    with pytest.raises(UserError, match="n_kv_head"):
        GPTConfig(n_head=4, n_embd=32, n_kv_head=3)
    with pytest.raises(UserError, match="yarn needs --pos-embedding rope"):
        GPTConfig(rope_scaling="yarn")
    with pytest.raises(UserError, match="experts_per_token"):
        GPTConfig(n_experts=2, experts_per_token=3)
    with pytest.raises(UserError, match="pos_embedding must be one of"):
        GPTConfig(pos_embedding="alibi")


def test_init_from_a_rope_run_with_a_longer_context_uses_yarn(tiny_data, tmp_path):
    common = dict(data=str(tiny_data), model="tiny", batch_size=4, lr=3e-3, warmup_steps=2, eval_every=1000,
                  eval_batches=1, log_every=100, checkpoint_every=1000, tensorboard=False, device="cpu",
                  dtype="fp32", sample_tokens=0, pos_embedding="rope")
    pretrain(TrainConfig(out=str(tmp_path / "short"), block_size=32, max_steps=5, **common))
    long = pretrain(TrainConfig(out=str(tmp_path / "long"), block_size=128, max_steps=3, rope_scaling="yarn",
                                rope_factor=4.0, init_from=str(tmp_path / "short"),
                                **{k: v for k, v in common.items() if k != "pos_embedding"}))
    from gpt2lab.checkpoint import open_run

    c = open_run(long.run_dir).model_config
    assert (c.block_size, c.rope_scaling, c.rope_original_context) == (128, "yarn", 32)
    with pytest.raises(UserError, match="learned positions"):
        learned = dict(common, pos_embedding="learned")
        pretrain(TrainConfig(out=str(tmp_path / "l1"), block_size=32, max_steps=2, **learned))
        pretrain(TrainConfig(out=str(tmp_path / "l2"), block_size=64, max_steps=2, init_from=str(tmp_path / "l1"),
                             **{k: v for k, v in learned.items() if k != "pos_embedding"}))
