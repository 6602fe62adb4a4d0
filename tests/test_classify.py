"""Classification fine-tuning: data files and splits, what trains, accuracy, the run dir, the CLI.

A 2-layer, 32-wide GPT with a 300-token BPE trained inside the test on a synthetic data set
whose classes differ by their words ("free prize cash" vs "lunch tomorrow mum"). Each
fine-tuning run takes a fraction of a second on one thread.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import checkpoint as ckpt
from gpt2lab.cli import main as cli_main
from gpt2lab.errors import UserError
from gpt2lab.finetune.classify import (
    ClassifyConfig,
    GPTClassifier,
    classify_texts,
    collate,
    finetune_classifier,
    label_order,
    load_classifier,
    make_splits,
    read_examples,
    split_sizes,
)
from gpt2lab.finetune.lora import LORA_FILE, merge_lora_run
from gpt2lab.model import GPT, GPTConfig

SPAM = "free prize win cash now claim urgent offer winner reward".split()
HAM = "see you at lunch tomorrow mum dinner home later meeting call".split()
FILLER = "the a and to of it is ok so".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    ckpt.save_weights(GPT(config), base / ckpt.WEIGHTS_FILE)
    ckpt.write_run_config(base, config, tokenizer_identity=tok.identity())
    tsv = root / "data.tsv"
    tsv.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"sentence": t, "y": label}) + "\n"
                                for label, t in synthetic(60, seed=1)), encoding="utf-8")
    return {"root": root, "base": base, "tsv": tsv, "held_out": held_out}


def run_cfg(setup, out, **overrides) -> ClassifyConfig:
    values = dict(init=str(setup["base"]), out=str(setup["root"] / out), data=str(setup["tsv"]),
                  columns=["label", "text"], epochs=1, lr=3e-3, batch_size=16, device="cpu", quiet=True)
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
    assert results == {**results, **{f"{k}_accuracy": trained.metrics[k]["accuracy"]
                                     for k in ("train", "val", "test")}}

    cfg = ckpt.read_run_config(out)
    assert cfg["task"] == "classify" and cfg["labels"] == ["ham", "spam"]
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
                                                 "targets": ["c_attn", "c_proj", "c_fc"]}

    texts = ["free cash now", "see you at lunch", "the prize is ok"]
    model, tok, labels, head = load_classifier(out)
    unmerged = classify_texts(model, tok, labels, head, texts)
    merge_lora_run(out, tmp_path / "merged")
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
    idx, lengths = collate(seqs, tok.eot_id, "cpu")
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
    err = _error(capsys, ft + ["--init", str(tmp_path), "--data", tsv, "--columns", "label,text",
                               "--out", str(tmp_path / "o")])
    assert "is not a run dir" in err

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
    assert "is not a classifier" in err
    assert not (tmp_path / "o").exists()  # nothing was written by a failed command
