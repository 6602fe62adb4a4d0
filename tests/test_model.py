import math

import pytest
import torch

from gpt2lab.model.config import PRESETS, GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.plan import count_params, flops_per_token


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=100, **kw)).eval()


def test_shapes():
    m = tiny()
    idx = torch.randint(0, 100, (3, 17))
    assert m(idx).shape == (3, 17, 100)


def test_causal_future_token_does_not_change_past_logits():
    m = tiny()
    idx = torch.randint(0, 100, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 100
    with torch.no_grad():
        a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_weight_tying():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    # counted once
    distinct = {p.data_ptr(): p.numel() for p in m.parameters()}
    assert count_params(m) == sum(distinct.values())


@pytest.mark.parametrize(
    "name,count",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
     ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        m = GPT(GPTConfig.from_preset(name))
    assert count_params(m) == count


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        GPTConfig.from_preset("gpt3")
    for name in PRESETS:
        assert name in str(e.value)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown model config fields"):
        GPTConfig.from_dict({"n_layers": 3})
    c = GPTConfig.from_preset("tiny", n_layer=5)
    assert c.n_layer == 5 and GPTConfig.from_dict(c.to_dict()) == c


def test_parameter_names_follow_hugging_face():
    names = set(dict(tiny().named_parameters()))
    for expected in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                     "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
                     "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias"]:
        assert expected in names


def test_too_long_input_names_both_lengths():
    m = tiny()
    with pytest.raises(ValueError, match=r"65 tokens.*64 tokens"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_padded_vocab_is_never_predicted():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=100, pad_vocab_multiple=64)).eval()
    assert m.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        m.lm_head.weight[100:] = 100.0  # would win every argmax if it leaked through
        logits = m(torch.randint(0, 100, (2, 9)))
    assert logits.shape[-1] == 100
    assert logits.argmax(-1).max() < 100


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=256)
    m = GPT(cfg)
    std = lambda t: t.detach().float().std().item()
    assert abs(std(m.transformer.wte.weight) - 0.02) < 0.001
    assert abs(std(m.transformer.h[0].attn.c_attn.weight) - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(std(m.transformer.h[0].mlp.c_proj.weight) - scaled) < 0.0005
    assert abs(std(m.transformer.h[3].attn.c_proj.weight) - scaled) < 0.0005
    assert torch.count_nonzero(m.transformer.h[0].attn.c_attn.bias) == 0


def test_seeded_golden_output():
    # fixed seed, fixed ids: these numbers change only if the architecture or the init does
    torch.manual_seed(1234)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=100)).eval()
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    expected = torch.tensor([-0.1409185231, -0.0067065735, 0.0066408855, -0.0161670838, 0.0110293739])
    torch.testing.assert_close(logits[0, -1, :5], expected, rtol=0, atol=1e-5)
    assert logits.sum().item() == pytest.approx(1.8782793283, abs=1e-3)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=100, dropout=0.5))
    idx = torch.randint(0, 100, (1, 10))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), m(idx))
        m.train()
        assert not torch.allclose(m(idx), m(idx))


def test_flops_per_token_matches_palm_formula():
    with torch.device("meta"):
        m = GPT(GPTConfig.from_preset("gpt2"))
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(m, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_logits_equal_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=3, n_head=4, n_embd=64)).eval()
    # Hugging Face stores linear weights as Conv1D (in, out): transpose those four
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd = {k: (v.t() if k.endswith(transposed) else v) for k, v in sd.items()}
    ours.load_state_dict(sd)
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_a_config_missing_newer_fields_takes_gpt2_values():
    old = {"vocab_size": 100, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
    c = GPTConfig.from_dict(old)
    assert c.bias is True and c.pad_vocab_multiple == 1


def test_every_model_field_is_a_flag_of_pretrain_and_a_config_setting():
    """GPTConfig is the one list of model fields: pretrain's flags and config-file keys follow it."""
    from dataclasses import fields

    from gpt2lab.cli import build_parser
    from gpt2lab.train.config import TrainConfig, coerce_settings

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    flags = {o for a in sub.choices["pretrain"]._actions for o in a.option_strings}
    settable = [f.name for f in fields(GPTConfig) if f.metadata.get("flag", True)]
    assert "vocab_size" not in settable  # it comes from the tokenizer
    for name in settable:
        assert "--" + name.replace("_", "-") in flags
        assert name in {f.name for f in fields(TrainConfig)}
    assert coerce_settings({"n-layer": 3, "bias": False}, TrainConfig) == {"n_layer": 3, "bias": False}


def test_parameter_and_flop_counts_come_from_the_structure():
    """A model without a position table (or with more layers) is counted from what it holds."""
    with torch.device("meta"):
        m = GPT(GPTConfig.from_preset("gpt2"))
        deeper = GPT(GPTConfig.from_preset("gpt2", n_layer=13))
    per_block = sum(p.numel() for p in m.transformer.h[0].parameters())
    assert count_params(deeper) - count_params(m) == per_block
    assert count_params(m, non_embedding=True) == count_params(m) - 50257 * 768 - 1024 * 768
    assert flops_per_token(deeper, 1024) - flops_per_token(m, 1024) == 6 * per_block + 12 * 768 * 1024
