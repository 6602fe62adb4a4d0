"""Data-parallel training on CPU: two gloo processes give the updates of one process with the same
number of tokens per step, only rank 0 writes, and a killed 2-process run resumes bitwise.

One test launches through `torch.distributed.run` (torchrun) exactly as a user would; the others
use the `gpt2lab_procs` fixture (conftest.py), which forks the ranks of `gpt2lab pretrain` with the
environment torchrun would give them, to save the ~8 s of imports per process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.config import TrainConfig
from gpt2lab.train import pretrain

pytestmark = pytest.mark.slow  # every test here starts several processes

SEQ = 32
BASE = dict(model="tiny", block_size=SEQ, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2,
            eval_every=3, eval_batches=2, log_every=1, checkpoint_every=1000, keep_checkpoints=2,
            tensorboard=False, device="cpu", dtype="fp32", sample_tokens=1, dropout=0.0,
            data_order="sequential")
RUN_FILES = {"config.json", "tokenizer.json", "model.safetensors", "metrics.jsonl", "checkpoints"}


def cfg(data, out, **overrides) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**BASE, **overrides})


def cli_args(data, out, **overrides) -> list[str]:
    argv = ["pretrain", "--data", str(data), "--out", str(out)]
    for key, value in {**BASE, **overrides}.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


def metrics(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """{step: loss}, {step: val_loss}, after checking that no line or step is written twice."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "duplicate lines in metrics.jsonl"
    records = [json.loads(line) for line in lines]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    for kind, pairs in (("loss", losses), ("val_loss", vals)):
        steps = [s for s, _ in pairs]
        assert steps == sorted(set(steps)), f"{run}: {kind} steps repeated or out of order: {steps}"
    return dict(losses), dict(vals)


def train_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["train"]


