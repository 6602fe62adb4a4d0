"""A run that is stopped (or killed) and resumed ends with the same bits as one that was not.

CPU, fp32, one thread. Dropout > 0 and random data order make the resumed run depend on the
restored torch RNG and data-loader state, not only on the weights and optimizer moments.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import cli
from gpt2lab.checkpoint import list_checkpoints
from gpt2lab.config import TrainConfig
from gpt2lab.data import TokenLoader
from gpt2lab.train import Trainer, pretrain

SEQ = 32
BASE = dict(model="tiny", block_size=SEQ, batch_size=8, max_steps=16, lr=3e-3, warmup_steps=2,
            eval_every=8, eval_batches=2, log_every=1, checkpoint_every=4, keep_checkpoints=0,
            tensorboard=False, device="cpu", dtype="fp32", sample_tokens=4, dropout=0.1,
            data_order="random")
VARIANTS = {
    "random-dropout": {},
    "sequential-accum-scratch": dict(data_order="sequential", batch_size=4, total_batch_tokens=2 * 4 * SEQ,
                                     optimizer="adamw-scratch"),
}


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


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different}"


def metrics(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """{step: loss}, {step: val_loss}, after checking that no step is logged twice."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    for kind, pairs in (("loss", losses), ("val_loss", vals)):
        steps = [s for s, _ in pairs]
        assert steps == sorted(set(steps)), f"{run}: {kind} steps repeated or out of order: {steps}"
    return dict(losses), dict(vals)


class Stop(Exception):
    """Stands in for a crash between two steps."""


def stop_after(monkeypatch, step: int) -> None:
    """Make the run die right after optimizer step `step`, before it is logged or checkpointed."""
    real = Trainer.train_step

    def train_step(self):
        out = real(self)
        if self.step == step:
            raise Stop(step)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """variant -> (TrainResult, run dir) of the uninterrupted run, trained on first use."""
    done = {}

    def get(variant: str):
        if variant not in done:
            out = tmp_path_factory.mktemp("ref") / variant
            done[variant] = (pretrain(cfg(tiny_data, out, **VARIANTS[variant])), out)
        return done[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stop_and_resume_is_bitwise_identical(variant, reference, tiny_data, tmp_path, monkeypatch):
    ref, ref_dir = reference(variant)
    out = tmp_path / "run"
    stop_after(monkeypatch, 10)
    with pytest.raises(Stop):
        pretrain(cfg(tiny_data, out, **VARIANTS[variant]))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["step_000004", "step_000008"]
    assert sorted(metrics(out)[0]) == list(range(1, 10))  # step 9 was logged, then the crash

    resumed = pretrain(cfg(tiny_data, out, resume=True, **VARIANTS[variant]))
    assert resumed.steps == list(range(9, 17))
    assert resumed.losses == ref.losses[8:]
    assert resumed.val_losses == ref.val_losses[1:] and resumed.final_val_loss == ref.final_val_loss
    assert_same_weights(out, ref_dir)
    assert metrics(out) == metrics(ref_dir)

    # the optimizer moments of the last checkpoints agree to the bit as well
    last = Path("checkpoints") / "step_000016" / "trainer.pt"
    mine = torch.load(out / last, weights_only=True)["optimizer"]["state"]
    theirs = torch.load(ref_dir / last, weights_only=True)["optimizer"]["state"]
    assert mine.keys() == theirs.keys()
    for k in mine:
        for name, value in mine[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs[k][name])), (k, name)


