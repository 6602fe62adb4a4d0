"""The training loop and what surrounds it: AdamW written out, parameter groups, the learning-rate
schedule, gradient accumulation, the run directory, config files and flags, user errors,
non-finite losses, --init-from and `gpt2lab plot`.

Runs use a 2-layer, 32-wide model on a 512-token BPE of a slice of Shakespeare (the `tiny_data`
fixture in conftest.py), so a training step takes milliseconds on one CPU thread.
"""

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pretrain_argv
from safetensors.torch import load_file

from gpt2lab import cli
from gpt2lab.checkpoint import load_run
from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.shards import read_meta
from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.train import pretrain as train_mod  # the module whose task computes the loss
from gpt2lab.train.checkpoints import list_checkpoints
from gpt2lab.train.config import TrainConfig, load_config_file
from gpt2lab.train.optim import ScratchAdamW, lr_at, make_optimizer, param_groups
from gpt2lab.train.pretrain import pretrain
from gpt2lab.train.task import IGNORE_INDEX, NonFiniteLoss, lm_loss

SEQ = 32
TINY = dict(model="tiny", block_size=SEQ, batch_size=8, max_steps=10, lr=3e-3, warmup_steps=2,
            eval_every=1000, eval_batches=2, log_every=1, checkpoint_every=1000, keep_checkpoints=2,
            tensorboard=False, device="cpu", dtype="fp32", sample_tokens=4, dropout=0.0)


def tiny_cfg(data, out, **overrides) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**TINY, **overrides})


def cli_args(data, out, **overrides) -> list[str]:
    return pretrain_argv(data, out, {**TINY, **overrides})


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def weights(run_or_file: Path) -> dict[str, torch.Tensor]:
    path = run_or_file / "model.safetensors" if run_or_file.is_dir() else run_or_file
    return load_file(str(path))


def digests(root: Path) -> dict[str, str]:
    """Every file's sha256, but the run lock's (.lock names the process that last took it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """100 steps with TensorBoard on, a checkpoint every 25 steps, the newest 2 kept."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pretrain(tiny_cfg(tiny_data, out, max_steps=100, warmup_steps=10, eval_every=50, eval_batches=4,
                      checkpoint_every=25, keep_checkpoints=2, tensorboard=True))
    return out


def small_gpt(vocab_size=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))


# ------------------------------------------------------------------ optimiser and schedule


def test_scratch_adamw_matches_torch_adamw():
    ref, mine = small_gpt(), small_gpt()
    mine.load_state_dict(ref.state_dict())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt_ref = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_mine = make_optimizer(mine, kind="adamw-scratch", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(opt_mine, ScratchAdamW)
    assert [g["weight_decay"] for g in opt_mine.param_groups] == [0.1, 0.0]
    assert all(len(g["params"]) > 0 for g in opt_mine.param_groups)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        lr = lr_at(step, lr=1e-2, min_lr=1e-3, warmup_steps=3, max_steps=20)
        x = torch.randint(0, 64, (4, 16), generator=gen)
        y = torch.randint(0, 64, (4, 16), generator=gen)
        for model, opt in ((ref, opt_ref), (mine, opt_mine)):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            lm_loss(model(x), y).backward()
            opt.step()
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8,
                                       msg=lambda m, n=name, s=step: f"{n} at step {s}: {m}")
    for name, p in ref.named_parameters():
        assert not torch.equal(p, start[name]), f"{name} never moved"
    # the moments match too
    for p, q in zip(ref.parameters(), mine.parameters()):
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_mine.state[q][moment], opt_ref.state[p][moment], rtol=1e-6, atol=0)


def test_scratch_adamw_decays_only_its_decay_group():
    """With zero gradients Adam's step is zero, so only the decoupled decay moves the weights."""
    model = small_gpt()
    opt = make_optimizer(model, kind="adamw-scratch", lr=0.5, weight_decay=0.1)
    before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, no_decay = opt.param_groups
    for p, b in zip(decay["params"], before[0]):
        torch.testing.assert_close(p, b * (1 - 0.5 * 0.1), rtol=1e-6, atol=0)
    for p, b in zip(no_decay["params"], before[1]):
        assert torch.equal(p, b)


