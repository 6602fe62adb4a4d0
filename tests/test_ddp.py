"""Data-parallel training on CPU, and the one global data order that makes it exact.

The data order is global (gpt2lab.data.GlobalOrder): each epoch is a permutation of the training
windows, every micro-batch takes the next batch_size x processes of them and rank r its slice. So
1, 2 or 4 gloo processes with the same --total-batch-tokens train on the same windows in every step
and give the same losses (to float rounding); only rank 0 writes; a checkpoint stores one global data
position, so a killed 2-process run resumes bitwise on 2 processes, and on 1 or 4 as well.

One test launches through `torch.distributed.run` (torchrun) exactly as a user would; the others
use the `gpt2lab_procs` fixture (conftest.py), which forks the ranks of `gpt2lab pretrain` with the
environment torchrun would give them, to save the ~8 s of imports per process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pretrain_argv
from safetensors.torch import load_file

from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.order import GlobalOrder
from gpt2lab.data.shards import load_tokens
from gpt2lab.errors import UserError
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.pretrain import pretrain

SEQ = 32
BASE = dict(model="tiny", block_size=SEQ, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2,
            eval_every=3, eval_batches=2, log_every=1, checkpoint_every=1000, keep_checkpoints=2,
            tensorboard=False, device="cpu", dtype="fp32", sample_tokens=1, dropout=0.0,
            data_order="sequential")
RUN_FILES = {"config.json", "tokenizer.json", "model.safetensors", "metrics.jsonl", "checkpoints", ".lock"}
# the same 512 tokens per step on 1, 2 or 4 processes: 4 x 32 tokens x accumulation 4, 2 or 1
STEPS = 16
SAME = dict(total_batch_tokens=4 * 4 * SEQ, data_order="random", max_steps=STEPS, checkpoint_every=2,
            eval_every=4)
WINDOWS_PER_STEP = 4 * 4


def cfg(data, out, **overrides) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**BASE, **overrides})


def cli_args(data, out, **overrides) -> list[str]:
    return pretrain_argv(data, out, {**BASE, **overrides})


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
    """The settings as given (what --resume reuses)."""
    return json.loads((run / "config.json").read_text())["train"]


def resolved(run: Path) -> dict:
    """What the settings came to in the last session: seq_len, grad_accum, world_size, ..."""
    return json.loads((run / "config.json").read_text())["resolved"]


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
        rank0, *others = result["ranks"]
        assert rank0["out"].count("final val loss") == 1 and "| loss " in rank0["out"]
        for rank in others:
            assert rank["out"] == "" and rank["err"] == "", rank


def ok(result: dict) -> str:
    """The assertion message of a forked job: rank 0's stderr."""
    return result["ranks"][0]["err"][-3000:]


# ------------------------------------------------------------------ the global order (no processes)


