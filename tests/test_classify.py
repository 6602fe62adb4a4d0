"""Classification fine-tuning: data files and splits, what trains, accuracy, the run dir, the CLI.

A 2-layer, 32-wide GPT with a 300-token BPE trained inside the test on a synthetic data set
whose classes differ by their words ("free prize cash" vs "lunch tomorrow mum"). Each
fine-tuning run takes a fraction of a second on one thread.
"""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import checkpoint as ckpt
from gpt2lab.checkpoint import LORA_FILE
from gpt2lab.cli import main as cli_main
from gpt2lab.errors import UserError
from gpt2lab.finetune.classify import classify_texts, finetune_classifier, load_classifier
from gpt2lab.finetune.classify_data import label_order, make_splits, pad_texts, read_examples, split_sizes
from gpt2lab.finetune.config import ClassifyConfig
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, GPTClassifier
from gpt2lab.weights import save_weights

SPAM = "free prize win cash now claim urgent offer winner reward".split()
HAM = "see you at lunch tomorrow mum dinner home later meeting call".split()
FILLER = "the a and to of it is ok so".split()


def synthetic(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        words = rng.sample(SPAM if label == "spam" else HAM, 3) + rng.sample(FILLER, rng.randint(0, 6))
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base run dir (random weights), and the synthetic data as TSV (no header) and JSONL files."""
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    root = tmp_path_factory.mktemp("classify")
    rows = synthetic(200, seed=0)
    tok = train_bpe_from_texts([t for _, t in rows], 300, name="tiny300")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    base = root / "base"
    base.mkdir()
    tok.save(base)
    save_weights(GPT(config), base / ckpt.WEIGHTS_FILE)
    ckpt.write_run_config(base, config, tokenizer_identity=tok.identity())
    tsv = root / "data.tsv"
    tsv.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"sentence": t, "y": label}) + "\n"
                                for label, t in synthetic(60, seed=1)), encoding="utf-8")
    return {"root": root, "base": base, "tsv": tsv, "held_out": held_out}


def run_cfg(setup, out, **overrides) -> ClassifyConfig:
    values = dict(init=str(setup["base"]), out=str(setup["root"] / out), data=str(setup["tsv"]),
                  columns=["label", "text"], epochs=1, lr=3e-3, batch_size=16, device="cpu", dtype="fp32",
                  tensorboard=False, log_every=1000)
    return ClassifyConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(setup):
    """Full fine-tuning for 3 epochs: the classifier the CLI and padding tests use."""
    result = finetune_classifier(run_cfg(setup, "all", train_mode="all", epochs=3))
    return result


def test_full_finetuning_reaches_high_accuracy(setup, trained):
    out = setup["root"] / "all"
    results = json.loads((out / "results.json").read_text())
    for split in ("train", "val", "test"):
        assert 0.0 <= results[f"{split}_accuracy"] <= 1.0
    assert results["val_accuracy"] >= 0.9 and results["test_accuracy"] >= 0.9
    assert results["sizes"] == {"train": 140, "val": 20, "test": 40}  # 200 at 0.7 / 0.1 / 0.2
    assert set(results["per_class"]["test"]) == {"ham", "spam"}
    assert sum(c["support"] for c in results["per_class"]["test"].values()) == 40
    assert len(results["history"]) == 3 and 1 <= results["best_epoch"] <= 3
    # fixed-size batches of 16 from one global order: 140 examples are 9 steps an epoch (the 9th wraps)
    assert [h["step"] for h in results["history"]] == [9, 18, 27]
    assert [h["epoch"] for h in results["history"]] == [1.0, 2.0, 3.0]
    assert results["best_epoch"] in (1.0, 2.0, 3.0)
    assert results == {**results, **{f"{k}_accuracy": trained.metrics[k]["accuracy"]
                                     for k in ("train", "val", "test")}}

    cfg = ckpt.read_run_config(out)
    assert cfg["kind"] == "classifier" and cfg["task"] == "classify" and cfg["labels"] == ["ham", "spam"]
    assert not (out / "best.safetensors").exists()  # the kept epoch's weights are model.safetensors
    assert cfg["head"]["num_classes"] == 2 and cfg["model"]["n_embd"] == 32
    weights = load_file(str(out / ckpt.WEIGHTS_FILE))
    assert weights["score.weight"].shape == (2, 32) and weights["score.bias"].shape == (2,)
    assert "lm_head.weight" not in weights and (out / "tokenizer.json").is_file()

    # a separate held-out file, read as JSONL with other field names
    model, tok, labels, head = load_classifier(out)
    examples = read_examples(setup["held_out"], text_field="sentence", label_field="y")
    preds = classify_texts(model, tok, labels, head, [ex.text for ex in examples])
    accuracy = sum(p["label"] == ex.label for p, ex in zip(preds, examples)) / len(examples)
    assert accuracy >= 0.9


def changed(before: dict, after: dict) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(after[k], v)}


@pytest.mark.parametrize("mode, expected", [
    ("head", set()),
    ("last-blocks", {"transformer.h.1.", "transformer.ln_f."}),
])
def test_train_modes_freeze_the_right_parameters(setup, mode, expected):
    base = load_file(str(setup["base"] / ckpt.WEIGHTS_FILE))
    finetune_classifier(run_cfg(setup, mode, train_mode=mode, last_blocks=1))
    after = load_file(str(setup["root"] / mode / ckpt.WEIGHTS_FILE))
    assert set(after) == set(base) | {"score.weight", "score.bias"}
    moved = changed(base, after)
    assert {k for k in moved if not any(k.startswith(p) for p in expected)} == set()
    for prefix in expected:  # every parameter of the trained modules moved
        names = {k for k in base if k.startswith(prefix)}
        assert names and names <= moved


def test_random_init_discards_the_pretrained_weights(setup):
    finetune_classifier(run_cfg(setup, "random", train_mode="head", random_init=True))
    base = load_file(str(setup["base"] / ckpt.WEIGHTS_FILE))
    after = load_file(str(setup["root"] / "random" / ckpt.WEIGHTS_FILE))
    matrices = {k for k, v in base.items() if v.dim() == 2}  # (biases and LayerNorms start equal)
    assert matrices and matrices <= changed(base, after)  # a frozen backbone, not the pretrained one
    assert ckpt.read_run_config(setup["root"] / "random")["base"]["random_init"] is True


def test_lora_mode_keeps_the_base_and_merges(setup, tmp_path):
    out = setup["root"] / "lora"
    result = finetune_classifier(run_cfg(setup, "lora", train_mode="lora", lora_rank=4, lora_alpha=8,
                                         epochs=2))
    n = 32
    per_block = 4 * ((n + 3 * n) + (n + n) + (n + 4 * n) + (4 * n + n))  # r * (in + out), 4 layers
    assert result.trainable_params == 2 * per_block + (2 * n + 2)  # adapters + head
    base = load_file(str(setup["base"] / ckpt.WEIGHTS_FILE))
    stored = load_file(str(out / ckpt.WEIGHTS_FILE))
    assert not changed(base, stored)  # the backbone in model.safetensors is the unchanged base
    adapters = load_file(str(out / LORA_FILE))
    assert adapters and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)
    assert ckpt.read_run_config(out)["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                 "targets": ["all"]}

    texts = ["free cash now", "see you at lunch", "the prize is ok"]
    model, tok, labels, head = load_classifier(out)
    unmerged = classify_texts(model, tok, labels, head, texts)
    ckpt.write_merged_run(out, tmp_path / "merged")
    assert not (tmp_path / "merged" / LORA_FILE).exists()
    model, tok, labels, head = load_classifier(tmp_path / "merged")
    for a, b in zip(unmerged, classify_texts(model, tok, labels, head, texts)):
        assert a["label"] == b["label"]
        for label in labels:
            assert a["probs"][label] == pytest.approx(b["probs"][label], abs=1e-5)


def test_padding_does_not_change_the_prediction(setup, trained):
    model, tok, labels, head = load_classifier(setup["root"] / "all")
    short = "free cash"
    batch = [short, "see you at lunch tomorrow and the dinner is ok so", "the a claim urgent offer now to"]
    alone = classify_texts(model, tok, labels, head, [short])[0]
    together = classify_texts(model, tok, labels, head, batch, batch_size=8)[0]
    assert alone["label"] == together["label"]
    for label in labels:
        assert alone["probs"][label] == pytest.approx(together["probs"][label], abs=1e-5)
    # the head reads the last real token, not the last (padding) position
    seqs = [tok.encode(t) for t in batch]
    idx, lengths = pad_texts(seqs, tok.eot_id, "cpu")
    with torch.no_grad():
        padded = model(idx, lengths)[0]
        single = model(torch.tensor([seqs[0]]))[0]
        last_position = model(idx)[0]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)
    assert not torch.allclose(last_position, single, atol=1e-4)


def test_classify_cli_prints_one_json_object_per_text(setup, trained, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("win a free prize now\nsee you at dinner mum\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GPT2LAB_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "classify", str(setup["root"] / "all"),
                        "--input", str(lines), "--device", "cpu"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["spam", "ham"]
    for row in rows:
        assert set(row) == {"label", "probs"} and set(row["probs"]) == {"ham", "spam"}
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["probs"][row["label"]] == max(row["probs"].values())


def test_classify_cli_text_flag(setup, trained, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["classify", str(setup["root"] / "all"), "--text", "claim your cash reward",
                  "--device", "cpu"])
    assert e.value.code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == "spam"


# ------------------------------------------------------------------------ data and splits


def test_sms_spam_is_balanced_and_split_as_documented(shared_data):
    path = shared_data / "classification" / "sms_spam.tsv"
    examples = read_examples(path, columns=["label", "text"])
    assert len(examples) == 4862
    assert sum(ex.label == "spam" for ex in examples) == 642
    splits = make_splits(examples, val_fraction=0.1, test_fraction=0.2, balance=True, seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 898, "val": 128, "test": 258}
    together = [ex for split in splits.values() for ex in split]
    assert sum(ex.label == "spam" for ex in together) == sum(ex.label == "ham" for ex in together) == 642
    assert len({ex.where for ex in together}) == 1284  # no example in two splits
    again = make_splits(examples, 0.1, 0.2, True, seed=123)
    assert [ex.where for ex in again["test"]] == [ex.where for ex in splits["test"]]
    other = make_splits(examples, 0.1, 0.2, True, seed=7)
    assert [ex.where for ex in other["test"]] != [ex.where for ex in splits["test"]]


def test_split_sizes():
    assert split_sizes(1284, 0.1, 0.2) == (898, 128, 258)  # train, val rounded down; test the rest
    assert split_sizes(200, 0.1, 0.2) == (140, 20, 40)
    assert split_sizes(101, 0.1, 0.0) == (90, 11, 0)  # no test split: val takes the rest
    assert split_sizes(10, 0.0, 0.0) == (10, 0, 0)
    with pytest.raises(UserError):
        split_sizes(10, 0.5, 0.5)


def test_sms_spam_cli_run_records_the_split_sizes(setup, shared_data, capsys):
    out = setup["root"] / "sms"
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "classify", "--init", str(setup["base"]), "--out", str(out),
                  "--data", str(shared_data / "classification" / "sms_spam.tsv"), "--columns", "label,text",
                  "--balance", "--train-mode", "head", "--epochs", "1", "--batch-size", "64",
                  "--max-length", "32", "--device", "cpu"])
    assert e.value.code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["sizes"] == {"train": 898, "val": 128, "test": 258}
    data = ckpt.read_run_config(out)["data"]
    assert data["balance"] is True and data["seed"] == 123 and data["columns"] == ["label", "text"]
    assert ckpt.read_run_config(out)["head"]["max_length"] == 32


def test_reading_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('id,review,stars\n1,"good, very good",5\n2,"bad ""really""",1\n', encoding="utf-8")
    rows = read_examples(csv_file, text_field="review", label_field="stars")
    assert [(ex.text, ex.label) for ex in rows] == [("good, very good", "5"), ('bad "really"', "1")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence": "x", "label": 10}\n\n{"sentence": "y", "label": 2}\n', encoding="utf-8")
    rows = read_examples(jsonl, text_field="sentence")
    assert [ex.label for ex in rows] == ["10", "2"]
    assert label_order([ex.label for ex in rows]) == ["2", "10"]  # integers sort as numbers
    assert label_order(["b", "a", "b"]) == ["a", "b"]
    assert label_order(["a", "b"], given=["b", "a", "c"]) == ["b", "a", "c"]


def test_a_model_built_from_a_run_has_the_lm_names(setup):
    base, _ = ckpt.load_run(setup["base"])
    model = GPTClassifier.from_lm(base, 3)
    names = set(model.state_dict())
    assert names == {k for k in base.state_dict() if k != "lm_head.weight"} | {"score.weight", "score.bias"}


# ------------------------------------------------------------------------ errors


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_errors_are_one_line(setup, tmp_path, capsys):
    base, tsv = str(setup["base"]), str(setup["tsv"])
    ft = ["finetune", "classify", "--device", "cpu", "--epochs", "1"]

    err = _error(capsys, ft + ["--init", base, "--data", str(tmp_path / "missing.tsv"),
                               "--out", str(tmp_path / "o")])
    assert "missing.tsv does not exist" in err
    # a TSV without a header line: its first row is taken as the header, and the message says what to do
    err = _error(capsys, ft + ["--init", base, "--data", tsv, "--out", str(tmp_path / "o")])
    assert "no column 'text'" in err and "--columns label,text" in err
    err = _error(capsys, ft + ["--init", base, "--data", tsv, "--columns", "label,text",
                               "--text-field", "body", "--out", str(tmp_path / "o")])
    assert "no column 'body'" in err and "'label', 'text'" in err
    (tmp_path / "notrun").mkdir()
    err = _error(capsys, ft + ["--init", str(tmp_path / "notrun"), "--data", tsv, "--columns", "label,text",
                               "--out", str(tmp_path / "o")])
    assert "is not a run dir" in err
    # the output may not be, hold or lie inside an input
    err = _error(capsys, ft + ["--init", base, "--data", tsv, "--columns", "label,text", "--out",
                               str(setup["base"] / "o")])
    assert "lies inside the input" in err and not (setup["base"] / "o").exists()

    one_class = tmp_path / "one.tsv"
    one_class.write_text("ham\thello\nham\tthere\n", encoding="utf-8")
    err = _error(capsys, ft + ["--init", base, "--data", str(one_class), "--columns", "label,text",
                               "--out", str(tmp_path / "o")])
    assert "single class (ham)" in err

    val = tmp_path / "val.tsv"
    val.write_text("ham\thello\nphishing\tclick here\n", encoding="utf-8")
    err = _error(capsys, ft + ["--init", base, "--train", tsv, "--val", str(val), "--columns", "label,text",
                               "--out", str(tmp_path / "o")])
    assert "val.tsv:2: label 'phishing'" in err and "ham, spam" in err

    err = _error(capsys, ["classify", base, "--text", "hi"])
    assert "not a classifier" in err
    assert not (tmp_path / "o").exists()  # nothing was written by a failed command


# ------------------------------------------------------------------------ the shared loop: resume, DDP, --init


def cli_args(setup, out, *extra) -> list[str]:
    return ["finetune", "classify", "--init", str(setup["base"]), "--data", str(setup["tsv"]), "--columns",
            "label,text", "--out", str(out), "--train-mode", "all", "--lr", "3e-3", "--device", "cpu", "--dtype",
            "fp32", "--no-tensorboard", "--log-every", "1", *extra]


# 6 epochs of 9 steps; a checkpoint (and an evaluation) after every epoch; dropout, so that the restored
# random state matters too
RESUMED = ["--epochs", "6", "--batch-size", "16", "--dropout", "0.1", "--keep-checkpoints", "0"]
# the same total batch of 16 examples on 1 and on 2 processes
DDP = ["--epochs", "2", "--dropout", "0"]


@pytest.fixture(scope="module")
def launched(setup, gpt2lab_procs):
    """Runs as separate `gpt2lab` processes: an uninterrupted one, one killed with SIGKILL once its first
    checkpoint (step 9, the end of epoch 1) exists, and a DDP pair (1 process, 2 gloo processes)."""
    root = setup["root"] / "procs"
    outs = {name: root / name for name in ("straight", "killed", "one", "two")}
    jobs = {
        "straight": {"argv": cli_args(setup, outs["straight"], *RESUMED)},
        "killed": {"argv": cli_args(setup, outs["killed"], *RESUMED), "kill_at_step": 9,
                   "run_dir": str(outs["killed"])},
        "one": {"argv": cli_args(setup, outs["one"], *DDP, "--batch-size", "16")},
        "two": {"argv": cli_args(setup, outs["two"], *DDP, "--batch-size", "8"), "nproc": 2},
    }
    results = gpt2lab_procs(list(jobs.values()), timeout=120)
    return {name: (res, outs[name]) for name, res in zip(jobs, results)}


def metrics_records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in rows]


def weights(run: Path) -> dict:
    return load_file(str(run / ckpt.WEIGHTS_FILE))


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    assert metrics_records(a) == metrics_records(b)


def test_a_killed_and_resumed_classifier_ends_as_an_uninterrupted_one(setup, launched, tmp_path, capsys,
                                                                      monkeypatch):
    from gpt2lab.finetune.classify import ClassifyTask, ExampleLoader

    (res, straight), (killed_res, killed) = launched["straight"], launched["killed"]
    assert res["rc"] == [0], res["ranks"][0]["err"]
    assert killed_res["killed"] and killed_res["rc"] == [-9], killed_res
    # it died after the checkpoint of epoch 1 and before the end
    assert 9 <= killed_res["newest_checkpoint"] < 54 and not (killed / ckpt.WEIGHTS_FILE).exists()
    assert not (killed / "results.json").exists()
    straight_results = json.loads((straight / "results.json").read_text())
    assert len(straight_results["history"]) == 6

    control = tmp_path / "control"
    shutil.copytree(killed, control)
    # `--resume` with nothing else: the run's own settings
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "classify", "--out", str(killed), "--resume"])
    assert e.value.code == 0, capsys.readouterr().err
    assert f"resuming at step {killed_res['newest_checkpoint']}" in capsys.readouterr().out
    assert_same_run(straight, killed)

    # the control: the same resume with the restored data position and task state ignored ends elsewhere
    monkeypatch.setattr(ExampleLoader, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(ClassifyTask, "load_state_dict", lambda self, state: None)
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "classify", "--out", str(control), "--resume"])
    assert e.value.code == 0
    with pytest.raises(AssertionError):
        assert_same_run(straight, control)
    changed = weights(control)
    assert any(not torch.equal(changed[k], v) for k, v in weights(straight).items())
    assert len(json.loads((control / "results.json").read_text())["history"]) < 6


