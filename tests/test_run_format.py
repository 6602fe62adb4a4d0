"""The run directory format across versions: a run dir written by the previous gpt2lab (format version 1:
no "kind", a classifier said so with "task": "classify") still loads and works, and a run dir whose
tokenizer.json is not the one its config.json names is refused.

The version-1 dirs are written here in the layout the previous gpt2lab wrote: its config.json keys
and a model.safetensors that holds the tied embedding once (no lm_head.weight).
"""

import gzip
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gpt2lab
from gpt2lab import checkpoint, cli
from gpt2lab.errors import UserError
from gpt2lab.finetune.classify import classify_texts, load_classifier
from gpt2lab.generate import generate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, GPTClassifier
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.tokenizer.train import train_bpe_from_texts
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.pretrain import pretrain

MODEL = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)  # it turns one-line errors into tracebacks


def _v1_train_settings(data: Path, out: Path) -> dict:
    """What version 1 stored under "train": its TrainConfig with the resolved numbers written over it."""
    train = {"data": str(data), "out": str(out), "model": "tiny", "n_layer": None, "n_head": None, "n_embd": None,
             "block_size": 32, "dropout": 0.0, "bias": None, "pad_vocab_multiple": None, "max_steps": 20,
             "batch_size": 8, "seq_len": 32, "total_batch_tokens": 256, "optimizer": "adamw", "lr": 0.003,
             "min_lr": 0.0003, "warmup_steps": 2, "weight_decay": 0.1, "decay_embeddings": False, "beta1": 0.9,
             "beta2": 0.95, "grad_clip": 1.0, "data_order": "random", "eval_every": 10, "eval_batches": 2,
             "sample_every": 0, "sample_tokens": 4, "log_every": 1, "checkpoint_every": 10,
             "keep_checkpoints": 2, "tensorboard": False, "seed": 1337, "device": "cpu", "dtype": "float32",
             "compile": False, "resume": False, "init_from": None}
    train.update(grad_accum=1, world_size=1)
    return train


