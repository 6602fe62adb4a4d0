"""Everyday use off the demo's path: the command list, "did you mean", devices that are not there, --stop
escapes, your own Q/A file, Ctrl-C in training and the way back, --resume of nothing, the classifier's
flags and printing, `gpt2lab info`, `gpt2lab plot` of several runs, warmup and CPU notes, dry-run times,
SFT's count of cut and dropped records."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_argv

from gpt2lab import cli

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny", block_size=32, batch_size=8, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=6,
            eval_batches=1, log_every=1, checkpoint_every=3, tensorboard=False, device="cpu", sample_tokens=0)


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("everyday")
    runs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        with pytest.raises(SystemExit) as e:
            cli.main(pretrain_argv(tiny_data, root / name, {**TINY, "lr": lr}))
        assert e.value.code == 0
        runs.append(root / name)
    return runs


# ------------------------------------------------------------------------------- the command line


def test_bare_gpt2lab_lists_the_commands(capsys):
    code, out, _ = run([], capsys)
    assert code == 0 and "COMMAND" in out and "pretrain" in out and "serve" in out and "export-gguf" in out


@pytest.mark.parametrize("argv,hint", [
    (["pretrian"], "did you mean pretrain?"),
    (["pretrain", "--data", "d", "--out", "o", "--lrr", "3"], "did you mean --lr?"),
    (["generate", "run", "--top-kk", "3"], "did you mean --top-k?"),
])
def test_a_mistyped_command_or_flag_gets_a_suggestion(argv, hint, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and hint in err and err.count("\n") == 1


def test_a_mistyped_config_key_gets_a_suggestion(tiny_data, tmp_path, capsys):
    (tmp_path / "c.toml").write_text('model = "tiny"\nlearning_rate = 1e-3\nwarmup_step = 3\n')
    code, _, err = run(["pretrain", "--data", tiny_data, "--out", tmp_path / "r", "--config", tmp_path / "c.toml"],
                       capsys)
    assert code == 2 and "unknown setting" in err and err.count("\n") == 1
    (tmp_path / "c.toml").write_text('model = "tiny"\nwarmup_step = 3\n')
    code, _, err = run(["pretrain", "--data", tiny_data, "--out", tmp_path / "r", "--config", tmp_path / "c.toml"],
                       capsys)
    assert code == 2 and "did you mean 'warmup_steps'?" in err


@pytest.mark.parametrize("device", ["mps", "cuda:7", "xla"])
def test_a_device_that_is_not_here_is_one_line(device, tiny_data, tmp_path, capsys):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, _, err = run(pretrain_argv(tiny_data, tmp_path / "r", {**TINY, "device": device}), capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and device in err
    assert not (tmp_path / "r").exists()


def test_stop_text_takes_escapes_like_the_prompt(two_runs, capsys):
    from gpt2lab.checkpoint import load_run
    from gpt2lab.generate import generate

    model, tok = load_run(two_runs[0])
    free = tok.decode(generate(model, tok.encode("\n"), 40, temperature=0.0))
    assert "\n" in free  # the run's greedy text has a line break to stop at
    code, out, _ = run(["generate", two_runs[0], "--prompt", "\\n", "--max-new-tokens", "40", "--temperature", "0",
                        "--stop", "\\n"], capsys)
    assert code == 0 and out.strip("\n") == free.split("\n")[0].strip("\n")


# -------------------------------------------------------------------------------------- data


def test_instructions_take_your_own_qa_file(tmp_path, capsys):
    (tmp_path / "qa.csv").write_text("Question,Answer\nWhat is 2+2?,4\nCapital of France?,Paris\nSky?,blue\n")
    code, out, err = run(["finetune", "instructions", "--source", tmp_path / "qa.csv", "--synthetic", "0",
                          "--heldout-fraction", "0.3", "--out", tmp_path / "i"], capsys)
    assert code == 0, err
    records = [json.loads(x) for f in ("train.jsonl", "heldout.jsonl") for x in (tmp_path / "i" / f).open()]
    assert sorted(r["output"] for r in records) == ["4", "Paris", "blue"]
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q_text": "Hi?", "reply": "Hello"}) + "\n" +
                                       json.dumps({"q_text": "Bye?", "reply": "Goodbye"}) + "\n")
    code, _, err = run(["finetune", "instructions", "--source", tmp_path / "qa.jsonl", "--synthetic", "0",
                        "--out", tmp_path / "j"], capsys)
    assert code == 2 and "--question-field" in err and "q_text" in err
    code, _, err = run(["finetune", "instructions", "--source", tmp_path / "qa.jsonl", "--synthetic", "0",
                        "--question-field", "q_text", "--answer-field", "reply", "--out", tmp_path / "j"], capsys)
    assert code == 0, err
    code, _, err = run(["finetune", "instructions", "--source", tmp_path / "qa.jsonl", "--synthetic", "0",
                        "--question-field", "nope", "--out", tmp_path / "k"], capsys)
    assert code == 2 and "has no such field" in err


# ---------------------------------------------------------------------------------- training


def test_ctrl_c_saves_the_step_and_says_how_to_go_on(tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = pretrain_argv(tiny_data, out, {**TINY, "max_steps": 100000, "checkpoint_every": 100000,
                                          "eval_every": 100000})
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    m = re.search(r"stopped by Ctrl-C after step (\d+)/100000, saved in (\S+); go on with `gpt2lab pretrain --out "
                  r"(\S+) --resume`", stderr)
    assert m, stderr
    assert "Traceback" not in stderr and "Ctrl-C: stopping after this step" in stdout
    step = int(m.group(1))
    assert (out / "checkpoints" / f"step_{step:06d}").is_dir()
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "pretrain", "--out", str(out), "--resume", "--max-steps",
                        str(step + 1)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and f"resuming at step {step}" in r.stdout, r.stderr


def test_resume_of_a_run_that_is_not_there_says_so(tmp_path, capsys):
    code, _, err = run(["pretrain", "--out", tmp_path / "nothing", "--resume"], capsys)
    assert code == 2 and "does not exist, so there is no run to resume" in err


def test_a_warmup_longer_than_the_run_is_clamped_with_a_note(tiny_data, tmp_path, capsys):
    code, out, err = run(pretrain_argv(tiny_data, tmp_path / "r", {**TINY, "max_steps": 5, "warmup_steps": 100}),
                         capsys)
    assert code == 0, err
    assert "--warmup-steps 100 is not shorter than the run (5 steps); warming up for 0 steps" in out


def test_a_slow_first_step_does_not_shorten_a_time_budget(tiny_data, tmp_path, capsys, monkeypatch):
    """The first step holds torch.compile's compilation: timed with the others it would make the run stop far
    short of its budget."""
    import time

    from gpt2lab.train.loop import Trainer

    step, calls = Trainer.train_step, []

    def slow_first(self):
        calls.append(1)
        time.sleep(2.0 if len(calls) == 1 else 0.05)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", slow_first)
    settings = {**TINY, "max_steps": 1000, "time_budget": 4, "eval_every": 1000, "checkpoint_every": 1000}
    code, out, err = run(pretrain_argv(tiny_data, tmp_path / "r", settings), capsys)
    assert code == 0, err
    fitted = int(re.search(r"time budget 4 s: (\d+) steps", out).group(1))
    # about (4 - 2) s left at about 0.05 s a step (plus the step itself): timing the first step would give < 12
    assert 20 <= fitted <= len(calls) + 1 and len(calls) == fitted, out


def test_the_cpu_is_told_what_the_default_model_costs(tiny_data, capsys):
    from gpt2lab.cli.train import _cpu_note
    from gpt2lab.train.config import TrainConfig

    _cpu_note(TrainConfig(data=str(tiny_data), out="x", device="cpu"), {"data": str(tiny_data)})
    out = capsys.readouterr().out
    assert "no --model or --config" in out and "configs/demo.toml" in out
    _cpu_note(TrainConfig(data=str(tiny_data), out="x", device="cpu", model="mini"), {"model": "mini"})
    assert capsys.readouterr().out == ""


def test_dry_run_estimates_time_for_the_device_it_plans_for(tiny_data, tmp_path, capsys):
    code, out, _ = run(["pretrain", "--data", tiny_data, "--out", tmp_path / "r", "--dry-run"], capsys)
    assert code == 0 and re.search(r"time +about .+ on this CPU \(\d+ GFLOP/s measured", out)
    assert "fp32 activations" in out
    code, out, _ = run(["pretrain", "--data", tiny_data, "--out", tmp_path / "r", "--dry-run", "--gpu-memory", "80"],
                       capsys)
    assert code == 0 and "H100-class GPU" in out and "bf16 activations" in out


# ------------------------------------------------------------------------------------- runs


def test_info_describes_a_run(two_runs, capsys):
    code, out, _ = run(["info", two_runs[0]], capsys)
    assert code == 0
    assert "a language-model run (pretrain)" in out and "2 layers" in out and "parameters" in out
    assert "trained    6/6 steps" in out and "val loss" in out and "checkpoints 2" in out
    code, out, _ = run(["info", two_runs[0], "--json"], capsys)
    d = json.loads(out)
    assert d["training"]["steps"] == 6 and d["model"]["layers"] == 2 and d["checkpoints"]
    code, _, err = run(["info", two_runs[0] / "nope"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_plot_compares_runs_on_one_figure(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run(["plot", *two_runs, "--out", tmp_path / "both.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from gpt2lab.plot import _label

    assert _label(two_runs[0]) == f"{two_runs[0]} (pretrain, 2 layers, width 32)"
    code, _, err = run(["plot", two_runs[0], tmp_path / "nope"], capsys)
    assert code == 2 and "nope" in err and not (Path.cwd() / "compare.png").exists()