def test_a_run_from_split_files_resumes_with_its_own_files(setup, tmp_path, monkeypatch, capsys):
    """--train/--val/--test instead of --data: `--resume` alone continues with the run's files."""
    from gpt2lab.train.loop import Trainer

    lines = setup["tsv"].read_text(encoding="utf-8").splitlines(keepends=True)
    files = {"train": lines[:140], "val": lines[140:160], "test": lines[160:]}
    argv = ["finetune", "classify", "--init", str(setup["base"]), "--columns", "label,text", "--train-mode", "all",
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--dropout", "0.1", "--device", "cpu",
            "--no-tensorboard", "--log-every", "1"]
    for name, rows in files.items():
        (tmp_path / f"{name}.tsv").write_text("".join(rows), encoding="utf-8")
        argv += [f"--{name}", str(tmp_path / f"{name}.tsv")]
    with pytest.raises(SystemExit) as e:
        cli_main(argv + ["--out", str(tmp_path / "straight")])
    assert e.value.code == 0

    real = Trainer.train_step

    def train_step(self):
        result = real(self)
        if self.step == 12:  # after the checkpoint of epoch 1 (step 9)
            raise Stopped
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(Stopped):
        cli_main(argv + ["--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(Trainer, "train_step", real)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "classify", "--out", str(tmp_path / "stopped"), "--resume"])
    assert e.value.code == 0, capsys.readouterr().err
    assert "resuming at step 9" in capsys.readouterr().out
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    assert json.loads((tmp_path / "stopped" / "results.json").read_text())["sizes"] == \
        {"train": 140, "val": 20, "test": 40}


def test_two_processes_train_as_one_with_the_same_total_batch(launched):
    (one_res, one), (two_res, two) = launched["one"], launched["two"]
    assert one_res["rc"] == [0], one_res["ranks"][0]["err"]
    assert two_res["rc"] == [0, 0], [r["err"] for r in two_res["ranks"]]
    config = ckpt.read_run_config(two)
    assert config["resolved"]["world_size"] == 2 and config["train"]["batch_size"] == 8
    assert ckpt.read_run_config(one)["resolved"]["world_size"] == 1

    a, b = metrics_records(one), metrics_records(two)
    losses_a = [(r["step"], r["loss"]) for r in a if "loss" in r]
    losses_b = [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] == list(range(1, 19))
    assert len({round(v, 3) for _, v in losses_a}) > 5  # the loss moves: equal lists would mean something
    for (step, la), (_, lb) in zip(losses_a, losses_b):
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6), step
    evals_a = [r for r in a if "val_accuracy" in r]
    evals_b = [r for r in b if "val_accuracy" in r]
    assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b] == [9, 18]
    for ra, rb in zip(evals_a, evals_b):
        for k in ("train_loss", "val_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), k
        assert "test_loss" not in ra and "test_accuracy" not in ra  # the test split is shown once, at the end
    results_a, results_b = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert results_b["test_accuracy"] == pytest.approx(results_a["test_accuracy"])
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        a, b = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):
            # the key bias gets no gradient (softmax ignores the constant q.b_k it adds to a row), so its
            # gradient is rounding noise, which Adam scales to lr-sized steps: compare the query and value parts
            n = a.numel() // 3
            a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)


