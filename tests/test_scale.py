"""Scaling features: FSDP (--strategy fsdp), activation checkpointing, --doc-mask and `pretrain --dry-run`.

FSDP2 shards the weights, gradients and AdamW state of the tiny model across gloo processes on the CPU;
its per-step losses must match one process and DDP, its sharded checkpoints (torch.distributed.checkpoint)
must resume after a SIGKILL on 1, 2 or 4 processes, and the finished run dir must hold an ordinary
model.safetensors. Every multi-process job of this file runs in one `gpt2lab_procs` launcher (conftest.py),
which forks `gpt2lab <argv>` per rank with torchrun's environment.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pretrain_argv
from safetensors.torch import load_file

import gpt2lab
from gpt2lab import cli
from gpt2lab.checkpoint import TOKENIZER_FILE, load_run
from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.shards import load_tokens
from gpt2lab.generate import generate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.masks import document_inputs
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.distributed import checkpoint_blocks
from gpt2lab.train.pretrain import pretrain
from gpt2lab.train.task import lm_loss

SEQ = 32
STEPS = 60
# 512 tokens per step: 4 x 32 x accumulation 4 on 1 process, 2 on 2 processes, 1 on 4
BASE = dict(model="tiny", block_size=SEQ, batch_size=4, total_batch_tokens=4 * 4 * SEQ, max_steps=STEPS, lr=3e-3,
            warmup_steps=5, eval_every=20, eval_batches=4, log_every=1, checkpoint_every=20, keep_checkpoints=2,
            tensorboard=False, device="cpu", dtype="fp32", sample_tokens=0, dropout=0.0, data_order="random")
KILL_AT = 20  # the SIGKILLed runs are killed once checkpoint 20 (of 20, 40, 60) exists


def cli_args(data, out, **overrides) -> list[str]:
    return pretrain_argv(data, out, {**BASE, **overrides})


def metrics(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """{step: loss}, {step: val_loss}; no line or step written twice."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "duplicate lines in metrics.jsonl"
    records = [json.loads(line) for line in lines]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    for kind, pairs in (("loss", losses), ("val_loss", vals)):
        steps = [s for s, _ in pairs]
        assert steps == sorted(set(steps)), f"{run}: {kind} steps repeated or out of order: {steps}"
    return dict(losses), dict(vals)


def resolved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["resolved"]


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[s] - b[s]) for s in a)


def weights_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def ok(result: dict) -> str:
    """The assertion message of a forked job: every rank's stderr."""
    return "\n".join(f"rank {r}: {rank['err'][-2000:]}" for r, rank in enumerate(result["ranks"]))


# ------------------------------------------------------------------ forked runs


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


SFT_RECORDS = [{"messages": [{"role": "user", "content": f"count to {n % 6 + 1}"},
                             {"role": "assistant", "content": " ".join(str(i) for i in range(1, n % 6 + 2))}]}
               for n in range(16)]