def test_every_window_is_seen_once_per_epoch_on_any_number_of_ranks(tiny_data):
    """GlobalOrder and TokenLoader on 1 to 4 ranks: in every epoch each window of the train split (offsets
    0, T, 2T, ...) is taken exactly once, by exactly one rank, and the global sequence of windows does not
    depend on the number of ranks."""
    B, T, seed = 3, SEQ, 5
    tokens = np.asarray(load_tokens(tiny_data, "train"), dtype=np.int64)
    n = (len(tokens) - 1) // T
    sequences = {}
    for world in (1, 2, 3, 4):
        loaders = [TokenLoader(tiny_data, "train", B, T, mode="random", seed=seed, rank=r, world_size=world)
                   for r in range(world)]
        twins = [GlobalOrder(n, B, seed=seed, rank=r, world_size=world) for r in range(world)]
        assert all(loader.windows == n for loader in loaders)
        assert loaders[0].steps_per_epoch == -(-n // (B * world))
        seen = []  # (window, rank), in the global order
        while len(seen) < 2 * n:
            for r in range(world):
                x, y = loaders[r].next_batch()
                idx = twins[r].next_indices()
                assert x.shape == y.shape == (B, T)
                for row, k in enumerate(idx):
                    # the window at offset k*T: x its first T ids, y the same shifted by one
                    assert torch.equal(x[row], torch.from_numpy(tokens[k * T:k * T + T])), (world, r, k)
                    assert torch.equal(y[row], torch.from_numpy(tokens[k * T + 1:k * T + T + 1])), (world, r, k)
                    seen.append((int(k), r))
        first, second = [k for k, _ in seen[:n]], [k for k, _ in seen[n:2 * n]]
        assert sorted(first) == sorted(second) == list(range(n)), f"world {world}: a window missed or repeated"
        assert first != second  # each epoch has its own permutation
        assert first != list(range(n))
        # the rank that takes the i-th item of the sequence is (i // B) % world
        assert all(r == (i // B) % world for i, (_, r) in enumerate(seen))
        sequences[world] = [k for k, _ in seen[:2 * n]]
        assert all(loader.epoch == loaders[0].epoch for loader in loaders)
        assert len({json.dumps(loader.state_dict()) for loader in loaders}) == 1  # one global position
    assert sequences[2] == sequences[1] and sequences[3] == sequences[1] and sequences[4] == sequences[1]

    # sequential mode walks the windows in order, and wraps around
    order = GlobalOrder(n, B, rank=1, world_size=2, shuffle=False)
    assert [int(i) for i in order.next_indices()] == [3, 4, 5]


def test_a_data_position_resumes_on_another_number_of_ranks(tiny_data):
    B, T, seed = 2, SEQ, 9
    one = TokenLoader(tiny_data, "train", B, T, mode="random", seed=seed)
    # 1 process x batch 2: the items of 10 micro-batches, then 5 more
    single = [one.next_batch()[0] for _ in range(15)]
    two = [TokenLoader(tiny_data, "train", B, T, mode="random", seed=seed, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # 5 micro-batches of 2 ranks = the first 10 of the single process
        for r in range(2):
            two[r].next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["position"] == 10 * B
    # ... resumed on 1 process and on 5 ranks: the next windows are the ones the single process took next
    again = TokenLoader(tiny_data, "train", B, T, mode="random", seed=seed)
    again.load_state_dict(json.loads(json.dumps(state)))
    for k in range(10, 15):
        assert torch.equal(again.next_batch()[0], single[k])
    five = [TokenLoader(tiny_data, "train", B, T, mode="random", seed=seed, rank=r, world_size=5) for r in range(5)]
    for loader in five:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([loader.next_batch()[0] for loader in five]), torch.cat(single[10:15]))
    # another seq_len, order or data set is refused
    other = TokenLoader(tiny_data, "train", B, T // 2, mode="random", seed=seed)
    with pytest.raises(UserError, match="seq_len"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="--data-order"):
        TokenLoader(tiny_data, "train", B, T, mode="sequential").load_state_dict(state)


# ------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_double_batch(tiny_data, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GPT2LAB_DEBUG"):
        env.pop(k, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*torchrun, "-m", "gpt2lab", *cli_args(tiny_data, ddp, batch_size=4)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # meanwhile, in this process: the same 8 x SEQ tokens per step as 4 x SEQ x 2 accumulation
        ref = pretrain(cfg(tiny_data, single, batch_size=4, total_batch_tokens=8 * SEQ))
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert train_config(ddp)["batch_size"] == 4
    assert (resolved(ddp)["world_size"], resolved(ddp)["grad_accum"]) == (2, 1)
    assert resolved(ddp)["total_batch_tokens"] == resolved(single)["total_batch_tokens"] == 8 * SEQ
    losses, vals = metrics(ddp)
    assert sorted(losses) == ref.steps == list(range(1, 7))
    assert [losses[s] for s in ref.steps] == pytest.approx(ref.losses, abs=1e-5, rel=0)
    assert ref.losses[-1] != pytest.approx(ref.losses[0], abs=1e-3)
    # validation: the same batches whatever the number of processes, each process scoring its share
    assert sorted(vals) == ref.val_steps == [3, 6]
    assert [vals[s] for s in ref.val_steps] == pytest.approx(ref.val_losses, abs=1e-5, rel=0)
    close_weights(ddp, single, atol=1e-5)
    assert_only_rank0_wrote(ddp)
    assert out.count("final val loss") == 1 and out.count("training: ") == 1, out


# ------------------------------------------------------------------ forked ranks


@pytest.fixture(scope="module")
def forked_runs(tiny_data, tmp_path_factory, gpt2lab_procs):
    """All forked runs of this file in one launcher: (results by name, run dirs by name)."""
    root = tmp_path_factory.mktemp("ddp")
    resume = dict(max_steps=16, data_order="random", dropout=0.1, checkpoint_every=2, eval_every=4)
    dirs = {name: root / name for name in ("w1", "w2", "w4", "to1", "to4", "implied", "ref2", "run2")}
    jobs = {
        # the same 512 tokens per step on 1, 2 and 4 processes
        "w1": {"argv": cli_args(tiny_data, dirs["w1"], **SAME), "nproc": 1},
        "w2": {"argv": cli_args(tiny_data, dirs["w2"], **SAME), "nproc": 2},
        "w4": {"argv": cli_args(tiny_data, dirs["w4"], **SAME), "nproc": 4},
        # 2-process runs killed after a checkpoint, resumed (with --resume --out only) on 1 and on 4
        "kill-to1": {"argv": cli_args(tiny_data, dirs["to1"], **SAME), "nproc": 2, "run_dir": str(dirs["to1"]),
                     "kill_at_step": 2},
        "resume-on1": {"argv": ["pretrain", "--resume", "--out", str(dirs["to1"])], "nproc": 1},
        "kill-to4": {"argv": cli_args(tiny_data, dirs["to4"], **SAME), "nproc": 2, "run_dir": str(dirs["to4"]),
                     "kill_at_step": 4},
        "resume-on4": {"argv": ["pretrain", "--resume", "--out", str(dirs["to4"])], "nproc": 4},
        # the same 512 tokens per step as 2 x 8 x 32 without --total-batch-tokens, resumed on 1 process
        "kill-implied": {"argv": cli_args(tiny_data, dirs["implied"], **{**SAME, "total_batch_tokens": None},
                                          batch_size=8),
                         "nproc": 2, "run_dir": str(dirs["implied"]), "kill_at_step": 2},
        "resume-implied": {"argv": ["pretrain", "--resume", "--out", str(dirs["implied"])], "nproc": 1},
        # with dropout, killed and resumed on 2: bitwise
        "ref2": {"argv": cli_args(tiny_data, dirs["ref2"], **resume), "nproc": 2},
        "kill2": {"argv": cli_args(tiny_data, dirs["run2"], **resume), "nproc": 2,
                  "run_dir": str(dirs["run2"]), "kill_at_step": 4, "kill_delay": 0.01},
        "resume2": {"argv": cli_args(tiny_data, dirs["run2"], resume=True, **resume), "nproc": 2,
                    "run_dir": str(dirs["run2"])},
    }
    results = gpt2lab_procs(list(jobs.values()))
    return dict(zip(jobs, results)), dirs


@pytest.mark.slow
def test_two_processes_with_accumulation_equal_one_process(forked_runs):
    """2 processes x batch 4 x accumulation 2 = 1 process x batch 4 x accumulation 4, step by step."""
    results, dirs = forked_runs
    for name in ("w2", "w1"):
        assert all(rc == 0 for rc in results[name]["rc"]), ok(results[name])
    assert resolved(dirs["w2"])["grad_accum"] == 2 and resolved(dirs["w2"])["world_size"] == 2
    assert resolved(dirs["w1"])["grad_accum"] == 4 and resolved(dirs["w1"])["world_size"] == 1
    two, one = metrics(dirs["w2"])[0], metrics(dirs["w1"])[0]
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert [two[s] for s in sorted(one)] == pytest.approx([one[s] for s in sorted(one)], abs=1e-5, rel=0)
    close_weights(dirs["w2"], dirs["w1"], atol=1e-5)


@pytest.mark.slow
def test_one_two_and_four_processes_see_the_same_batches(forked_runs):
    """Random data order, the same --total-batch-tokens: the same per-step losses on 1, 2 and 4 processes.
    (Were the order a function of the rank, the windows of a step would differ and so would the losses,
    by far more than float rounding.)"""
    results, dirs = forked_runs
    assert results["w4"]["rc"] == [0, 0, 0, 0], ok(results["w4"])
    assert (resolved(dirs["w4"])["grad_accum"], resolved(dirs["w4"])["world_size"]) == (1, 4)
    assert {resolved(dirs[w])["total_batch_tokens"] for w in ("w1", "w2", "w4")} == {4 * 4 * SEQ}
    one = metrics(dirs["w1"])[0]
    assert sorted(one) == list(range(1, STEPS + 1))
    assert one[STEPS] < one[1] - 0.3  # it learned something
    for name in ("w2", "w4"):
        losses = metrics(dirs[name])[0]
        assert sorted(losses) == sorted(one)
        assert [losses[s] for s in sorted(one)] == pytest.approx([one[s] for s in sorted(one)], abs=1e-5, rel=0)
        close_weights(dirs[name], dirs["w1"], atol=1e-5)
    # the checkpoints hold one global data position: steps x 16 windows, on any number of processes
    for name in ("w1", "w2", "w4"):
        state = json.loads((dirs[name] / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text())
        assert state["data"]["position"] == STEPS * WINDOWS_PER_STEP and "loaders" not in state
    assert_only_rank0_wrote(dirs["w4"], results["w4"])


@pytest.mark.slow
def test_only_rank_0_writes(forked_runs):
    results, dirs = forked_runs
    assert results["w2"]["rc"] == [0, 0]
    assert_only_rank0_wrote(dirs["w2"], results["w2"])
    lines = (dirs["w2"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + STEPS // 4  # one line per step and per evaluation (every 4 steps), once
    assert sorted(p.name for p in (dirs["w2"] / "checkpoints").iterdir()) == [f"step_{STEPS - 2:06d}",
                                                                              f"step_{STEPS:06d}"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_bitwise(forked_runs):
    results, dirs = forked_runs
    assert results["ref2"]["rc"] == [0, 0], ok(results["ref2"])
    kill = results["kill2"]
    assert kill["killed"] and kill["rc"] == [-9, -9], kill
    assert 4 <= kill["newest_checkpoint"] < 16, "the kill came too late to interrupt the run"
    resumed = results["resume2"]
    assert resumed["rc"] == [0, 0], ok(resumed)
    assert resumed["ranks"][0]["out"].startswith(f"resuming at step {kill['newest_checkpoint']}")
    close_weights(dirs["run2"], dirs["ref2"], atol=0)
    assert metrics(dirs["run2"]) == metrics(dirs["ref2"])
    assert sorted(metrics(dirs["run2"])[0]) == list(range(1, 17))
    assert_only_rank0_wrote(dirs["run2"], resumed)
    state = json.loads((dirs["run2"] / "checkpoints" / "step_000016" / "state.json").read_text())
    assert state["world_size"] == 2 and "loaders" not in state
    assert state["data"]["position"] == 16 * 2 * 4  # one global position: 16 steps x 2 ranks x 4 windows
    assert state["data"]["items"] == train_windows(dirs["run2"])


def train_windows(run: Path) -> int:
    """Windows in the train split of the run's data, at its seq_len."""
    config = json.loads((run / "config.json").read_text())
    return TokenLoader(config["train"]["data"], "train", 1, config["resolved"]["seq_len"]).windows


@pytest.mark.parametrize("name,nproc,batch", [("to1", 1, 4), ("to4", 4, 4), ("implied", 1, 8)])
@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_another_number_of_processes(name, nproc, batch, forked_runs):
    """Killed after a checkpoint, resumed with `--resume --out RUN` on 1 or on 4 processes: the run's total
    batch is kept (more or less accumulation; also when it was implied, 2 processes x 8 x 32 tokens, not
    given) and the losses after the resume equal the uninterrupted 2-process run's, to float rounding."""
    results, dirs = forked_runs
    run = dirs[name]
    kill, resumed = results[f"kill-{name}"], results[f"resume-{name}" if name == "implied" else f"resume-on{nproc}"]
    assert kill["killed"] and kill["rc"] == [-9, -9], kill
    newest = kill["newest_checkpoint"]
    assert 2 <= newest < STEPS, "the kill came too late to interrupt the run"
    assert resumed["rc"] == [0] * nproc, ok(resumed)
    first = resumed["ranks"][0]["out"].splitlines()[0]
    assert first.startswith(f"resuming at step {newest}: "), first
    accum = 16 // (batch * nproc)
    line = f"512 tokens per step = {batch} x 32 x {accum} accumulation x {nproc} processes, {STEPS} steps"
    assert line in first, first
    assert (resolved(run)["world_size"], resolved(run)["grad_accum"]) == (nproc, accum)
    assert resolved(run)["total_batch_tokens"] == 4 * 4 * SEQ

    losses, ref = metrics(run)[0], metrics(dirs["w2"])[0]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {s: losses[s] for s in range(1, newest + 1)} == {s: ref[s] for s in range(1, newest + 1)}
    after = list(range(newest + 1, STEPS + 1))
    assert [losses[s] for s in after] == pytest.approx([ref[s] for s in after], abs=1e-5, rel=0)
    close_weights(run, dirs["w2"], atol=1e-5)
    state = json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text())
    assert state["world_size"] == nproc and state["data"]["position"] == STEPS * WINDOWS_PER_STEP
    assert_only_rank0_wrote(run, resumed)