@pytest.mark.parametrize("sabotage", ["rng", "loader"])
def test_resume_really_depends_on_restored_state(sabotage, reference, tiny_data, tmp_path, monkeypatch):
    """If the RNG or the loader position were not restored, the bitwise test above would notice."""
    ref, ref_dir = reference("random-dropout")
    out = tmp_path / "run"
    stop_after(monkeypatch, 10)
    with pytest.raises(Stop):
        pretrain(cfg(tiny_data, out))
    monkeypatch.undo()
    if sabotage == "rng":
        monkeypatch.setattr(Trainer, "_set_rng_state", lambda self, state: None)
    else:
        monkeypatch.setattr(TokenLoader, "load_state_dict", lambda self, state: None)
    resumed = pretrain(cfg(tiny_data, out, resume=True))
    assert resumed.losses[0] != ref.losses[8]
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(ref_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_ignores_and_removes_a_half_written_checkpoint(reference, tiny_data, tmp_path, monkeypatch):
    ref, ref_dir = reference("random-dropout")
    out = tmp_path / "run"
    stop_after(monkeypatch, 12)  # dies where it would have written checkpoints/step_000012
    with pytest.raises(Stop):
        pretrain(cfg(tiny_data, out))
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    # what a kill during save_checkpoint leaves: a temp dir with a truncated weights file ...
    partial = ckpts / ".step_000012.tmp-12345"
    partial.mkdir()
    good = (ckpts / "step_000008" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(good[: len(good) // 2])
    (partial / "trainer.pt.tmp").write_bytes(b"\x80\x02")
    # ... a later one that only got its directory, and a metrics line cut short
    (ckpts / ".step_000016.tmp-999").mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 5.1')
    assert [p.name for p in list_checkpoints(out)] == ["step_000004", "step_000008"]

    resumed = pretrain(cfg(tiny_data, out, resume=True))
    assert resumed.steps == list(range(9, 17))
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_0000{s:02d}" for s in (4, 8, 12, 16)]
    assert_same_weights(out, ref_dir)
    assert metrics(out) == metrics(ref_dir)
    assert all(line.startswith("{") and line.endswith("}")
               for line in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer.pt", "state.json"])
def test_corrupt_checkpoint_is_a_one_line_error(damaged, reference, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    _, ref_dir = reference("random-dropout")
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    target = list_checkpoints(out)[-1] / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    untouched = {p.name: p.read_bytes() for p in target.parent.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(cli_args(tiny_data, out, resume=True))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(target) in err, err
    assert {p.name: p.read_bytes() for p in target.parent.iterdir()} == untouched


@pytest.mark.slow
def test_sigkill_at_different_moments_then_resume(tiny_data, tmp_path, gpt2lab_procs):
    """`gpt2lab pretrain` killed with SIGKILL three times (a checkpoint every step, so some kills land
    while one is being written), resumed each time; the end is bitwise the uninterrupted run."""
    settings = dict(max_steps=40, checkpoint_every=1, keep_checkpoints=2, eval_every=10, sample_tokens=1)
    ref, run = tmp_path / "ref", tmp_path / "run"
    jobs = [{"argv": cli_args(tiny_data, ref, **settings)},
            {"argv": cli_args(tiny_data, run, **settings), "run_dir": str(run), "kill_at_step": 3},
            {"argv": cli_args(tiny_data, run, resume=True, **settings), "run_dir": str(run),
             "kill_at_step": 14, "kill_delay": 0.013},
            {"argv": cli_args(tiny_data, run, resume=True, **settings), "run_dir": str(run),
             "kill_at_step": 25, "kill_delay": 0.031},
            {"argv": cli_args(tiny_data, run, resume=True, **settings), "run_dir": str(run)}]
    results = gpt2lab_procs(jobs)
    assert results[0]["rc"] == [0], results[0]["ranks"][0]["err"]
    for res in results[1:4]:
        assert res["killed"] and res["rc"] == [-9], res
        assert 0 < res["newest_checkpoint"] < 40, "the kill came too late to interrupt the run"
    assert results[4]["rc"] == [0], results[4]["ranks"][0]["err"]
    assert results[4]["ranks"][0]["out"].startswith("resuming at step ")
    assert_same_weights(run, ref)
    losses, vals = metrics(run)
    assert sorted(losses) == list(range(1, 41))
    assert (losses, vals) == metrics(ref)
    assert [p.name for p in list_checkpoints(run)] == ["step_000039", "step_000040"]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