def test_param_groups_decay_matrices_only():
    model = small_gpt()
    names = {id(p): n for n, p in model.named_parameters()}  # the tied wte / lm_head once
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = [names[id(p)] for p in decay["params"]]
    kept = [names[id(p)] for p in no_decay["params"]]
    matrices = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert sorted(decayed) == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in matrices)
    assert "transformer.wte.weight" in kept and "transformer.wpe.weight" in kept
    assert {n for n in kept if n.endswith(".bias")} == {n for n in names.values() if n.endswith(".bias")}
    layer_norms = {"transformer.ln_f.weight", "transformer.h.0.ln_1.weight", "transformer.h.1.ln_2.weight"}
    assert layer_norms <= set(kept)
    everything = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(everything) == len(set(everything)) == len(names)
    assert everything.count(id(model.lm_head.weight)) == 1
    assert model.lm_head.weight is model.transformer.wte.weight

    decay_e, no_decay_e = param_groups(model, 0.1, decay_embeddings=True)
    decayed_e = {names[id(p)] for p in decay_e["params"]}
    assert decayed_e == set(decayed) | {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(p.dim() == 1 for p in no_decay_e["params"])
    everything = [id(p) for g in (decay_e, no_decay_e) for p in g["params"]]
    assert len(everything) == len(set(everything)) == len(names)


def test_param_groups_skip_frozen_parameters():
    model = small_gpt()
    model.transformer.wpe.weight.requires_grad_(False)
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert id(model.transformer.wpe.weight) not in grouped
    assert len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_schedule():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    f = lambda s: lr_at(s, lr=lr, min_lr=min_lr, warmup_steps=warmup, max_steps=max_steps)
    ramp = [f(s) for s in range(warmup)]
    assert ramp[0] == pytest.approx(lr / warmup)
    assert ramp[-1] == pytest.approx(lr)
    assert [b - a for a, b in zip(ramp, ramp[1:])] == pytest.approx([lr / warmup] * (warmup - 1))
    decay = [f(s) for s in range(warmup, max_steps + 1)]
    assert decay[0] == pytest.approx(lr)
    assert all(a > b for a, b in zip(decay, decay[1:])), "not strictly decreasing after warmup"
    assert f(max_steps) == pytest.approx(min_lr)
    assert f(max_steps + 25) == pytest.approx(min_lr)
    assert f(warmup + (max_steps - warmup) // 2) == pytest.approx((lr + min_lr) / 2)
    assert min(decay) >= min_lr - 1e-15
    assert lr_at(0, lr=lr, min_lr=0.0, warmup_steps=0, max_steps=100) == pytest.approx(lr)


def test_lm_loss_ignores_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    masked = targets.clone()
    masked[:, :2] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 11), targets[:, 2:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, masked), expected)
    assert lm_loss(logits, targets).item() != pytest.approx(expected.item())


# ------------------------------------------------------------------ the loop


def test_grad_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    common = dict(max_steps=8, data_order="sequential", dropout=0.0)
    big = pretrain(tiny_cfg(tiny_data, tmp_path / "big", batch_size=8, **common))
    acc = pretrain(tiny_cfg(tiny_data, tmp_path / "acc", batch_size=4, total_batch_tokens=2 * 4 * SEQ,
                            **common))
    train_acc = json.loads((tmp_path / "acc" / "config.json").read_text())["resolved"]
    assert train_acc["grad_accum"] == 2 and train_acc["total_batch_tokens"] == 8 * SEQ
    assert json.loads((tmp_path / "big" / "config.json").read_text())["resolved"]["grad_accum"] == 1
    assert acc.steps == big.steps == list(range(1, 9))
    assert acc.losses == pytest.approx(big.losses, abs=1e-5, rel=0)
    assert big.losses[-1] != pytest.approx(big.losses[0], abs=1e-3)  # the weights did change
    wa, wb = weights(tmp_path / "acc"), weights(tmp_path / "big")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_grad_clip_off_equals_clip_above_the_norm(tiny_data, tmp_path):
    common = dict(max_steps=6, data_order="sequential")
    off = pretrain(tiny_cfg(tiny_data, tmp_path / "off", grad_clip=0.0, **common))
    high = pretrain(tiny_cfg(tiny_data, tmp_path / "high", grad_clip=1e6, **common))
    tight = pretrain(tiny_cfg(tiny_data, tmp_path / "tight", grad_clip=1e-3, **common))
    norms = [r["grad_norm"] for r in read_metrics(tmp_path / "off")[0]]
    assert len(norms) == 6 and all(0 < n < 1e6 for n in norms)
    assert off.losses == high.losses
    wo, wh = weights(tmp_path / "off"), weights(tmp_path / "high")
    assert all(torch.equal(wo[k], wh[k]) for k in wo)
    # and clipping does something when the norm is above the limit
    assert tight.losses[0] == off.losses[0] and tight.losses[1:] != off.losses[1:]


