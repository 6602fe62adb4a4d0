"""Import and export of Hugging Face GPT-2 checkpoints, checked against transformers itself."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab import checkpoint as ckpt
from gpt2lab.errors import UserError
from gpt2lab.export.hf import config_from_hf, export_hf, hf_to_gpt2lab, import_hf, read_hf_tokenizer
from gpt2lab.generate import generate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer import BPETokenizer, get_tokenizer
from gpt2lab.tokenizer.train import train_bpe_from_texts
from gpt2lab.train.plan import count_params
from gpt2lab.weights import save_weights

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello world",
    "  leading spaces, and   runs of    spaces ",
    "digits 12345 and 3.14159 and 2024-01-01",
    "accents: café, naïve, Ångström, façade, jalapeño",
    "emoji 🤗🚀👍🏽 and CJK 日本語のテキスト",
    "tabs\tand\nnewlines\n\n\r\n end",
    "it's don't we'll they've I'm you'd",
    "MiXeD CaSe!!! ??? ... ---",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "A café in Zürich serves crème brûlée; naïve tourists pay 12.50 francs.",
    "Numbers like 1234567 and 3.14159 appear in text, as do emoji 🤗🚀.",
    "It's what they've said: we'll see. Don't you think so?",
] * 3


@pytest.fixture(scope="module")
def tfm():
    return pytest.importorskip("transformers")


def hf_model(tfm, vocab_size=50257, seed=0, **sizes):
    """A random GPT2LMHeadModel whose greedy continuation is not one token over and over.

    The default init gives nearly flat logits; larger embeddings and weights
    make the next token depend on the token and its position.
    """
    cfg = tfm.GPT2Config(vocab_size=vocab_size, **{**dict(n_positions=64, n_embd=32, n_layer=2, n_head=2),
                                                   **sizes})
    torch.manual_seed(seed)
    model = tfm.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if name.endswith(("wte.weight", "wpe.weight")) else 0.2)
            elif ".ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def save_hub_layout(hf, directory: Path, fmt: str) -> Path:
    """Save as OpenAI's files on the hub are: no `transformer.` prefix, the mask buffers included."""
    directory.mkdir(parents=True)
    hf.config.to_json_file(directory / "config.json")
    n = hf.config.n_positions
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    if fmt == "safetensors":
        sd.pop("lm_head.weight", None)
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if fmt == "safetensors":
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


