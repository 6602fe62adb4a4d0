"""LoRA: adapters that start as a no-op, train alone, merge exactly and save on their own.

A 2-layer, 16-wide GPT on a 64-token vocabulary: every test runs in milliseconds.
"""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from gpt2lab import checkpoint as ckpt
from gpt2lab.checkpoint import LORA_FILE
from gpt2lab.cli import main as cli_main
from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.lora import LoRALinear, apply_lora, lora_layers, lora_state_dict, merge_lora
from gpt2lab.train.optim import make_optimizer
from gpt2lab.train.task import lm_loss
from gpt2lab.weights import load_lora, save_lora, save_weights, unique_state_dict

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def base_model(seed: int = 0, config: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def tokens(seed: int = 1, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """B starts at zero; give it values so that the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_at_initialisation_the_output_is_the_base_models():
    base = base_model()
    idx = tokens()
    expected = base(idx)
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert len(lora_layers(lora)) == 4 * CFG.n_layer
    assert torch.equal(lora(idx), expected)


def test_trainable_parameters_are_what_the_rank_implies():
    r = 4
    model = apply_lora(base_model(), rank=r, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    per_layer = sum(r * (m.in_features + m.out_features) for m in lora_layers(model).values())
    # per block: c_attn 16->48, attn.c_proj 16->16, c_fc 16->64, mlp.c_proj 64->16
    assert per_layer == CFG.n_layer * r * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16)) == 2048
    assert sum(p.numel() for p in trainable.values()) == per_layer
    for layer in lora_layers(model).values():
        assert layer.lora_A.shape == (r, layer.in_features) and layer.lora_B.shape == (layer.out_features, r)
        assert not layer.lora_B.any() and layer.scale == 2.0


@pytest.mark.parametrize("targets, wrapped", [
    (("mlp.c_proj",), {"mlp.c_proj"}),
    (("c_proj",), {"attn.c_proj", "mlp.c_proj"}),
    (("attn",), {"attn.c_attn", "attn.c_proj"}),
    (("c_attn", "c_fc"), {"attn.c_attn", "mlp.c_fc"}),
])
def test_targets_choose_the_layers(targets, wrapped):
    model = apply_lora(base_model(), rank=2, alpha=2, targets=targets)
    found = {".".join(n.split(".")[-2:]) for n in lora_layers(model)}
    assert found == wrapped
    assert not isinstance(model.lm_head, LoRALinear)  # the tied LM head is never wrapped


def test_an_unknown_target_lists_the_layers():
    with pytest.raises(UserError, match=r"\['q_proj'\] match no linear layer.*attn.c_attn"):
        apply_lora(base_model(), rank=2, alpha=2, targets=("c_attn", "q_proj"))


def test_state_dict_keeps_the_base_names():
    base = base_model()
    model = apply_lora(copy.deepcopy(base), rank=2, alpha=2)
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys
    assert keys - set(base.state_dict()) == set(lora_state_dict(model))


def test_merged_and_unmerged_outputs_are_equal():
    model = apply_lora(base_model(), rank=4, alpha=8, dropout=0.1).eval()  # dropout is off in eval
    randomize_adapters(model)
    idx = tokens()
    unmerged = model(idx)
    assert not torch.allclose(unmerged, base_model()(idx), atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert not lora_layers(model) and all(type(m) is nn.Linear for n, m in model.named_modules()
                                          if n.endswith(("c_attn", "c_proj", "c_fc")))
    assert set(model.state_dict()) == set(GPT(CFG).state_dict())
    torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)


def test_frozen_weights_do_not_change_during_training():
    model = apply_lora(base_model(), rank=4, alpha=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, kind="adamw", lr=1e-2, weight_decay=0.1)
    idx = tokens(B=4, T=16)
    for _ in range(3):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k


def test_lora_file_round_trips(tmp_path):
    model = apply_lora(base_model(), rank=4, alpha=8)
    randomize_adapters(model)
    save_lora(model, tmp_path / LORA_FILE)
    stored = load_file(str(tmp_path / LORA_FILE))
    assert set(stored) == set(lora_state_dict(model))  # the adapters alone
    torch.manual_seed(99)  # other random A's, zero B's
    other = apply_lora(base_model(), rank=4, alpha=8)
    load_lora(other, tmp_path / LORA_FILE)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(other.state_dict()[k], v)
    idx = tokens()
    assert torch.equal(other(idx), model(idx))
    wrong_rank = apply_lora(base_model(), rank=2, alpha=8)
    with pytest.raises(UserError, match="rank"):
        load_lora(wrong_rank, tmp_path / LORA_FILE)


def lora_run_dir(path, tok_texts=("hello world", "a tiny tokenizer")):
    """A run dir as LoRA training writes it: the base weights, lora.safetensors, "lora" in config.json.
    The model's vocabulary is the tokenizer's (a run dir's tokenizer must fit its model)."""
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    tok = train_bpe_from_texts(list(tok_texts), 260, name="t")
    config = GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size})
    model = apply_lora(base_model(config=config), rank=4, alpha=8, targets=("c_attn", "mlp"))
    randomize_adapters(model)
    path.mkdir()
    tok.save(path)
    save_weights(model, path / ckpt.WEIGHTS_FILE, exclude_lora=True)
    save_lora(model, path / LORA_FILE)
    ckpt.write_run_config(path, config, tokenizer_identity=tok.identity(), extra={"lora": model.lora_settings})
    return model.eval()


def test_lora_run_dir_loads_and_merges(tmp_path, capsys):
    trained = lora_run_dir(tmp_path / "run")
    config = trained.config
    stored = load_file(str(tmp_path / "run" / ckpt.WEIGHTS_FILE))
    base = base_model(config=config)
    # model.safetensors is the untouched base, each tensor once (the tied LM head is the embedding)
    assert set(stored) == set(unique_state_dict(base))
    assert all(torch.equal(stored[k], v) for k, v in unique_state_dict(base).items())
    idx = tokens()
    expected = trained(idx)
    assert not torch.allclose(expected, base(idx), atol=1e-3)  # the adapters do something
    model, _ = ckpt.load_run(tmp_path / "run", merge_lora=False)
    assert len(lora_layers(model)) == 3 * config.n_layer
    torch.testing.assert_close(model(idx), expected, atol=0, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    merged, _ = ckpt.load_run(tmp_path / "run")  # merged by default
    assert not lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=0)

    # the CLI: an ordinary run dir comes out, loadable without knowing about LoRA
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert e.value.code == 0
    assert not (tmp_path / "merged" / LORA_FILE).exists()
    assert "lora" not in ckpt.read_run_config(tmp_path / "merged")
    assert ckpt.read_run_config(tmp_path / "merged")["merged_lora"]["rank"] == 4
    merged, _ = ckpt.load_run(tmp_path / "merged")
    torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=0)

    with pytest.raises(UserError, match="already holds a gpt2lab run dir"):
        ckpt.write_merged_run(tmp_path / "run", tmp_path / "merged")
    with pytest.raises(UserError, match="no LoRA adapters"):
        ckpt.write_merged_run(tmp_path / "merged", tmp_path / "again")
    assert not (tmp_path / "again").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def _merge_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_lora_refuses_outputs_it_must_not_replace(tmp_path, capsys):
    run = tmp_path / "run"
    trained = lora_run_dir(run)
    run_files = _tree(run)

    # a non-empty directory gpt2lab did not write: never replaced, with or without --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        err = _merge_error(capsys, [str(run), "--out", str(mine), *extra])
        assert str(mine) in err and "did not write" in err
        assert _tree(mine) == {"notes.txt": b"keep me"}

    # the LoRA run itself, or a directory inside it: refused, even with --overwrite
    for out in (run / "merged", run):
        for extra in ([], ["--overwrite"]):
            err = _merge_error(capsys, [str(run), "--out", str(out), *extra])
            assert str(out) in err and str(run) in err
    assert not (run / "merged").exists() and _tree(run) == run_files

    # --overwrite replaces an earlier merged run; without it, an earlier merged run is kept
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(run), "--out", str(out)])
    assert e.value.code == 0
    (out / "stale.txt").write_text("from the earlier merge")
    earlier = _tree(out)
    err = _merge_error(capsys, [str(run), "--out", str(out)])
    assert "--overwrite" in err and _tree(out) == earlier
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(run), "--out", str(out), "--overwrite"])
    assert e.value.code == 0
    assert not (out / "stale.txt").exists()  # replaced as a whole, not written over
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", "tokenizer.json"])
    merged, _ = ckpt.load_run(out)
    idx = tokens()
    torch.testing.assert_close(merged(idx), trained(idx), atol=1e-5, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left behind
    assert _tree(run) == run_files