def _save_v1_weights(model: torch.nn.Module, path: Path) -> None:
    """As version 1 did: every tensor once (the tied lm_head.weight is transformer.wte.weight)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture
def v1_lm(tiny_data, tmp_path) -> tuple[Path, GPT]:
    """A version-1 language-model run dir and the model whose weights it holds."""
    torch.manual_seed(3)
    model = GPT(MODEL).eval()
    run = tmp_path / "v1-lm"
    run.mkdir()
    shutil.copyfile(tiny_data / "tokenizer.json", run / "tokenizer.json")
    tok = load_tokenizer_file(run / "tokenizer.json")
    meta = json.loads((tiny_data / "meta.json").read_text())
    config = {"format": "gpt2lab-run", "version": 1, "model": MODEL.to_dict(), "tokenizer": tok.identity(),
              "train": _v1_train_settings(tiny_data, run),
              "data": {"path": str(tiny_data), "tokens": {k: v["tokens"] for k, v in meta["splits"].items()},
                       "tokenizer_sha256": meta["tokenizer"]["sha256"]}}
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save_v1_weights(model, run / "model.safetensors")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    return run, model


@pytest.fixture
def v1_classifier(tiny_data, tmp_path) -> tuple[Path, GPTClassifier]:
    torch.manual_seed(4)
    model = GPTClassifier(MODEL, 2).eval()
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor([0.3, -0.2]))  # not the zeros of a fresh head
    run = tmp_path / "v1-cls"
    run.mkdir()
    shutil.copyfile(tiny_data / "tokenizer.json", run / "tokenizer.json")
    tok = load_tokenizer_file(run / "tokenizer.json")
    head = {"type": "linear", "pooling": "last_token", "num_classes": 2, "max_length": 24, "pad_id": tok.eot_id,
            "weights": ["score.weight", "score.bias"]}
    train = {"init": str(tmp_path / "base"), "data": str(tmp_path / "reviews.csv"), "train": None, "val": None,
             "test": None, "format": None, "text_field": "text", "label_field": "label", "columns": None,
             "labels": None, "val_fraction": 0.1, "test_fraction": 0.2, "balance": False, "max_length": None,
             "train_mode": "last-blocks", "last_blocks": 1, "lora_rank": 8, "lora_alpha": 16.0,
             "lora_dropout": 0.0, "lora_targets": ["c_attn", "c_proj", "c_fc"], "random_init": False,
             "epochs": 3, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.0, "seed": 123, "out": str(run),
             "device": "cpu"}
    config = {"format": "gpt2lab-run", "version": 1, "model": MODEL.to_dict(), "tokenizer": tok.identity(),
              "train": train, "data": {"path": train["data"], "sizes": {"train": 70, "val": 10, "test": 20}},
              "task": "classify", "labels": ["negative", "positive"], "head": head,
              "base": {"run_dir": train["init"], "lora": None, "random_init": False}}
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"),
              metadata={"format": "pt"})
    return run, model


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


# ------------------------------------------------------------------ version 1


def test_v1_language_model_loads_and_generates(v1_lm):
    run, original = v1_lm
    on_disk = (run / "config.json").read_bytes()
    for load in (gpt2lab.load, checkpoint.load_run):
        model, tok = load(run)
        assert type(model) is GPT and not model.training
        assert model.config == MODEL
        assert_same_parameters(model, original)
        assert model.lm_head.weight is model.transformer.wte.weight  # tied, from the one stored tensor
        assert tok.fingerprint == json.loads(on_disk)["tokenizer"]["sha256"]
        prompt = tok.encode("ROMEO:")
        ids = generate(model, prompt, 12, temperature=0)
        assert ids == generate(original, prompt, 12, temperature=0) and len(ids) == 12
        assert isinstance(tok.decode(ids), str)
        x = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)

    info = checkpoint.open_run(run)
    assert info.kind == "lm" and info.config["version"] == checkpoint.RUN_VERSION == 2
    assert info.labels is None and info.head is None and info.lora is None and info.template is None
    assert info.config["train"]["lr"] == 0.003  # the rest is kept as it was
    assert (run / "config.json").read_bytes() == on_disk  # migrated when read, never rewritten


def test_v1_language_model_on_the_command_line(v1_lm, capsys):
    run, original = v1_lm
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
                  "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    tok = load_tokenizer_file(run / "tokenizer.json")
    expected = tok.decode(generate(original, tok.encode("ROMEO:"), 8, temperature=0))
    assert expected.strip() and expected.strip() in out


def test_v1_language_model_starts_a_new_run(v1_lm, tiny_data, tmp_path):
    """--init-from a version-1 run: its model and weights start the new one."""
    run, original = v1_lm
    out = tmp_path / "new"
    pretrain(TrainConfig(data=str(tiny_data), out=str(out), init_from=str(run), max_steps=1, batch_size=2,
                         eval_batches=1, sample_tokens=0, tensorboard=False, device="cpu", dtype="fp32"))
    new = checkpoint.open_run(out)
    assert new.model_config == MODEL and new.config["version"] == 2 and new.kind == "lm"
    assert new.config["train"]["init_from"] == str(run)


def test_v1_classifier_loads_as_a_classifier(v1_classifier):
    run, original = v1_classifier
    info = checkpoint.open_run(run)
    assert info.kind == "classifier" and info.labels == ["negative", "positive"]
    assert info.head["num_classes"] == 2 and info.head["pad_id"] == 511
    for model, _ in (checkpoint.load_run(run), gpt2lab.load(run), checkpoint.load_run(run, kind="classifier")):
        assert type(model) is GPTClassifier and model.num_classes == 2
        assert_same_parameters(model, original)
    model, tok, labels, head = load_classifier(run)
    assert labels == ["negative", "positive"] and head == info.head
    texts = ["What light through yonder window breaks?", "Now is the winter of our discontent"]
    got = classify_texts(model, tok, labels, head, texts)
    want = classify_texts(original, tok, labels, head, texts)
    assert got == want and all(g["label"] in labels for g in got)
    assert all(sum(g["probs"].values()) == pytest.approx(1.0, abs=1e-5) for g in got)
    ids = torch.tensor([tok.encode(texts[0])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original(ids), rtol=0, atol=0)

    with pytest.raises(UserError, match="is a classifier, not a language model"):
        checkpoint.load_run(run, kind="lm")


# ------------------------------------------------------------------ the tokenizer must be the run's own


@pytest.fixture(scope="module")
def other_tokenizer_512():
    """A 512-token BPE trained on other text: the same size as the runs' tokenizer, other ids."""
    src = Path(__file__).resolve().parents[1] / "gpt2lab" / "assets" / "shakespeare.txt.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        text = f.read(400_000)[200_000:]
    return train_bpe_from_texts([text], 512, name="tiny512")


@pytest.mark.parametrize("version", [1, 2])
def test_a_swapped_tokenizer_is_refused(version, v1_lm, other_tokenizer_512, tiny_data, tmp_path, capsys):
    if version == 1:
        run = v1_lm[0]
    else:
        run = tmp_path / "v2"
        pretrain(TrainConfig(data=str(tiny_data), out=str(run), model="tiny", block_size=32, max_steps=1,
                             batch_size=2, eval_batches=1, sample_tokens=0, tensorboard=False, device="cpu",
                             dtype="fp32"))
    model, tok = checkpoint.load_run(run)  # it loads before the swap
    assert other_tokenizer_512.vocab_size == tok.vocab_size == 512
    assert other_tokenizer_512.fingerprint != tok.fingerprint
    other_tokenizer_512.save(run)
    for load in (checkpoint.load_run, gpt2lab.load):
        with pytest.raises(UserError) as e:
            load(run)
        msg = str(e.value)
        assert "\n" not in msg and str(run / "tokenizer.json") in msg, msg
        assert "not the tokenizer this run was trained with" in msg, msg
        assert other_tokenizer_512.fingerprint[:12] in msg and tok.fingerprint[:12] in msg, msg

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "not the tokenizer this run was trained with" in err and out == ""


def test_the_v1_layout_written_here_is_the_previous_gpt2labs(v1_lm):
    """The fixture's config.json has exactly the keys version 1 wrote, so the tests above test that layout."""
    config = json.loads((v1_lm[0] / "config.json").read_text())
    assert list(config) == ["format", "version", "model", "tokenizer", "train", "data"]
    assert "kind" not in config and "task" not in config
    from safetensors import safe_open

    with safe_open(str(v1_lm[0] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert set(asdict(MODEL)) == set(config["model"])