def randomise(model: GPT, seed: int = 0) -> GPT:
    """Every parameter random (LayerNorm gains near 1), so no mapping mistake can hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.2 * noise)
    return model.eval()


def write_run(run_dir: Path, model: GPT, tok) -> Path:
    run_dir.mkdir(parents=True)
    save_weights(model, run_dir / ckpt.WEIGHTS_FILE)
    tok.save(run_dir)
    ckpt.write_run_config(run_dir, model.config, tokenizer_identity=tok.identity())
    return run_dir


@pytest.fixture(scope="module")
def trained_tok():
    return train_bpe_from_texts(CORPUS, 300, name="test300")


def cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpt2lab", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


# --------------------------------------------------------------------------------- import


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_safetensors", "hub_pytorch_bin"])
def test_import_gives_transformers_logits_and_greedy_text(tfm, tmp_path, layout):
    hf = hf_model(tfm)
    src = tmp_path / "src"
    if layout == "save_pretrained":
        hf.save_pretrained(src)
    else:  # as on the hub, with GPT-2's tokenizer files
        save_hub_layout(hf, src, "safetensors" if layout == "hub_safetensors" else "bin")
        gpt2_dir = REPO / "gpt2lab" / "assets" / "gpt2"
        shutil.copy(gpt2_dir / "encoder.json", src / "vocab.json")
        shutil.copy(gpt2_dir / "vocab.bpe", src / "merges.txt")

    run = import_hf(src, tmp_path / "run")
    model, tok = ckpt.load_run(run)
    assert tok.name == "gpt2"  # no tokenizer files, or GPT-2's: the bundled one

    ids = tok.encode("Hello world, this is a test of the import")
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)
    ours = generate(model, ids, 24, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(ids):].tolist()
    assert len(set(ours)) > 5  # a real continuation, not one token repeated

    source = json.loads((run / "config.json").read_text())["source"]
    weights = next(src.glob("*.safetensors"), src / "pytorch_model.bin")
    assert source["type"] == "hf" and source["path"] == str(src.resolve())
    assert source["weights"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}


@pytest.mark.slow
def test_import_full_size_gpt2_124m(tfm, tmp_path):
    torch.manual_seed(0)
    hf = tfm.GPT2LMHeadModel(tfm.GPT2Config()).eval()  # 124M, random weights, on the CPU
    hf.save_pretrained(tmp_path / "src")
    idx = torch.tensor([get_tokenizer("gpt2").encode("The meaning of life is")])
    with torch.no_grad():
        expected = hf(idx).logits
    del hf
    model, _ = ckpt.load_run(import_hf(tmp_path / "src", tmp_path / "run"))
    assert count_params(model) == 124_439_808
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-5)


def test_import_then_export_round_trips_bitwise(tfm, tmp_path):
    hf = hf_model(tfm)
    hf.save_pretrained(tmp_path / "src")
    run = import_hf(tmp_path / "src", tmp_path / "run")
    out = export_hf(run, tmp_path / "out")

    before, after = load_file(tmp_path / "src" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    exported = tfm.GPT2Config.from_pretrained(out).to_dict()
    assert exported.pop("n_ctx") == exported["n_positions"]  # the older name too, for llama.cpp's converter
    assert tfm.GPT2Config.from_pretrained(tmp_path / "src").to_dict() == exported

    # GPT-2's own tokenizer files, and transformers reads them to the same ids as ours
    gpt2_dir = REPO / "gpt2lab" / "assets" / "gpt2"
    assert json.loads((out / "vocab.json").read_text()) == json.loads((gpt2_dir / "encoder.json").read_text())
    merges = (gpt2_dir / "vocab.bpe").read_text().split("\n")[1:]  # after the "#version" line
    assert (out / "merges.txt").read_text().split("\n")[1:] == merges
    ours, theirs = get_tokenizer("gpt2"), tfm.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
    assert theirs.eos_token == theirs.bos_token == theirs.unk_token == "<|endoftext|>"


def test_import_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):  # unpickling calls open(marker, "w"): code from the file runs
            return (open, (str(marker), "w"))

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2,
                                                 "n_embd": 8, "n_positions": 8, "vocab_size": 50257}))
    torch.save({"wte.weight": torch.zeros(2, 2), "evil": Payload()}, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="tensors only"):
        import_hf(src, tmp_path / "run")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()
    # the payload is live: an unsafe load would have run it
    torch.load(src / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("field, value", [
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("activation_function", "relu"),
    ("layer_norm_epsilon", 1e-6),
    ("add_cross_attention", True),
    ("n_inner", 100),
    ("tie_word_embeddings", False),
    ("scale_attn_weights", False),
    ("model_type", "llama"),
])
def test_unsupported_config_fields_are_errors(field, value):
    with pytest.raises(UserError, match=field):
        config_from_hf({"n_embd": 32, "n_head": 2, field: value})


def test_config_mapping():
    cfg = config_from_hf({"n_embd": 64, "n_head": 4, "n_layer": 3, "n_positions": 128, "vocab_size": 1000,
                          "n_inner": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                          "activation_function": "gelu_new", "n_ctx": 128})
    assert cfg == GPTConfig(vocab_size=1000, block_size=128, n_layer=3, n_head=4, n_embd=64, dropout=0.0)
    assert config_from_hf({}) == GPTConfig.from_preset("gpt2", dropout=0.1)  # transformers' defaults
    with pytest.raises(UserError, match="dropouts differ"):
        config_from_hf({"resid_pdrop": 0.1, "attn_pdrop": 0.0})


def test_untied_head_and_wrong_shapes_are_named(tfm, tmp_path):
    hf = hf_model(tfm, vocab_size=50257)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    with pytest.raises(UserError, match="untied"):
        hf_to_gpt2lab(sd)

    src = tmp_path / "src"
    hf.save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(128, 32\).*"
                                        r"\(32, 128\)"):
        import_hf(src, tmp_path / "run")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["score.weight"] = torch.zeros(2, 32)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match=r"lacks transformer\.h\.1\.mlp\.c_fc\.weight.*score\.weight"):
        import_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


# --------------------------------------------------------------------------------- export


@pytest.mark.parametrize("options", [dict(pad_vocab_multiple=64), dict(bias=False)],
                         ids=["padded_vocab", "no_bias"])
def test_export_of_a_model_trained_here_loads_in_transformers(tfm, tmp_path, trained_tok, options):
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                    **options)
    model = randomise(GPT(cfg))
    run = write_run(tmp_path / "run", model, trained_tok)
    out = export_hf(run, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "gpt2lab-export.json"}
    assert not list(tmp_path.glob(".hf*"))  # the staging directory is gone

    hf = tfm.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == trained_tok.vocab_size  # padding rows trimmed
    idx = torch.randint(0, trained_tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)

    ours, fast = trained_tok, tfm.AutoTokenizer.from_pretrained(out)
    eot = "<|endoftext|>"
    assert fast.eos_token == fast.bos_token == fast.unk_token == eot
    assert fast.eos_token_id == ours.eot_id == trained_tok.vocab_size - 1
    for text in TEXTS + CORPUS[:4]:
        ids = ours.encode(text)
        assert fast(text)["input_ids"] == ids, text
        assert fast.decode(ids) == ours.decode(ids)
    # transformers finds special tokens in text; ours does where allowed
    text = f"one document{eot}the next"
    assert fast(text)["input_ids"] == ours.encode(text, allowed_special="all")

    # what transformers itself writes for this tokenizer comes back in unchanged
    fast.save_pretrained(tmp_path / "resaved")
    assert read_hf_tokenizer(tmp_path / "resaved").fingerprint == ours.fingerprint

    # vocab.json + merges.txt alone (what older tools read) give the same ids
    slow_dir = tmp_path / "slow"
    shutil.copytree(out, slow_dir)
    (slow_dir / "tokenizer.json").unlink()
    slow = tfm.AutoTokenizer.from_pretrained(slow_dir)
    for text in TEXTS:
        assert slow(text)["input_ids"] == ours.encode(text), text


def test_export_then_import_round_trips(tmp_path, trained_tok):
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                    dropout=0.1)
    run = write_run(tmp_path / "run", randomise(GPT(cfg)), trained_tok)
    out = export_hf(run, tmp_path / "hf")
    back = import_hf(out, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["model"] == cfg.to_dict()
    before, after = load_file(run / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert BPETokenizer.from_file(back / "tokenizer.json").fingerprint == trained_tok.fingerprint

    # the tokenizer comes in from vocab.json + merges.txt as well as from tokenizer.json
    (out / "tokenizer.json").unlink()
    back2 = import_hf(out, tmp_path / "back2")
    assert BPETokenizer.from_file(back2 / "tokenizer.json").fingerprint == trained_tok.fingerprint


def test_export_refuses_what_gpt2_cannot_express(tmp_path, trained_tok):
    tok = BPETokenizer(trained_tok.vocab, trained_tok.merges, trained_tok.special_tokens,
                       pattern=r"\S+|\s+", name="own-regex")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    run = write_run(tmp_path / "run", GPT(cfg), tok)
    with pytest.raises(UserError, match="regex"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_output_directories_are_replaced_only_when_asked(tmp_path, trained_tok):
    """--overwrite replaces only an export gpt2lab made; never a directory it did not write, the run it
    exports, a directory that holds the run, or the source of an import."""
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    run = write_run(tmp_path / "runs" / "run", GPT(cfg), trained_tok)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="did not write"):
            export_hf(run, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    export_hf(run, out)  # an empty directory may be written
    with pytest.raises(UserError, match="--overwrite"):
        export_hf(run, out)
    export_hf(run, out, overwrite=True)  # an export made here is replaced
    assert (out / "model.safetensors").is_file()
    with pytest.raises(UserError, match="is the input"):
        export_hf(run, run, overwrite=True)
    with pytest.raises(UserError, match="holds the input"):
        export_hf(run, tmp_path / "runs", overwrite=True)  # the parent of the run: it would be deleted
    with pytest.raises(UserError, match="lies inside the input"):
        export_hf(run, run / "hf", overwrite=True)
    with pytest.raises(UserError, match="--overwrite|not a gpt2lab run"):
        import_hf(out, run)
    with pytest.raises(UserError):
        import_hf(out, out, overwrite=True)  # its own source
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]  # nothing half-written left
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run"]


def test_a_lora_run_exports_its_merged_weights(tfm, tmp_path, trained_tok):
    """transformers' logits of an exported LoRA run equal the run's own (the adapters merged), not the base's."""
    from gpt2lab.checkpoint import load_run
    from gpt2lab.model.lora import apply_lora
    from gpt2lab.weights import save_lora

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    base = GPT(cfg)
    run = write_run(tmp_path / "lora", base, trained_tok)
    apply_lora(base, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)  # as if trained: the adapters change the output
    save_lora(base, run / "lora.safetensors")
    config = json.loads((run / "config.json").read_text())
    config["lora"] = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["c_attn", "c_proj", "c_fc"]}
    (run / "config.json").write_text(json.dumps(config))
    export_hf(run, tmp_path / "hf")
    hf = tfm.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_run(run)
    unmerged = GPT(cfg).eval()
    unmerged.load_state_dict({k: v for k, v in base.state_dict().items() if "lora_" not in k}, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        theirs, mine, plain = hf(ids).logits, ours(ids), unmerged(ids)
    assert (theirs - mine).abs().max() < 1e-4
    assert (theirs - plain).abs().max() > 1e-2  # the adapters are in the export


def test_a_classifier_exports_as_sequence_classification(tfm, tmp_path, trained_tok):
    """GPT2ForSequenceClassification's probabilities equal `gpt2lab classify`'s; the head's bias lives in the
    final LayerNorm's bias, since transformers' head has none."""
    from gpt2lab.checkpoint import load_run, write_run_config
    from gpt2lab.finetune.classify import classify_texts
    from gpt2lab.model.gpt import GPTClassifier
    from gpt2lab.weights import save_weights

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    clf = GPTClassifier(cfg, 3)
    with torch.no_grad():
        clf.score.bias.copy_(torch.tensor([0.7, -1.2, 0.3]))
        clf.score.weight.normal_(0, 0.5)
    run = tmp_path / "clf"
    run.mkdir()
    save_weights(clf, run / "model.safetensors")
    trained_tok.save(run)
    head = {"type": "linear", "pooling": "last_token", "num_classes": 3, "max_length": 32,
            "pad_id": trained_tok.eot_id, "weights": ["score.weight", "score.bias"]}
    write_run_config(run, cfg, tokenizer_identity=trained_tok.identity(), kind="classifier", task="classify",
                     extra={"labels": ["a", "b", "c"], "head": head})
    export_hf(run, tmp_path / "hf")
    hf = tfm.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    model, tok = load_run(run, kind="classifier")
    texts = ["hello there", "a longer text, with more words in it", "x"]
    rows = classify_texts(model, tok, ["a", "b", "c"], head, texts)
    for text, row in zip(texts, rows):
        with torch.no_grad():
            probs = hf(torch.tensor([tok.encode(text)])).logits.softmax(-1)[0]
        assert [row["probs"][k] for k in "abc"] == pytest.approx(probs.tolist(), abs=1e-5)


# ------------------------------------------------------------------------------------ CLI


def test_cli_import_then_export(tfm, tmp_path):
    hf_model(tfm).save_pretrained(tmp_path / "src")
    r = cli("import-hf", tmp_path / "src", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "gpt2lab generate" in r.stdout
    r = cli("export-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    r = cli("export-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "--overwrite" in r.stderr
    r = cli("export-hf", tmp_path / "run", "--out", tmp_path, "--overwrite")  # the parent of the run
    assert r.returncode == 2 and "holds the input" in r.stderr and (tmp_path / "run" / "config.json").is_file()


def test_cli_hub_id_offline(tmp_path):
    from gpt2lab.cli.export import HUB_NAMES
    from gpt2lab.export.hf import HUB_IDS

    assert HUB_NAMES == ", ".join(HUB_IDS)  # the help text lists them without importing gpt2lab.export.hf
    r = cli("import-hf", "gpt2", "--out", tmp_path / "run", env={"HF_HOME": str(tmp_path / "hf_home")})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "offline" in r.stderr and "import-hf ./gpt2" in r.stderr and "local" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"scale_attn_by_inverse_layer_idx": True}))
    shaped = tmp_path / "shaped"
    shaped.mkdir()
    (shaped / "config.json").write_text(json.dumps(dict(n_layer=1, n_head=2, n_embd=8, n_positions=8)))
    tensors = {"wte.weight": torch.zeros(50257, 8), "wpe.weight": torch.zeros(8, 8),
               "ln_f.weight": torch.zeros(8), "ln_f.bias": torch.zeros(8)}
    for name, shape in [("ln_1.weight", 8), ("ln_1.bias", 8), ("ln_2.weight", 8), ("ln_2.bias", 8),
                        ("attn.c_attn.weight", (8, 24)), ("attn.c_attn.bias", 24),
                        ("attn.c_proj.weight", (8, 8)), ("attn.c_proj.bias", 8),
                        ("mlp.c_fc.weight", (8, 32)), ("mlp.c_fc.bias", 32),
                        ("mlp.c_proj.weight", (8, 32)), ("mlp.c_proj.bias", 8)]:  # c_proj should be (32, 8)
        tensors[f"h.0.{name}"] = torch.zeros(shape)
    save_file(tensors, str(shaped / "model.safetensors"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")

    cases = [
        ([tmp_path / "missing", "--out", tmp_path / "a"], "does not exist"),
        ([src, "--out", tmp_path / "b"], "scale_attn_by_inverse_layer_idx"),
        ([shaped, "--out", tmp_path / "c"], "h.0.mlp.c_proj.weight has shape (8, 32)"),
        ([src, "--out", full], "--overwrite"),
    ]
    for args, message in cases:
        r = cli("import-hf", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "shaped", "src"]


# ----------------------------------------------------------------------------- Llama-shaped models

LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)


@pytest.mark.parametrize("kw,arch", [
    (dict(n_kv_head=2, tie_embeddings=False), "LlamaForCausalLM"),
    (dict(n_kv_head=1, tie_embeddings=True, bias=True), "LlamaForCausalLM"),
    (dict(n_kv_head=2, rope_scaling="yarn", rope_factor=4.0, rope_original_context=16), "LlamaForCausalLM"),
    (dict(mlp="relu2", bias=True), "LlamaForCausalLM"),
    (dict(qk_norm=True, n_kv_head=2, tie_embeddings=False), "Qwen3ForCausalLM"),
    (dict(qk_norm=True, mlp="relu2", tie_embeddings=False), "Qwen3ForCausalLM"),
], ids=["gqa-untied", "mqa-tied-bias", "yarn", "relu2", "qwen3", "qknorm-relu2"])
def test_a_llama_shaped_model_exports_as_llama_or_qwen3(tfm, tmp_path, trained_tok, kw, arch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                    **{**LLAMA, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from their initial values
    run = write_run(tmp_path / "run", model, trained_tok)
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [arch] and config["num_key_value_heads"] == cfg.kv_heads
    hf = tfm.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, cfg.vocab_size, (2, 60))  # past YaRN's original context of 16
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
    tok = tfm.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello world, hello again"
    assert tok(text)["input_ids"] == trained_tok.encode(text)


@pytest.mark.parametrize("kw,options", [
    (dict(n_experts=2, experts_per_token=1), ["--n-experts 2"]),
    (dict(attention="mla", n_experts=2, experts_per_token=1), ["--attention mla", "--n-experts 2"]),
    (dict(qk_norm=True, bias=True), ["--qk-norm with --bias"]),
    (dict(pos_embedding="learned", mlp="gelu"), ["--pos-embedding learned", "--mlp gelu", "--norm rmsnorm"]),
])
def test_what_transformers_cannot_express_is_refused_naming_every_option(tmp_path, trained_tok, kw, options):
    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                    **{**LLAMA, **kw})
    run = write_run(tmp_path / "run", GPT(cfg), trained_tok)
    with pytest.raises(UserError) as e:
        export_hf(run, tmp_path / "hf")
    assert all(option in str(e.value) for option in options), str(e.value)
    assert not (tmp_path / "hf").exists()


def test_a_tokenizer_gpt2s_files_cannot_hold_is_named_with_the_model(tmp_path, trained_tok):
    tok = BPETokenizer(trained_tok.vocab, trained_tok.merges, {}, pattern=r"\S+|\s+", name="own-regex")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, n_experts=2,
                    experts_per_token=1)
    run = write_run(tmp_path / "run", GPT(cfg), tok)
    with pytest.raises(UserError) as e:
        export_hf(run, tmp_path / "hf")
    assert all(s in str(e.value) for s in ("regex", "no <|endoftext|>", "--n-experts 2")), str(e.value)


