"""Training configurations: the model fields of `pretrain` come from GPTConfig, every number is checked
(finite, in range) wherever it comes from (a flag, a config file, Python), and --resume merges the run's
stored settings with the given ones.

No training happens here: a bad setting must be refused before anything is written.
"""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from gpt2lab import cli
from gpt2lab.errors import UserError
from gpt2lab.finetune.config import ClassifyConfig, SFTConfig
from gpt2lab.model.config import GPTConfig, model_fields
from gpt2lab.train.config import LoopConfig, TrainConfig, load_config_file, merge_for_resume, model_overrides
from gpt2lab.train.pretrain import pretrain


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)  # it turns one-line errors into tracebacks


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ------------------------------------------------------------------ the model fields


def test_train_config_has_every_model_field_of_gptconfig(capsys):
    train = {f.name: f for f in fields(TrainConfig)}
    settable = [f for f in fields(GPTConfig) if f.metadata.get("flag", True)]
    assert {f.name for f in settable} == {f.name for f in model_fields()}
    assert "vocab_size" not in train  # it comes from the tokenizer
    assert {"block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "pad_vocab_multiple"} <= set(train)
    for f in settable:
        mine = train[f.name]
        assert mine.default is None, f.name  # None: the preset's value
        assert mine.metadata.get("model") is True, f.name
        assert mine.metadata["help"].startswith(f.metadata["help"]), f.name
    # the loop's settings are there too, and the fine-tuning configs take only dropout from the model
    assert {f.name for f in fields(LoopConfig)} <= set(train)
    # the fine-tuning configs take from the model only what may differ from the starting run: dropout, and
    # a rotary model's context
    for cls in (SFTConfig, ClassifyConfig):
        names = {f.name for f in fields(cls)}
        assert {"dropout", "block_size", "rope_scaling", "rope_factor"} <= names
        assert not names & {"n_layer", "n_embd", "bias", "pos_embedding", "mlp"}

    # each is a flag of `pretrain` and a key of its config files
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    for f in settable:
        assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_model_overrides_are_the_model_fields_set(tmp_path):
    assert model_overrides(TrainConfig()) == {}
    cfg = TrainConfig(n_layer=3, bias=False, dropout=0.0, lr=1e-3)
    assert model_overrides(cfg) == {"n_layer": 3, "bias": False, "dropout": 0.0}
    path = tmp_path / "run.toml"
    path.write_text("n-embd = 48\nn_head = 4\npad_vocab_multiple = 64\n")
    assert load_config_file(path) == {"n_embd": 48, "n_head": 4, "pad_vocab_multiple": 64}
    assert GPTConfig.from_preset("tiny", **model_overrides(TrainConfig(**load_config_file(path)))) == GPTConfig(
        n_layer=2, n_head=4, n_embd=48, block_size=64, pad_vocab_multiple=64)


# ------------------------------------------------------------------ numbers are checked wherever they come from

BAD_NUMBERS = [  # (setting, text on the command line, TOML value, YAML value)
    ("grad_clip", "nan", "nan", ".nan"),
    ("lr", "inf", "inf", ".inf"),
    ("weight_decay", "nan", "nan", "nan"),
    ("beta1", "2", "2", "2"),
    ("seed", "1e23", "1e23", "1e23"),
]


@pytest.mark.parametrize("source", ["flag", "toml", "yaml"])
@pytest.mark.parametrize("name,text,toml,yaml", BAD_NUMBERS, ids=[b[0] for b in BAD_NUMBERS])
def test_bad_numbers_are_one_error_line_naming_the_setting(name, text, toml, yaml, source, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"  # neither exists: the number is refused first
    argv = ["pretrain", "--data", str(data), "--out", str(out), "--device", "cpu"]
    if source == "flag":
        argv += ["--" + name.replace("_", "-"), text]
    else:
        path = tmp_path / f"run.{source}"
        path.write_text(f"{name} = {toml}\n" if source == "toml" else f"{name}: {yaml}\n")
        argv += ["--config", str(path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err + stdout, err
    if source == "flag":
        assert "--" + name.replace("_", "-") in err, err
    else:
        assert name in err.replace("-", "_"), err
    assert "data directory" not in err  # the setting was checked before the data
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("name,value", [("grad_clip", float("nan")), ("lr", float("inf")),
                                        ("weight_decay", float("nan")), ("beta1", 2.0), ("seed", 1e23),
                                        ("beta2", 1.0), ("lr", 0.0), ("min_lr", float("-inf")),
                                        ("max_steps", 0), ("seed", -1), ("epochs", float("nan"))])
def test_bad_numbers_from_python_are_refused_before_anything_is_written(name, value, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(out), device="cpu", **{name: value})
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UserError, match=flag):
        cfg.validate()
    with pytest.raises(UserError, match=flag):
        pretrain(cfg)
    assert not out.exists()


def test_good_numbers_pass(tmp_path):
    TrainConfig(data="d", out="o", grad_clip=0.0, lr=1e-3, weight_decay=0.0, beta1=0.0, beta2=0.999,
                seed=2**63 - 1, min_lr=0.0, epochs=0.5).validate()
    path = tmp_path / "run.toml"
    path.write_text("lr = 6e-4\nseed = 1e3\nbeta1 = 0\n")
    assert load_config_file(path) == {"lr": 6e-4, "seed": 1000, "beta1": 0.0}


# ------------------------------------------------------------------ --resume: stored settings and given ones

# the settings that may differ from the stored ones on --resume (api.md: max_steps, eval/log/sample/checkpoint
# settings, device, dtype, compile, tensorboard; and the run dir's own path, which may have moved)
RESUMABLE = {"out", "max_steps", "eval_every", "eval_batches", "sample_every", "sample_tokens", "log_every",
             "checkpoint_every", "keep_checkpoints", "tensorboard", "device", "dtype", "compile", "resume",
             "activation_checkpointing", "batch_size"}  # batch_size: the tokens per step stay the run's


def test_which_settings_may_change_on_resume():
    for cls in (TrainConfig, SFTConfig, ClassifyConfig):
        assert {f.name for f in fields(cls) if f.metadata.get("resumable")} == RESUMABLE, cls.__name__


def test_merge_for_resume():
    stored = {"data": "/data/a", "out": "/runs/a", "lr": 0.003, "batch_size": 4, "seq_len": 32, "max_steps": 10,
              "warmup_steps": 5, "eval_every": 5, "model": "tiny", "n_layer": None, "block_size": 64,
              "resume": False, "dtype": "fp32"}
    # nothing given: the stored settings (not the defaults); resume is on
    merged = merge_for_resume(TrainConfig, stored, {"out": "/runs/a", "resume": True})
    assert {k: merged[k] for k in stored if k != "resume"} == {k: v for k, v in stored.items() if k != "resume"}
    assert merged["resume"] is True and merged["lr"] != TrainConfig.lr
    # given values equal to the stored ones, and resumable ones, are taken
    merged = merge_for_resume(TrainConfig, stored, {"lr": 0.003, "batch_size": 4, "max_steps": 20, "eval_every": 2,
                                                    "device": "cpu", "dtype": "bf16", "out": "/moved/a"})
    assert (merged["max_steps"], merged["eval_every"], merged["dtype"], merged["out"]) == (20, 2, "bf16",
                                                                                           "/moved/a")
    # a model field the run did not set is left for the trainer to check against the stored model
    assert merge_for_resume(TrainConfig, stored, {"n_layer": 2})["n_layer"] == 2
    # anything else that differs is refused, naming the flag and both values
    for name, value in [("lr", 0.01), ("seq_len", 16), ("warmup_steps", 0),
                        ("data", "/data/b"), ("block_size", 32), ("model", "nano"), ("seed", 1)]:
        with pytest.raises(UserError) as e:
            merge_for_resume(TrainConfig, stored, {name: value})
        msg = str(e.value)
        assert msg.startswith("--" + name.replace("_", "-") + " ") and str(value) in msg and "\n" not in msg, msg


def test_merge_for_resume_reads_old_and_odd_stored_values():
    # version 1 stored the resolved dtype and resolved numbers in "train"; unknown keys are ignored
    stored = {"dtype": "float32", "grad_accum": 2, "world_size": 4, "lr": "0.001", "max_steps": 10}
    merged = merge_for_resume(TrainConfig, stored, {})
    assert merged["dtype"] == "fp32" and merged["lr"] == 0.001 and merged["max_steps"] == 10
    assert "grad_accum" not in merged and "world_size" not in merged
    assert merge_for_resume(TrainConfig, None, {})["lr"] == TrainConfig.lr


def test_resume_settings_in_a_config_file_are_checked_too(tmp_path, capsys):
    """--resume with a --config file: its settings are given settings, so one that differs is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "format": "gpt2lab-run", "version": 2, "kind": "lm", "task": "pretrain",
        "model": GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=64).to_dict(),
        "tokenizer": {"name": "x", "sha256": "0" * 64, "vocab_size": 512, "eot_id": 0},
        "train": {"data": str(tmp_path / "data"), "out": str(run), "lr": 0.003, "model": "tiny"},
        "data": None}))
    before = sorted(p.name for p in run.iterdir())
    path = tmp_path / "more.toml"
    path.write_text("lr = 0.004\n")
    code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(run), "--config", str(path)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "--lr 0.004" in err and "0.003" in err
    assert sorted(p.name for p in run.iterdir()) == before


# ----------------------------------------------------------------------------- the shipped config files

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_config_files_build_valid_configs(name):
    from gpt2lab.train.config import build

    cfg = build(TrainConfig, {**load_config_file(CONFIGS / name, TrainConfig), "out": "runs/x", "data": "data/x"})
    cfg.validate()
    GPTConfig.from_preset(cfg.model, **model_overrides(cfg))  # the model it describes is a valid one


def test_demo_is_the_modern_recipe_and_classic_is_gpt2_at_the_same_budget():
    from gpt2lab.train.config import build

    demo = build(TrainConfig, load_config_file(CONFIGS / "demo.toml", TrainConfig))
    classic = build(TrainConfig, load_config_file(CONFIGS / "gpt2-classic.toml", TrainConfig))
    modern = GPTConfig.from_preset(demo.model, **model_overrides(demo))
    gpt2 = GPTConfig.from_preset(classic.model, **model_overrides(classic))
    assert (modern.pos_embedding, modern.norm, modern.qk_norm, modern.mlp, modern.tie_embeddings, modern.bias) == (
        "rope", "rmsnorm", True, "swiglu", True, False)
    assert demo.optimizer == "muon" and classic.optimizer == "adamw"
    assert gpt2 == GPTConfig.from_preset("micro", block_size=gpt2.block_size)  # GPT-2's architecture throughout
    budget = ("model", "block_size", "batch_size", "seq_len", "max_steps", "lr", "min_lr", "warmup_steps", "seed")
    assert all(getattr(demo, k) == getattr(classic, k) for k in budget)
