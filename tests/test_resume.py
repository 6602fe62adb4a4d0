"""A run that is stopped (or killed) and resumed ends with the same bits as one that was not.

CPU, fp32, one thread. Dropout > 0 and random data order make the resumed run depend on the
restored torch RNG and data-loader state, not only on the weights and optimizer moments.

And what --resume means: the run's stored settings are used (`pretrain --resume --out RUN` needs no
other flag), a given setting that differs is refused unless it may change (a larger --max-steps
extends the run), a run stopped before its first checkpoint starts again from step 0, and a run dir
is locked while a process trains in it.
"""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import pretrain_argv
from safetensors.torch import load_file

from gpt2lab import cli
from gpt2lab.data.loader import TokenLoader
from gpt2lab.train import resume
from gpt2lab.train.checkpoints import list_checkpoints
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.loop import Trainer
from gpt2lab.train.optim import lr_at
from gpt2lab.train.pretrain import pretrain

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
# settings unlike the defaults and unlike BASE: a 64-token model trained on 32-token windows, 4 per batch
STORED = dict(block_size=64, seq_len=SEQ, batch_size=4, max_steps=12, warmup_steps=6, lr=2e-3, sample_tokens=0)


def cfg(data, out, **overrides) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**BASE, **overrides})


def cli_args(data, out, **overrides) -> list[str]:
    return pretrain_argv(data, out, {**BASE, **overrides})


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


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """variant -> (TrainResult, run dir) of the uninterrupted run, trained on first use."""
    done = {}

    def get(variant: str):
        if variant not in done:
            out = tmp_path_factory.mktemp("ref") / variant
            done[variant] = (pretrain(cfg(tiny_data, out, **{**VARIANTS, "stored": STORED}[variant])), out)
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
        monkeypatch.setattr(resume, "set_rng_state", lambda state: None)
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


# ------------------------------------------------------------------ what --resume takes from the run


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `gpt2lab ARGV` run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run dir but its lock (which names the process that last took it)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def logged(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)  # it turns one-line errors into tracebacks


def test_resume_with_only_out_reuses_the_stored_settings(reference, tiny_data, tmp_path, capsys, no_debug):
    """`pretrain --resume --out RUN` (no --data, no batch, model or schedule flags) continues with the run's
    own settings: 4 windows of 32 tokens of a 64-token model, its warmup and lr; it ends as the run that was
    never stopped."""
    ref, ref_dir = reference("stored")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        stop_after(mp, 10)
        with pytest.raises(Stop):
            cli.main(cli_args(tiny_data, out, **STORED))
    assert [p.name for p in list_checkpoints(out)] == ["step_000004", "step_000008"]

    code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.startswith("resuming at step 8: "), stdout
    assert "128 tokens per step = 4 x 32 x 1 accumulation x 1 processes, 12 steps" in stdout.splitlines()[0]
    assert sorted(logged(out, "loss")) == list(range(1, 13))
    assert metrics(out) == metrics(ref_dir)
    assert logged(out, "lr") == logged(ref_dir, "lr")  # the same warmup and schedule
    assert_same_weights(out, ref_dir)
    config = json.loads((out / "config.json").read_text())
    train, resolved = config["train"], config["resolved"]
    assert (train["batch_size"], train["seq_len"], train["warmup_steps"], train["lr"]) == (4, SEQ, 6, 2e-3)
    assert train["data"] == str(tiny_data) and config["model"]["block_size"] == 64
    assert (resolved["seq_len"], resolved["total_batch_tokens"], resolved["max_steps"]) == (SEQ, 4 * SEQ, 12)


@pytest.mark.parametrize("flag,value", [("--lr", "0.01"), ("--batch-size", "8"), ("--seq-len", "16"),
                                        ("--warmup-steps", "0"), ("--seed", "7"), ("--data-order", "sequential"),
                                        ("--n-layer", "3"), ("--data", "other")])
def test_resume_refuses_a_setting_that_may_not_change(flag, value, reference, tiny_data_other_tokenizer, capsys,
                                                      no_debug):
    """A resumed run keeps its settings: one that differs is one error line naming it, exit 2, nothing
    written."""
    _, run = reference("stored")
    if flag == "--data":
        value = str(tiny_data_other_tokenizer)
    before = files(run)
    code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(run), flag, value], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err + stdout, err
    assert flag in err and value in err, err
    assert files(run) == before