def test_loss_goes_down(trained_run):
    losses, vals = read_metrics(trained_run)
    assert [r["step"] for r in losses] == list(range(1, 101))
    first = losses[0]["loss"]
    assert first == pytest.approx(math.log(512), abs=0.3)  # a fresh model guesses uniformly
    last10 = sum(r["loss"] for r in losses[-10:]) / 10
    assert last10 < first - 0.7, (first, last10)
    assert [v["step"] for v in vals] == [50, 100]
    assert vals[-1]["val_loss"] < first - 0.7
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]


def test_run_dir_layout(trained_run, tiny_data):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["format"] == "gpt2lab-run" and cfg["version"] == 2
    assert cfg["kind"] == "lm" and cfg["task"] == "pretrain"
    assert {"model", "train", "tokenizer", "data", "resolved"} <= set(cfg)
    assert cfg["model"]["vocab_size"] == 512 and cfg["model"]["block_size"] == SEQ
    assert (cfg["model"]["n_layer"], cfg["model"]["n_head"], cfg["model"]["n_embd"]) == (2, 2, 32)
    # "train": the settings as given (what --resume reuses); "resolved": what they came to
    train, resolved = cfg["train"], cfg["resolved"]
    assert train["max_steps"] == 100 and train["resume"] is False
    assert train["seq_len"] is None and train["total_batch_tokens"] is None and train["min_lr"] is None
    assert train["model"] == "tiny" and train["block_size"] == SEQ and train["n_layer"] is None
    assert resolved["max_steps"] == 100 and resolved["seq_len"] == SEQ and resolved["grad_accum"] == 1
    assert resolved["total_batch_tokens"] == 8 * SEQ and resolved["world_size"] == 1
    assert resolved["min_lr"] == pytest.approx(3e-4)
    assert (resolved["dtype"], resolved["device"]) == ("float32", "cpu")
    meta = read_meta(tiny_data)
    tok = load_tokenizer_file(trained_run / "tokenizer.json")
    assert cfg["tokenizer"]["sha256"] == tok.fingerprint == meta["tokenizer"]["sha256"]
    assert cfg["tokenizer"]["vocab_size"] == 512 and cfg["tokenizer"]["eot_id"] == tok.eot_id
    assert cfg["data"]["path"] == str(Path(tiny_data).resolve())
    assert cfg["data"]["tokens"] == {k: v["tokens"] for k, v in meta["splits"].items()}

    final = weights(trained_run)
    assert "lm_head.weight" not in final and "transformer.wte.weight" in final
    model, _ = load_run(trained_run)
    assert torch.equal(model.lm_head.weight, final["transformer.wte.weight"])

    ckpts = list_checkpoints(trained_run)
    assert [p.name for p in ckpts] == ["step_000075", "step_000100"]  # keep_checkpoints=2
    assert len(ckpts) == train["keep_checkpoints"]
    assert not [p for p in (trained_run / "checkpoints").iterdir() if p not in ckpts]
    assert {p.name for p in ckpts[-1].iterdir()} == {"model.safetensors", "trainer.pt", "state.json"}
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["step"] == 100 and state["tokens_seen"] == 100 * 8 * SEQ
    newest = weights(ckpts[-1] / "model.safetensors")
    assert newest.keys() == final.keys() and all(torch.equal(newest[k], final[k]) for k in final)

    losses, vals = read_metrics(trained_run)
    assert all({"step", "loss", "lr", "grad_norm", "tokens"} <= set(r) for r in losses)
    assert all(math.isfinite(r["loss"]) for r in losses)
    assert all({"step", "val_loss"} <= set(v) for v in vals)
    if importlib.util.find_spec("tensorboard") is not None:
        events = list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events)