def test_a_lora_language_model_is_classified_from_its_merged_weights(setup, tmp_path, monkeypatch):
    """`finetune classify --init LORA_RUN` starts its transformer from the run's merged weights."""
    from gpt2lab.model.lora import apply_lora, lora_layers
    from gpt2lab.train.loop import Trainer
    from gpt2lab.weights import save_lora

    base, tok = ckpt.load_run(setup["base"])
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(lora).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    run = tmp_path / "lora-lm"
    run.mkdir()
    tok.save(run)
    save_weights(lora, run / ckpt.WEIGHTS_FILE, exclude_lora=True)
    save_lora(lora, run / LORA_FILE)
    ckpt.write_run_config(run, lora.config, tokenizer_identity=tok.identity(),
                          extra={"lora": lora.lora_settings})

    seen = []

    def first_step(self):
        seen.append(copy.deepcopy(self.model).eval())
        raise Stopped

    monkeypatch.setattr(Trainer, "train_step", first_step)
    with pytest.raises(Stopped):
        finetune_classifier(run_cfg(setup, tmp_path / "clf", init=str(run), train_mode="head"))
    (model,) = seen
    assert isinstance(model, GPTClassifier) and not lora_layers(model)
    assert ckpt.read_run_config(tmp_path / "clf")["base"]["lora"]["rank"] == 4

    idx = torch.tensor([tok.encode("free cash now see you at lunch")])
    merged, _ = ckpt.load_run(run)
    with torch.no_grad():
        want, start, before = merged.hidden_states(idx), model.transformer(idx), base.hidden_states(idx)
        lora.eval()
        assert torch.allclose(lora.hidden_states(idx), want, atol=1e-5)  # the run dir holds what was made
    assert (want - before).abs().max() > 1e-3
    torch.testing.assert_close(start, want, atol=1e-5, rtol=0)


class Stopped(Exception):
    """Stands in for a crash before the first step."""