def test_resume_accepts_the_stored_values_and_those_that_may_change(reference, tiny_data, tmp_path, capsys,
                                                                    no_debug):
    """Flags equal to the stored settings (--data included) and resumable ones (--max-steps larger: the run is
    extended to it, on a schedule recomputed for the new length; --eval-every) are taken. The run dir was
    moved: --out names its new place."""
    _, ref_dir = reference("stored")
    out = tmp_path / "moved"
    shutil.copytree(ref_dir, out)
    argv = ["pretrain", "--resume", "--out", str(out), "--data", str(tiny_data), "--batch-size", "4", "--lr",
            "0.002", "--max-steps", "16", "--eval-every", "2"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert stdout.startswith("resuming at step 12: ") and stdout.splitlines()[0].endswith(", 16 steps"), stdout
    losses, vals = metrics(out)
    ref_losses, ref_vals = metrics(ref_dir)
    assert sorted(losses) == list(range(1, 17))
    assert {s: losses[s] for s in range(1, 13)} == ref_losses  # the first 12 steps are the run's own
    assert sorted(vals) == [8, 12, 14, 16] and {s: vals[s] for s in (8, 12)} == ref_vals
    lrs = logged(out, "lr")
    assert [lrs[s] for s in range(13, 17)] == pytest.approx(
        [lr_at(s - 1, lr=2e-3, min_lr=2e-4, warmup_steps=6, max_steps=16) for s in range(13, 17)], rel=1e-12)
    assert lrs[13] != pytest.approx(lr_at(12, lr=2e-3, min_lr=2e-4, warmup_steps=6, max_steps=12))
    assert [p.name for p in list_checkpoints(out)][-1] == "step_000016"
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["max_steps"] == config["resolved"]["max_steps"] == 16
    assert config["train"]["out"] == str(out) and config["train"]["eval_every"] == 2
    assert (config["train"]["batch_size"], config["resolved"]["seq_len"]) == (4, SEQ)
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(ref_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # it trained on


@pytest.mark.parametrize("again", ["without --resume", "with --resume"])
def test_a_run_stopped_before_its_first_checkpoint_starts_again(again, reference, tiny_data, tmp_path, capsys):
    """A run dir with a config.json but no checkpoint yet is not a run to refuse or to continue: it starts
    again from step 0, with or without --resume, and ends as if the first attempt had never been."""
    ref, ref_dir = reference("random-dropout")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        stop_after(mp, 3)  # checkpoint_every=4
        with pytest.raises(Stop):
            pretrain(cfg(tiny_data, out))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert list_checkpoints(out) == [] and sorted(metrics(out)[0]) == [1, 2]

    if again == "with --resume":
        code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(out)], capsys)
        assert code == 0, err
        assert "has no checkpoint yet: starting it again from step 0" in stdout and "resuming" not in stdout
    else:
        result = pretrain(cfg(tiny_data, out))
        assert result.steps == ref.steps == list(range(1, 17)) and result.losses == ref.losses
    assert_same_weights(out, ref_dir)
    assert metrics(out) == metrics(ref_dir)  # nothing is left of the first attempt's log
    assert [p.name for p in list_checkpoints(out)] == [p.name for p in list_checkpoints(ref_dir)]


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_until_its_process_dies(tiny_data, tmp_path, gpt2lab_procs, capsys, no_debug):
    """While `gpt2lab pretrain` trains into a run dir (a real process, holding its lock), another `pretrain
    --resume` on it is one error line saying the dir is in use. After a SIGKILL of the first the OS has
    released its lock, and the next run takes it and continues."""
    run = tmp_path / "run"
    first = {"argv": cli_args(tiny_data, run, max_steps=100_000, checkpoint_every=5, keep_checkpoints=1,
                              eval_every=100_000, sample_tokens=0),
             "run_dir": str(run), "kill_at_step": 5, "kill_delay": 4.0}
    results: list[dict] = []
    launcher = threading.Thread(target=lambda: results.extend(gpt2lab_procs([first])))
    launcher.start()
    try:
        deadline = time.time() + 200
        while not list_checkpoints(run) and launcher.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        assert list_checkpoints(run), "the first run wrote no checkpoint"
        # (a short --max-steps: were the lock not held, this would train a step or two and succeed)
        code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(run), "--max-steps", "7"], capsys)
    finally:
        launcher.join()
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err + stdout, err
    assert str(run) in err and "in use" in err, err
    killed = results[0]
    assert killed["killed"] and killed["rc"] == [-9], killed  # the first run trained on, undisturbed
    newest = killed["newest_checkpoint"]
    assert newest >= 5

    code, stdout, err = run_cli(["pretrain", "--resume", "--out", str(run), "--max-steps", str(newest + 2)], capsys)
    assert code == 0, err
    assert stdout.startswith(f"resuming at step {newest}: "), stdout
    assert sorted(metrics(run)[0]) == list(range(1, newest + 3))
    assert (run / "model.safetensors").is_file()