# ------------------------------------------------------------------ config files and flags


@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_config_file_then_flags(tiny_data, tmp_path, suffix, capsys):
    out = tmp_path / "run"
    settings = {"data": str(tiny_data), "out": str(out), "model": "tiny", "block-size": SEQ,
                "max_steps": 3, "batch-size": 2, "lr": 0.002, "dropout": 0.1, "bias": False,
                "seq_len": 16, "device": "cpu", "dtype": "fp32", "tensorboard": False,
                "eval_batches": 1, "sample_tokens": 2, "warmup_steps": 1}
    path = tmp_path / f"run.{suffix}"
    if suffix == "toml":
        lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in
                 settings.items()]
    else:
        lines = [f"{k}: {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in
                 settings.items()]
    path.write_text("\n".join(lines) + "\n")
    assert load_config_file(path)["batch_size"] == 2

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--config", str(path), "--lr", "0.001", "--dropout", "0", "--max-steps", "2"])
    assert e.value.code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    train = cfg["train"]
    assert train["lr"] == 0.001 and train["max_steps"] == 2 and train["dropout"] == 0.0  # flags
    assert train["batch_size"] == 2 and train["seq_len"] == 16 and train["warmup_steps"] == 1  # file
    assert train["tensorboard"] is False and train["dtype"] == "fp32" and cfg["resolved"]["dtype"] == "float32"
    assert cfg["model"]["bias"] is False and cfg["model"]["dropout"] == 0.0
    assert [r["step"] for r in read_metrics(out)[0]] == [1, 2]
    assert not (out / "tensorboard").exists()


def test_unknown_config_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    path = tmp_path / "bad.toml"
    path.write_text("max_steps = 3\nlearning_rate = 0.1\n")
    with pytest.raises(UserError) as e:
        load_config_file(path)
    msg = str(e.value)
    assert "learning_rate" in msg and str(path) in msg
    from dataclasses import fields

    known = msg.split("known settings:", 1)[1]
    assert all(f.name in known for f in fields(TrainConfig))

    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("max-steps: 3\nwarmup: 10\n")
    with pytest.raises(UserError, match="'warmup'"):
        load_config_file(yaml_path)

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--config", str(path), "--data", "x", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "learning_rate" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("suffix,text,field,value", [
    ("yaml", "lr: 6e-4\n", "lr", 6e-4),  # YAML 1.1 reads 6e-4 (no dot) as a string
    ("toml", 'max_steps = "2"\n', "max_steps", 2),
    ("toml", 'tensorboard = "false"\n', "tensorboard", False),
])
def test_config_file_value_of_the_wrong_type(tiny_data, tmp_path, capsys, monkeypatch, suffix, text, field,
                                             value):
    """A value of the wrong type in a config file is either converted or a one-line error naming the
    setting; never a traceback, and never silently taken (a string 'no' is truthy)."""
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    path = tmp_path / f"run.{suffix}"
    path.write_text(text)
    out = tmp_path / "run"
    argv = cli_args(tiny_data, out, **{"max_steps": 2, "sample_tokens": 1, field: None})  # the file sets it
    code = None
    try:
        cli.main(["pretrain", "--config", str(path), *argv[1:]])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if code == 0:
        assert json.loads((out / "config.json").read_text())["train"][field] == value
    else:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert field in err.replace("-", "_"), err