def test_an_sft_run_exports_its_chat_template(tfm, tmp_path, trained_tok):
    from gpt2lab.templates import encode_messages, render_messages

    cfg = GPTConfig(vocab_size=trained_tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    run = write_run(tmp_path / "run", GPT(cfg), trained_tok)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "template": "chat"}))
    export_hf(run, tmp_path / "hf")
    tok = tfm.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_messages(messages, "chat")
    assert tok(text)["input_ids"] == encode_messages(trained_tok, messages, "chat")[0]


CONVERT = os.environ.get("GPT2LAB_LLAMA_CPP_CONVERT")  # llama.cpp's convert_hf_to_gguf.py (make test fetches it)


@pytest.mark.parametrize("kw", [{}, dict(LLAMA, n_kv_head=1), dict(LLAMA, qk_norm=True, tie_embeddings=False)],
                         ids=["gpt2", "llama", "qwen3"])
def test_llama_cpps_converter_accepts_the_export(tfm, tmp_path, kw):
    """export-hf writes what llama.cpp's own conversion script reads (n_ctx among GPT-2's fields), and the file
    it makes computes our logits. The script recognises GPT-2's vocabulary only: a tokenizer trained here
    needs export-gguf, which writes its pre-tokeniser by name."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("sentencepiece")
    if not CONVERT or not Path(CONVERT).is_file():
        pytest.skip("set GPT2LAB_LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py (make test does)")
    tok = get_tokenizer("gpt2", fast=False)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, **kw)
    model = randomise(GPT(cfg))
    export_hf(write_run(tmp_path / "run", model, tok), tmp_path / "hf")
    if not kw:
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_ctx"] == 64
    r = subprocess.run([sys.executable, CONVERT, str(tmp_path / "hf"), "--outfile", str(tmp_path / "m.gguf"),
                        "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    text = CORPUS[0]
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == tok.encode(text)
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    # GPT-2's GELU is a table of f16 values in llama.cpp
    assert (torch.tensor(llm.scores[: len(ids)]) - ours).abs().max() < (1e-2 if not kw else 1e-4)