# 2 records x 32 tokens per micro-batch: 2 processes x accumulation 1, or 1 process x accumulation 2
SFT_ARGS = ["--template", "chat", "--batch-size", "2", "--seq-len", str(SEQ), "--total-batch-tokens", str(4 * SEQ),
            "--max-steps", "4", "--warmup-steps", "0", "--lr", "3e-3", "--eval-every", "2", "--eval-batches", "2",
            "--log-every", "1", "--checkpoint-every", "2", "--no-tensorboard", "--device", "cpu", "--dtype", "fp32",
            "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def forked(tiny_data, tmp_path_factory, gpt2lab_procs):
    """Every multi-process run of this file in one launcher (~20 s): (results by name, run dirs by name)."""
    root = tmp_path_factory.mktemp("scale")
    names = ("one", "ddp2", "fsdp2", "fsdp2_ac", "kill2", "kill1", "kill4", "sft1", "sft2")
    dirs = {name: root / name for name in names}
    sft_data = write_jsonl(root / "sft.jsonl", SFT_RECORDS)

    def killed(name):
        return {"argv": cli_args(tiny_data, dirs[name], strategy="fsdp"), "nproc": 2, "run_dir": str(dirs[name]),
                "kill_at_step": KILL_AT}

    def resume(name, nproc):
        return {"argv": ["pretrain", "--resume", "--out", str(dirs[name])], "nproc": nproc}

    def sft(name, *extra):
        return ["finetune", "sft", "--init", str(dirs["one"]), "--data", str(sft_data), "--out", str(dirs[name]),
                *SFT_ARGS, *extra]

    jobs = {
        # the same 512 tokens per step: 1 process (no process group), DDP and FSDP on 2
        "one": {"argv": cli_args(tiny_data, dirs["one"]), "nproc": 1},
        "ddp2": {"argv": cli_args(tiny_data, dirs["ddp2"]), "nproc": 2},
        "fsdp2": {"argv": cli_args(tiny_data, dirs["fsdp2"], strategy="fsdp"), "nproc": 2},
        "fsdp2_ac": {"argv": cli_args(tiny_data, dirs["fsdp2_ac"], strategy="fsdp", activation_checkpointing=True),
                     "nproc": 2},
        # 2-process FSDP runs SIGKILLed once checkpoint 20 exists, resumed (--resume --out only) on 2, 1 and 4
        "kill2": killed("kill2"), "resume2": resume("kill2", 2),
        "kill1": killed("kill1"), "resume1": resume("kill1", 1),
        "kill4": killed("kill4"), "resume4": resume("kill4", 4),
        # SFT from the 1-process run: FSDP on 2 processes, and DDP's single process as the reference
        "sft1": {"argv": sft("sft1"), "nproc": 1},
        "sft2": {"argv": sft("sft2", "--strategy", "fsdp"), "nproc": 2},
        # the plan under torchrun: for its number of processes, printed once
        "dry2": {"argv": ["pretrain", "--dry-run", "--model", "gpt2", "--out", str(root / "dry")], "nproc": 2},
    }
    results = gpt2lab_procs(list(jobs.values()))
    return dict(zip(jobs, results)), dirs


def succeeded(result: dict, nproc: int) -> None:
    assert result["rc"] == [0] * nproc, ok(result)
    rank0, *others = result["ranks"]
    for rank in others:  # only rank 0 speaks
        assert rank["out"] == "", rank["out"][-2000:]


RUN_FILES = {"config.json", "tokenizer.json", "model.safetensors", "metrics.jsonl", "checkpoints", ".lock"}


# ------------------------------------------------------------------ 1. FSDP = 1 process = DDP


def test_fsdp_on_two_processes_equals_one_process_and_ddp(forked):
    """The same 512 tokens per step on 1 process, DDP on 2 and FSDP on 2: the same losses at every one of
    60 steps. The issue asks for 2e-3; fp32 sums taken in another order (reduce-scatter of gradient shards,
    AdamW on shards) differ by ~5e-7 here, so the test holds them to 1e-5, which a missing or doubled
    gradient reduction, or a rank training on other windows, breaks by orders of magnitude."""
    results, dirs = forked
    for name, nproc in (("one", 1), ("ddp2", 2), ("fsdp2", 2)):
        succeeded(results[name], nproc)
    assert (resolved(dirs["fsdp2"])["world_size"], resolved(dirs["fsdp2"])["grad_accum"]) == (2, 2)
    assert (resolved(dirs["one"])["world_size"], resolved(dirs["one"])["grad_accum"]) == (1, 4)
    assert json.loads((dirs["fsdp2"] / "config.json").read_text())["train"]["strategy"] == "fsdp"
    one, one_val = metrics(dirs["one"])
    assert sorted(one) == list(range(1, STEPS + 1)) and sorted(one_val) == [20, 40, 60]
    assert one[STEPS] < one[1] - 1.0  # it learned: equal losses are not those of a model that stands still
    for name in ("fsdp2", "ddp2"):
        losses, vals = metrics(dirs[name])
        assert max_diff(losses, one) <= 2e-3  # the bound
        assert max_diff(losses, one) <= 1e-5, name
        assert max_diff(vals, one_val) <= 1e-5, name  # validation: the same batches on any number of processes
    assert max_diff(metrics(dirs["fsdp2"])[0], metrics(dirs["ddp2"])[0]) <= 1e-5
    assert weights_diff(dirs["fsdp2"], dirs["one"]) <= 1e-4
    assert weights_diff(dirs["fsdp2"], dirs["ddp2"]) <= 1e-4
    out = results["fsdp2"]["ranks"][0]["out"]
    assert out.count("final val loss") == 1 and "x 2 accumulation x 2 processes" in out

    # the run dir: ordinary files written by rank 0; the checkpoints hold shards instead of model.safetensors
    run = dirs["fsdp2"]
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000040", "step_000060"]
    last = run / "checkpoints" / "step_000060"
    assert {p.name for p in last.iterdir()} == {"sharded", "state.json", "trainer.pt"}
    assert any(p.suffix == ".distcp" for p in (last / "sharded").iterdir())
    state = json.loads((last / "state.json").read_text())
    assert (state["strategy"], state["world_size"], state["step"]) == ("fsdp", 2, STEPS)
    assert "optimizer" not in torch.load(last / "trainer.pt", weights_only=True)  # it is in the shards

    # model.safetensors is whole (no DTensor shards): it loads with gpt2lab.load and generates
    model, tok = gpt2lab.load(run)
    reference, _ = gpt2lab.load(dirs["one"])
    weights = load_file(str(run / "model.safetensors"))
    assert weights["transformer.wte.weight"].shape == (model.config.padded_vocab_size, 32)
    x = torch.tensor([tok.encode("ROMEO:\nWhat say you, my lord?")])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-3)
    ids = generate(model, tok.encode("ROMEO:"), 12, temperature=0, eot_id=None)
    assert len(ids) == 12 and all(0 <= i < tok.vocab_size for i in ids)
    assert isinstance(tok.decode(ids), str)