def test_out_that_is_a_file_is_a_user_error(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    target = tmp_path / "not-a-dir"
    target.write_text("keep me\n")
    with pytest.raises(SystemExit) as e:
        cli.main(cli_args(tiny_data, target, max_steps=2))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(target) in err
    assert target.read_text() == "keep me\n"


def test_sampling_during_training_does_not_change_it(tiny_data, tmp_path, capsys):
    common = dict(max_steps=6, dropout=0.1, data_order="random")
    plain = pretrain(tiny_cfg(tiny_data, tmp_path / "plain", **common))
    sampled = pretrain(tiny_cfg(tiny_data, tmp_path / "sampled", sample_every=2, sample_tokens=8, **common))
    assert capsys.readouterr().out.count("--- sample at step") == 2  # steps 2 and 4; not the last
    assert sampled.losses == plain.losses
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "sampled")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------ errors a user can fix


def _one_line_error(name: str, rc: int, out: str, err: str, needles: list[str]) -> str | None:
    ok = (rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err + out
          and all(n in err for n in needles))
    return None if ok else f"{name}: rc={rc} stderr={err!r}"


@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(tiny_data, tiny_data_other_tokenizer, trained_run, tmp_path,
                                          gpt2lab_procs):
    """The first case runs as `python -m gpt2lab pretrain ...`, the rest as forked copies of the command
    (real processes with their own exit status and stderr, without paying the torch import each)."""
    # a run whose data directory is later prepared again, at the same path, with another tokenizer
    moved_data, retokenized = tmp_path / "data", tmp_path / "retokenized"
    shutil.copytree(tiny_data, moved_data)
    pretrain(tiny_cfg(moved_data, retokenized, max_steps=2, sample_tokens=0))
    shutil.rmtree(moved_data)
    shutil.copytree(tiny_data_other_tokenizer, moved_data)
    cases = {
        "missing data": (cli_args(tmp_path / "no-such-data", tmp_path / "r1"),
                         ["no-such-data", "does not exist"]),
        "batch not divisible": (cli_args(tiny_data, tmp_path / "r2", total_batch_tokens=300),
                                ["300", "multiple of 256"]),
        "run exists": (cli_args(tiny_data, trained_run), ["already holds a run", "--resume"]),
        "resume without run": (cli_args(tiny_data, tmp_path / "r4", resume=True), ["--resume", "no run"]),
        "unknown preset": (cli_args(tiny_data, tmp_path / "r5", model="gpt5"), ["'gpt5'", "tiny"]),
        "seq-len > block": (cli_args(tiny_data, tmp_path / "r6", seq_len=64), ["--seq-len 64", "32"]),
        "init-from other tokenizer": (cli_args(tiny_data_other_tokenizer, tmp_path / "r7",
                                               init_from=str(trained_run)),
                                      ["another tokenizer", str(trained_run), str(tiny_data_other_tokenizer)]),
        "resume with other tokenizer": (cli_args(moved_data, retokenized, max_steps=2, sample_tokens=0,
                                                 resume=True),
                                        ["another tokenizer", str(moved_data), str(retokenized)]),
        "resume with other data": (cli_args(tiny_data_other_tokenizer, trained_run, max_steps=100,
                                            warmup_steps=10, eval_every=50, eval_batches=4, checkpoint_every=25,
                                            tensorboard=True, resume=True),
                                   ["--data", str(tiny_data_other_tokenizer), "differs"]),
    }
    names = list(cases)
    before, before_retokenized = digests(trained_run), digests(retokenized)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GPT2LAB_DEBUG"):
        env.pop(k, None)
    procs = {name: subprocess.Popen([sys.executable, "-m", "gpt2lab", *cases[name][0]], text=True, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in names[:1]}
    forked = gpt2lab_procs([{"argv": cases[name][0]} for name in names[1:]], train=False)
    failures = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        failures.append(_one_line_error(name, proc.returncode, out, err, cases[name][1]))
    for name, res in zip(names[1:], forked):
        rank0 = res["ranks"][0]
        failures.append(_one_line_error(name, res["rc"][0], rank0["out"], rank0["err"], cases[name][1]))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
    for i in (1, 2, 4, 5, 6, 7):
        assert not (tmp_path / f"r{i}").exists(), f"r{i} was created by a failed command"
    assert digests(trained_run) == before
    assert digests(retokenized) == before_retokenized


def test_non_finite_loss_stops_and_keeps_checkpoints(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_loss = train_mod.lm_loss
    calls, snapshot = [0], {}

    def nan_on_fifth_training_step(logits, targets):
        loss = real_loss(logits, targets)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 5:
                snapshot.update(digests(out / "checkpoints"))
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "lm_loss", nan_on_fifth_training_step)
    cfg = dict(max_steps=10, checkpoint_every=3, keep_checkpoints=0)
    with pytest.raises(NonFiniteLoss) as e:
        pretrain(tiny_cfg(tiny_data, out, **cfg))
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "nan" in msg and "step 5" in msg and "step_000003" in msg, msg
    # it names the last checkpoint in full and how to continue from it, in one line
    assert str(list_checkpoints(out)[-1]) in msg and "--resume" in msg and "\n" not in msg, msg
    assert snapshot and digests(out / "checkpoints") == snapshot
    assert [p.name for p in list_checkpoints(out)] == ["step_000003"]
    assert not (out / "model.safetensors").exists()
    kept = weights(out / "checkpoints" / "step_000003" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert [r["step"] for r in read_metrics(out)[0]] == [1, 2, 3, 4]

    # once the cause is gone, --resume continues from the last good checkpoint
    monkeypatch.setattr(train_mod, "lm_loss", real_loss)
    result = pretrain(tiny_cfg(tiny_data, out, resume=True, **cfg))
    assert result.steps == list(range(4, 11))
    assert all(math.isfinite(x) for x in result.losses)


def test_non_finite_loss_before_any_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    real_loss = train_mod.lm_loss
    monkeypatch.setattr(train_mod, "lm_loss", lambda logits, targets: logits.sum() * float("inf"))
    with pytest.raises(NonFiniteLoss, match="step 1.*no checkpoint"):
        pretrain(tiny_cfg(tiny_data, tmp_path / "run", max_steps=3))

    # on the command line: one error line that says to run it again without --resume
    out = tmp_path / "cli"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(cli_args(tiny_data, out, max_steps=3, checkpoint_every=2))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "step 1" in err and "no checkpoint" in err and "without --resume" in err, err
    assert "checkpoints/" not in err and list_checkpoints(out) == []
    # following the advice works: a new --lr (which --resume would refuse) and a run from step 0
    monkeypatch.setattr(train_mod, "lm_loss", real_loss)
    with pytest.raises(SystemExit) as e:
        cli.main(cli_args(tiny_data, out, max_steps=3, checkpoint_every=2, lr=1e-3, sample_tokens=0))
    assert e.value.code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)[0]] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3