def close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol == 0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_only_rank0_wrote(run: Path, result: dict | None = None) -> None:
    assert {p.name for p in run.iterdir()} == RUN_FILES
    if result is not None:  # per-rank output of a forked run
        rank0, rank1 = result["ranks"]
        assert rank0["out"].count("final val loss") == 1 and "| loss " in rank0["out"]
        assert rank1["out"] == "" and rank1["err"] == "", rank1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torchrun_two_processes_equal_one_with_double_batch(tiny_data, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GPT2LAB_DEBUG"):
        env.pop(k, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*torchrun, "-m", "gpt2lab", *cli_args(tiny_data, ddp, batch_size=4)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ref = pretrain(cfg(tiny_data, single, batch_size=8))  # meanwhile, in this process
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    train = train_config(ddp)
    assert (train["world_size"], train["batch_size"], train["grad_accum"]) == (2, 4, 1)
    assert train["total_batch_tokens"] == train_config(single)["total_batch_tokens"] == 8 * SEQ
    losses, vals = metrics(ddp)
    assert sorted(losses) == ref.steps == list(range(1, 7))
    assert [losses[s] for s in ref.steps] == pytest.approx(ref.losses, abs=1e-5, rel=0)
    assert ref.losses[-1] != pytest.approx(ref.losses[0], abs=1e-3)
    # the validation windows are split across the ranks: 2 x 4 of them per batch = the 8 of one process
    assert sorted(vals) == ref.val_steps == [3, 6]
    assert [vals[s] for s in ref.val_steps] == pytest.approx(ref.val_losses, abs=1e-5, rel=0)
    close_weights(ddp, single, atol=1e-5)
    assert_only_rank0_wrote(ddp)
    assert out.count("final val loss") == 1 and out.count("training: ") == 1, out


@pytest.fixture(scope="module")
def forked_runs(tiny_data, tmp_path_factory, gpt2lab_procs):
    """All forked runs of this file in one launcher: (results by name, run dirs by name)."""
    root = tmp_path_factory.mktemp("ddp")
    accum = dict(total_batch_tokens=2 * 4 * 2 * SEQ)
    resume = dict(max_steps=16, data_order="random", dropout=0.1, checkpoint_every=2, eval_every=4)
    dirs = {name: root / name for name in ("acc2", "acc1", "ref2", "run2")}
    jobs = {
        "acc2": {"argv": cli_args(tiny_data, dirs["acc2"], **accum), "nproc": 2},
        "acc1": {"argv": cli_args(tiny_data, dirs["acc1"], **accum), "nproc": 1},
        "ref2": {"argv": cli_args(tiny_data, dirs["ref2"], **resume), "nproc": 2},
        "kill2": {"argv": cli_args(tiny_data, dirs["run2"], **resume), "nproc": 2,
                  "run_dir": str(dirs["run2"]), "kill_at_step": 4, "kill_delay": 0.01},
        "resume2": {"argv": cli_args(tiny_data, dirs["run2"], resume=True, **resume), "nproc": 2,
                    "run_dir": str(dirs["run2"])},
        "resume1": {"argv": cli_args(tiny_data, dirs["run2"], resume=True, **resume), "nproc": 1},
    }
    results = gpt2lab_procs(list(jobs.values()))
    return dict(zip(jobs, results)), dirs


def test_two_processes_with_accumulation_equal_one_process(forked_runs):
    """2 processes x batch 4 x accumulation 2 = 1 process x batch 4 x accumulation 4, step by step."""
    results, dirs = forked_runs
    for name in ("acc2", "acc1"):
        assert all(rc == 0 for rc in results[name]["rc"]), results[name]["ranks"][0]["err"][-3000:]
    assert train_config(dirs["acc2"])["grad_accum"] == 2 and train_config(dirs["acc2"])["world_size"] == 2
    assert train_config(dirs["acc1"])["grad_accum"] == 4 and train_config(dirs["acc1"])["world_size"] == 1
    two, one = metrics(dirs["acc2"])[0], metrics(dirs["acc1"])[0]
    assert sorted(two) == sorted(one) == list(range(1, 7))
    assert [two[s] for s in sorted(one)] == pytest.approx([one[s] for s in sorted(one)], abs=1e-5, rel=0)
    close_weights(dirs["acc2"], dirs["acc1"], atol=1e-5)


def test_only_rank_0_writes(forked_runs):
    results, dirs = forked_runs
    assert results["acc2"]["rc"] == [0, 0]
    assert_only_rank0_wrote(dirs["acc2"], results["acc2"])
    lines = (dirs["acc2"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 2  # one line per step and per evaluation, once
    assert [p.name for p in (dirs["acc2"] / "checkpoints").iterdir()] == ["step_000006"]


def test_killed_two_process_run_resumes_bitwise(forked_runs):
    results, dirs = forked_runs
    assert results["ref2"]["rc"] == [0, 0], results["ref2"]["ranks"][0]["err"][-3000:]
    kill = results["kill2"]
    assert kill["killed"] and kill["rc"] == [-9, -9], kill
    assert 4 <= kill["newest_checkpoint"] < 16, "the kill came too late to interrupt the run"
    resumed = results["resume2"]
    assert resumed["rc"] == [0, 0], resumed["ranks"][0]["err"][-3000:]
    assert resumed["ranks"][0]["out"].startswith(f"resuming at step {kill['newest_checkpoint']}")
    close_weights(dirs["run2"], dirs["ref2"], atol=0)
    assert metrics(dirs["run2"]) == metrics(dirs["ref2"])
    assert sorted(metrics(dirs["run2"])[0]) == list(range(1, 17))
    assert_only_rank0_wrote(dirs["run2"], resumed)
    state = json.loads((dirs["run2"] / "checkpoints" / "step_000016" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["loaders"]) == 2
    assert state["loaders"][0]["rng"] != state["loaders"][1]["rng"]  # each rank draws its own windows


def test_resume_with_another_number_of_processes_is_refused(forked_runs):
    results, dirs = forked_runs
    res = results["resume1"]
    err = res["ranks"][0]["err"]
    assert res["rc"] == [2], err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "2 processes" in err and "1" in err
    assert sorted(metrics(dirs["run2"])[0]) == list(range(1, 17))  # the run is left as it was