# ------------------------------------------------------------------ 2. sharded checkpoints: kill, resume on 1/2/4


@pytest.mark.parametrize("nproc", [2, 1, 4])
def test_a_killed_fsdp_run_resumes_on_any_number_of_processes(forked, nproc):
    """SIGKILLed after checkpoint 20, resumed with `--resume --out RUN` on 2, 1 or 4 processes: the sharded
    checkpoint is resharded to the new count and the run ends like the uninterrupted 2-process run. On 2
    processes the same sums are taken in the same order: the same bits. On 1 or 4 the gradient sums and the
    sharded AdamW run in another order; the losses then differ by float rounding only (~5e-7 here): the
    tolerance is 1e-5, while a resume that lost the optimizer moments or the data position, or restarted
    from the initial weights, is off by 1e-3 or more."""
    results, dirs = forked
    name = f"kill{nproc}"
    run, kill, resumed = dirs[name], results[name], results[f"resume{nproc}"]
    assert kill["killed"] and kill["rc"] == [-9, -9], kill
    newest = kill["newest_checkpoint"]
    assert KILL_AT <= newest < STEPS, "the kill came too late to interrupt the run"
    succeeded(resumed, nproc)
    first = resumed["ranks"][0]["out"].splitlines()[0]
    accum = 4 // nproc
    assert first.startswith(f"resuming at step {newest}: ") and \
        f"512 tokens per step = 4 x 32 x {accum} accumulation x {nproc} processes" in first, first
    assert (resolved(run)["world_size"], resolved(run)["grad_accum"]) == (nproc, accum)

    losses, vals = metrics(run)
    ref, ref_vals = metrics(dirs["fsdp2"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {s: losses[s] for s in range(1, newest + 1)} == {s: ref[s] for s in range(1, newest + 1)}
    after = {s: losses[s] for s in range(newest + 1, STEPS + 1)}
    if nproc == 2:
        assert after == {s: ref[s] for s in after} and vals == ref_vals
        assert weights_diff(run, dirs["fsdp2"]) == 0
    else:
        assert max_diff(after, {s: ref[s] for s in after}) <= 1e-5
        assert max_diff(vals, ref_vals) <= 1e-5
        assert weights_diff(run, dirs["fsdp2"]) <= 1e-4
    assert {p.name for p in run.iterdir()} == RUN_FILES
    state = json.loads((run / "checkpoints" / "step_000060" / "state.json").read_text())
    assert (state["world_size"], state["strategy"]) == (nproc, "fsdp")
    gpt2lab.load(run)


def test_resuming_with_another_strategy_is_one_error_line(forked, tmp_path, capsys):
    """--strategy is a setting of the run: `--resume --strategy OTHER` is refused in one line, before anything
    is touched. A run dir whose config.json and checkpoint disagree (edited by hand) is refused as well."""
    results, dirs = forked

    def refused(run: Path, *flags: str) -> str:
        before = (run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())
        with pytest.raises(SystemExit) as e:
            cli.main(["pretrain", "--resume", "--out", str(run), *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert ((run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())) \
            == before  # nothing was touched
        return err

    for run, other in ((dirs["kill2"], "ddp"), (dirs["one"], "fsdp")):
        err = refused(run, "--strategy", other)
        assert f"--strategy {other} differs from the run being resumed" in err, err

    edited = tmp_path / "edited"
    shutil.copytree(dirs["kill2"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["train"]["strategy"] = "ddp"
    (edited / "config.json").write_text(json.dumps(config))
    err = refused(edited)
    assert "step_000060 was written with --strategy fsdp" in err, err


# ------------------------------------------------------------------ 3. activation checkpointing


def small_run(data, out, **overrides) -> TrainConfig:
    """An in-process pretraining run of the tiny model: 64-token rows, 30 steps."""
    settings = {**BASE, "block_size": 64, "seq_len": 64, "batch_size": 8, "total_batch_tokens": None,
                "max_steps": 30, "eval_every": 15, "eval_batches": 2, "checkpoint_every": 1000, "log_every": 1000,
                "warmup_steps": 3, "lr": 5e-3, **overrides}
    return TrainConfig(data=str(data), out=str(out), **settings)


def test_activation_checkpointing_keeps_less_and_trains_the_same(tiny_data, tmp_path, forked):
    """The flag keeps only each block's input for the backward (far fewer saved tensors) and recomputes the
    rest, with the same dropout masks: the same losses to 1e-6, on 1 process and under FSDP on 2."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=512, dropout=0.1)).train()
    x = torch.randint(0, 512, (2, 64))
    saved = {False: [], True: []}
    for on in (False, True):
        if on:
            checkpoint_blocks(model)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, on=on: saved[on].append(t.numel()) or t,
                                                      lambda t: t):
            model(x)
    saved = {on: sum(sizes) for on, sizes in saved.items()}
    assert saved[True] < saved[False] / 3, saved

    runs = {on: pretrain(small_run(tiny_data, tmp_path / f"ac-{on}", dropout=0.1, activation_checkpointing=on))
            for on in (False, True)}
    assert runs[True].losses[-1] < runs[True].losses[0] - 0.5
    assert runs[True].losses == pytest.approx(runs[False].losses, abs=1e-6, rel=0)
    assert runs[True].val_losses == pytest.approx(runs[False].val_losses, abs=1e-6, rel=0)
    stored = json.loads((tmp_path / "ac-True" / "config.json").read_text())
    assert stored["train"]["activation_checkpointing"] is True
    assert weights_diff(tmp_path / "ac-True", tmp_path / "ac-False") <= 1e-6

    results, dirs = forked
    succeeded(results["fsdp2_ac"], 2)
    with_ac, without = metrics(dirs["fsdp2_ac"]), metrics(dirs["fsdp2"])
    assert max_diff(with_ac[0], without[0]) <= 1e-6 and max_diff(with_ac[1], without[1]) <= 1e-6
    assert weights_diff(dirs["fsdp2_ac"], dirs["fsdp2"]) <= 1e-6


# ------------------------------------------------------------------ 4. --doc-mask


def test_a_packed_row_scores_each_document_as_if_alone(tiny_data):
    tok = load_tokenizer_file(tiny_data / TOKENIZER_FILE)
    eot = tok.eot_id
    tokens = torch.from_numpy(load_tokens(tiny_data, "train").astype("int64"))
    T = 64
    rows = tokens[: (len(tokens) // T) * T].view(-1, T)
    # a row whose first token is inside a document and that holds at least 3 document starts
    packed = next(r for r in rows if r[0] != eot and int((r == eot).sum()) >= 3)
    solo = next(r for r in rows if int((r[1:] == eot).sum()) == 0)  # no boundary inside
    x = torch.stack([packed, solo])
    positions, mask = document_inputs(x, eot)
    assert positions.shape == (2, T) and mask.shape == (2, 1, T, T) and mask.dtype == torch.bool
    starts = [0] + [i for i in range(1, T) if packed[i] == eot] + [T]
    for s, e in zip(starts, starts[1:]):
        assert positions[0, s:e].tolist() == list(range(e - s))
        assert not mask[0, 0, s:e, :s].any() and not mask[0, 0, s:e, e:].any()  # nothing across documents
    assert positions[1].tolist() == list(range(T))  # the row without a boundary: plain causal
    assert torch.equal(mask[1, 0], torch.tril(torch.ones(T, T, dtype=torch.bool)))

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        logits = model(x, positions=positions, mask=mask)
        for s, e in zip(starts, starts[1:]):
            torch.testing.assert_close(logits[0, s:e], model(packed[None, s:e])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[1], model(solo[None])[0], rtol=0, atol=1e-5)
        # (without the mask the later documents see the earlier ones: not the same logits)
        assert (model(packed[None])[0, starts[1]:] - logits[0, starts[1]:]).abs().max() > 1e-2

    # rows without a boundary inside (one that starts with <|endoftext|>, or holds none): no mask at all
    assert document_inputs(solo[None], eot) == (None, None)
    starting = solo.clone()
    starting[0] = eot
    assert document_inputs(torch.stack([starting, solo]), eot) == (None, None)


def test_pretrain_with_doc_mask_trains_and_differs(tiny_data, tmp_path):
    """Documents of the tiny corpus are paragraphs (--doc-separator '\\n\\n'), so most 64-token rows hold
    several: training with the mask learns, its losses are not those of the run without it, and both its
    training and its validation loss are the masked model's (recomputed here through document_inputs)."""
    tok = load_tokenizer_file(tiny_data / TOKENIZER_FILE)
    tokens = torch.from_numpy(load_tokens(tiny_data, "train").astype("int64"))
    rows = tokens[: (len(tokens) // 64) * 64].view(-1, 64)
    several = ((rows[:, 1:] == tok.eot_id).sum(dim=1) > 0).float().mean().item()
    assert several > 0.5, several

    cfg = small_run(tiny_data, tmp_path / "mask", doc_mask=True)
    masked = pretrain(cfg)
    plain = pretrain(small_run(tiny_data, tmp_path / "plain", doc_mask=False))
    assert json.loads((tmp_path / "mask" / "config.json").read_text())["train"]["doc_mask"] is True
    assert masked.losses[-1] < masked.losses[0] - 0.5 and masked.val_losses[-1] < masked.val_losses[0]
    # the same seed, weights and batches: without the mask's effect every loss would be the same bits
    assert all(a != b for a, b in zip(masked.losses, plain.losses))
    assert max(abs(a - b) for a, b in zip(masked.losses, plain.losses)) > 0.02
    assert abs(masked.final_val_loss - plain.final_val_loss) > 1e-3

    def masked_loss(model, x, y):
        positions, mask = document_inputs(x, tok.eot_id)
        assert mask is not None
        return lm_loss(model(x, positions=positions, mask=mask), y).item()

    # step 1's loss: the initial weights (from the seed) on the first batch of the global order
    torch.manual_seed(cfg.seed)
    start = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64, dropout=0.0))
    x, y = TokenLoader(tiny_data, "train", 8, 64, mode="random", seed=cfg.seed).next_batch()
    with torch.no_grad():
        assert masked_loss(start, x, y) == pytest.approx(masked.losses[0], abs=1e-5)
        # the final validation loss: the trained model on the run's validation batches, masked
        model, _ = gpt2lab.load(tmp_path / "mask")  # an ordinary run dir
        val = TokenLoader(tiny_data, "val", 8, 64, mode="sequential")
        losses = [masked_loss(model, *val.next_batch()) for _ in range(cfg.eval_batches)]
    assert sum(losses) / len(losses) == pytest.approx(masked.final_val_loss, abs=1e-5)


# ------------------------------------------------------------------ 5. --dry-run


def dry_run(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--dry-run", *args])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def memory(out: str) -> dict[str, tuple[float, float]]:
    """The memory table: {row: (ddp GiB, fsdp GiB)}."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] == "GiB" and parts[4] == "GiB":
            table[parts[0]] = (float(parts[1]), float(parts[3]))
    return table


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_data, tmp_path, monkeypatch, capsys, forked):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "--model", "gpt2", "--out", "run", "--batch-size", "8", "--seq-len", "1024",
                  "--total-batch-tokens", str(8 * 1024 * 4 * 8), "--processes", "8")
    assert "124,439,808 parameters" in out
    assert "262,144 tokens per step = 8 x 1024 x 4 accumulation x 8 processes" in out
    table = memory(out)
    assert set(table) == {"weights", "gradients", "optimizer", "activations", "logits", "total"}
    n = 124_439_808 / 1024**3
    assert table["gradients"] == pytest.approx((4 * n, 4 * n / 8), abs=0.006)
    assert table["optimizer"] == pytest.approx((8 * n, 8 * n / 8), abs=0.006)
    assert table["total"][1] < table["total"][0]  # sharded across 8: less per process
    assert table["total"][0] == pytest.approx(sum(v[0] for k, v in table.items() if k != "total"), abs=0.03)

    # the data dir's vocabulary, torchrun-less default of one process
    out = dry_run(capsys, "--data", str(tiny_data), "--model", "tiny", "--batch-size", "4", "--seq-len", "32",
                  "--total-batch-tokens", "512")
    assert "vocabulary 512" in out and "512 tokens per step = 4 x 32 x 4 accumulation x 1 process" in out

    # a GPU that is too small: what to change
    small = dry_run(capsys, "--model", "gpt2", "--batch-size", "16", "--dtype", "bf16", "--gpu-memory", "8")
    assert "does not fit" in small and "--strategy fsdp" in small and "--activation-checkpointing" in small
    with_ac = memory(dry_run(capsys, "--model", "gpt2", "--batch-size", "16", "--dtype", "bf16",
                             "--activation-checkpointing"))
    assert with_ac["activations"][0] < memory(small)["activations"][0] / 4
    big = dry_run(capsys, "--model", "gpt2", "--batch-size", "16", "--dtype", "bf16", "--gpu-memory", "80")
    assert "fits" in big and "does not fit" not in big
    assert list(tmp_path.iterdir()) == []  # no run dir, nothing at all

    # under torchrun: the plan of its processes, printed by rank 0 alone
    results, dirs = forked
    succeeded(results["dry2"], 2)
    out = results["dry2"]["ranks"][0]["out"]
    assert out.count("124,439,808 parameters") == 1 and "x 1 accumulation x 2 processes" in out
    assert memory(out)["optimizer"][1] == pytest.approx(8 * n / 2, abs=0.006)
    assert not (dirs["one"].parent / "dry").exists()


# ------------------------------------------------------------------ 6. SFT under FSDP


def test_finetune_sft_with_fsdp_on_two_processes(forked):
    """`finetune sft --strategy fsdp` on 2 processes: the losses of the 1-process run with the same 4 records
    per step (2 x accumulation 2), and a run dir that loads and chats."""
    results, dirs = forked
    succeeded(results["sft1"], 1)
    succeeded(results["sft2"], 2)
    two, one = metrics(dirs["sft2"]), metrics(dirs["sft1"])
    assert sorted(two[0]) == [1, 2, 3, 4] and sorted(two[1]) == [2, 4]
    assert max_diff(two[0], one[0]) <= 1e-5 and max_diff(two[1], one[1]) <= 1e-5
    assert two[0][4] < two[0][1]
    assert weights_diff(dirs["sft2"], dirs["sft1"]) <= 1e-4
    assert weights_diff(dirs["sft2"], dirs["one"]) > 1e-3  # it trained
    state = json.loads((dirs["sft2"] / "checkpoints" / "step_000004" / "state.json").read_text())
    assert (state["strategy"], state["world_size"]) == ("fsdp", 2)
    model, tok = load_run(dirs["sft2"])
    assert json.loads((dirs["sft2"] / "config.json").read_text())["template"] == "chat"
    ids = generate(model, tok.encode("### User:\ncount to 3\n\n### Assistant:\n"), 8, temperature=0,
                   eot_id=tok.eot_id)
    assert len(ids) <= 8 and all(0 <= i < tok.vocab_size for i in ids)