def test_init_from_starts_from_the_other_runs_weights(trained_run, tiny_data, tmp_path):
    out = tmp_path / "ft"
    result = pretrain(tiny_cfg(tiny_data, out, init_from=str(trained_run), max_steps=3,
                               data_order="sequential"))
    assert result.steps == [1, 2, 3]  # the step counter starts again
    model, _ = load_run(trained_run)
    x, y = TokenLoader(tiny_data, "train", 8, SEQ, mode="sequential").next_batch()
    with torch.no_grad():
        expected = lm_loss(model(x), y).item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)
    assert expected < math.log(512) - 0.5  # the trained model, not a fresh one
    src = json.loads((trained_run / "config.json").read_text())
    new = json.loads((out / "config.json").read_text())
    assert new["model"] == src["model"] and new["tokenizer"] == src["tokenizer"]
    assert new["train"]["init_from"] == str(trained_run)
    first = read_metrics(out)[0][0]
    assert first["step"] == 1 and first["lr"] == pytest.approx(lr_at(0, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                                                                     max_steps=3))


def test_plot_writes_a_png(trained_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as e:
        cli.main(["plot", str(trained_run), "--out", str(png)])
    assert e.value.code == 0, capsys.readouterr().err
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert str(png) in capsys.readouterr().out
