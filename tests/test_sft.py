"""Instruction fine-tuning: records, the loss mask, batches, training end to end (full and LoRA),
resume, the instruction set, scoring, `gpt2lab chat` on an SFT run and the errors a user can fix.

Runs fine-tune a 2-layer, 32-wide model with a 256-token context (the Alpaca prompt alone is about
100-170 tokens of the 512-token BPE in `tiny_data`) on one CPU thread.
"""

import copy
import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gpt2lab
from gpt2lab import cli
from gpt2lab.checkpoint import LORA_FILE, TOKENIZER_FILE, load_run, read_run_config
from gpt2lab.data.records import read_instructions
from gpt2lab.errors import UserError
from gpt2lab.finetune.config import SFTConfig
from gpt2lab.finetune.instructions import build_instruction_set, qa_records, score_sft, synthetic_tasks
from gpt2lab.finetune.sft import SFTLoader, SFTTask, encode_record, finetune_sft, pad_examples
from gpt2lab.generate import generate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.lora import lora_layers
from gpt2lab.templates import render_messages
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.loop import Trainer
from gpt2lab.train.pretrain import pretrain
from gpt2lab.train.task import IGNORE_INDEX

BLOCK = 256
SFT = dict(batch_size=8, max_steps=40, lr=4e-3, warmup_steps=2, eval_every=1000, eval_batches=4,
           log_every=1000, checkpoint_every=1000, keep_checkpoints=1, tensorboard=False, device="cpu",
           dtype="fp32", freeze_embeddings=False)  # every weight trains (frozen embeddings: their own test)
# the record the overfitting tests memorise: no input, so `chat -p INSTRUCTION` renders the same prompt
SOLO = {"instruction": "Say the first line of the song.", "output": "the wind moved the old door",
        "task": "solo"}


@pytest.fixture(scope="module")
def tok(tiny_data):
    return load_tokenizer_file(tiny_data / TOKENIZER_FILE)


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny model with room for a whole Alpaca prompt and its answer, pretrained long enough (120 steps)
    that its embeddings have grown: on a barely trained one LoRA cannot move the output at all."""
    out = tmp_path_factory.mktemp("sft-base") / "run"
    pretrain(TrainConfig(data=str(tiny_data), out=str(out), model="tiny", block_size=BLOCK, seq_len=64,
                         batch_size=8, max_steps=120, lr=1e-2, warmup_steps=5, eval_every=1000,
                         eval_batches=1, log_every=1000, checkpoint_every=1000, tensorboard=False,
                         device="cpu", dtype="fp32", dropout=0.0))
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    """40 training and 8 held-out synthetic records."""
    root = tmp_path_factory.mktemp("sft-data")
    records = synthetic_tasks(48, seed=1)
    return write_jsonl(root / "train.jsonl", records[:40]), write_jsonl(root / "val.jsonl", records[40:])


def sft_cfg(base, data, out, **overrides) -> SFTConfig:
    return SFTConfig(init=str(base), data=str(data), out=str(out), **{**SFT, **overrides})


ALPACA_HEAD = ("Below is an instruction that describes a task{}. Write a response that appropriately completes "
               "the request.\n\n")


def prompt_of(record) -> str:
    """The Alpaca prompt of a record, written out here (the format `finetune sft` uses by default)."""
    if record.get("input"):
        return (ALPACA_HEAD.format(", paired with an input that provides further context")
                + f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n### Response:\n")
    return ALPACA_HEAD.format("") + f"### Instruction:\n{record['instruction']}\n\n### Response:\n"


def direct_response_loss(model, tok, records) -> float:
    """Mean cross-entropy over every response token and its closing eot, prompts excluded: written
    out here position by position, without the library's encode_record/collate."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            p = tok.encode(prompt_of(r))
            a = tok.encode(r["output"]) + [tok.eot_id]
            ids = p + a
            logits = model(torch.tensor([ids[:-1]]))[0].float()
            # logits at position t predict ids[t + 1]: the answer starts at target position len(p) - 1
            pred = logits[len(p) - 1:]
            total += F.cross_entropy(pred, torch.tensor(a), reduction="sum").item()
            count += len(a)
    return total / count


def greedy_answer(model, tok, prompt: str, n: int = 24) -> list[int]:
    return generate(model, tok.encode(prompt), n, temperature=0, eot_id=None)


# ------------------------------------------------------------------ records and the loss mask


def test_encode_record_appends_eot_and_masks_the_prompt(tok):
    rec = {"instruction": "Spell the word backwards.", "input": "garden", "output": "nedrag"}
    p, a = tok.encode(prompt_of(rec)), tok.encode("nedrag")
    ids, trained = encode_record(rec, "alpaca", tok, BLOCK)
    assert ids == p + a + [tok.eot_id]
    assert trained == [False] * len(p) + [True] * (len(a) + 1)

    x, y = pad_examples([(ids, trained)], tok.eot_id, "cpu")
    assert x.tolist() == [ids[:-1]]
    # target t is ids[t + 1]: the prompt's own tokens (after the first) are never targets
    assert (y[0, :len(p) - 1] == IGNORE_INDEX).all()
    assert y[0, len(p) - 1:].tolist() == a + [tok.eot_id]

    # an empty input renders the template without the Input section
    no_input = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    ids, _ = encode_record(no_input, "alpaca", tok, BLOCK)
    assert "### Input" not in tok.decode(ids)
    assert ids == tok.encode(prompt_of({"instruction": "What is 2 + 3?"})) + tok.encode("5") + [tok.eot_id]


def test_truncation_keeps_what_fits_and_drops_records_without_a_response(tok):
    rec = {"instruction": "Spell the word backwards.", "input": "planet", "output": "tenalp"}
    p, a = tok.encode(prompt_of(rec)), tok.encode("tenalp")
    assert len(a) >= 2
    # max_length counts the x positions: ids may hold max_length + 1 tokens
    ids, trained = encode_record(rec, "alpaca", tok, len(p) + 1)
    assert ids == p + a[:2] and trained == [False] * len(p) + [True, True]
    ids, trained = encode_record(rec, "alpaca", tok, len(p))
    assert ids == p + a[:1]
    x, y = pad_examples([(ids, trained)], tok.eot_id, "cpu")
    assert (y != IGNORE_INDEX).sum().item() == 1
    # only the prompt fits: nothing would be trained
    assert encode_record(rec, "alpaca", tok, len(p) - 1) is None
    assert encode_record(rec, "alpaca", tok, 10) is None
    # an empty answer still teaches the stop
    ids, trained = encode_record({**rec, "output": ""}, "alpaca", tok, BLOCK)
    assert ids == p + [tok.eot_id] and trained == [False] * len(p) + [True]


CHAT_RECORD = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who wrote the play?"},
    {"role": "assistant", "content": "A poet from the north."},
    {"role": "user", "content": "And when?"},
    {"role": "assistant", "content": "Long ago."},
]}


def test_chat_records_train_only_the_assistant_turns(tok):
    ids, trained = encode_record(CHAT_RECORD, "chat", tok, BLOCK)
    eot = "<|endoftext|>"
    assert tok.decode(ids) == ("### System:\nAnswer briefly.\n\n### User:\nWho wrote the play?\n\n### Assistant:\n"
                               f"A poet from the north.{eot}\n\n### User:\nAnd when?\n\n### Assistant:\n"
                               f"Long ago.{eot}")
    # each turn's text is encoded on its own (as `gpt2lab chat` encodes it); an eot ends each answer
    pieces = ["### System:\nAnswer briefly.\n\n", "### User:\nWho wrote the play?\n\n", "### Assistant:\n",
              "A poet from the north.", None, "\n\n### User:\nAnd when?\n\n", "### Assistant:\n", "Long ago.", None]
    assert ids == [i for piece in pieces for i in (tok.encode(piece) if piece is not None else [tok.eot_id])]
    kept = [i for i, on in zip(ids, trained) if on]
    assert kept == (tok.encode("A poet from the north.") + [tok.eot_id] + tok.encode("Long ago.")
                    + [tok.eot_id])
    assert ids[-1] == tok.eot_id and trained[-1]
    # the system and user turns and the role markers are never targets
    x, y = pad_examples([(ids, trained)], tok.eot_id, "cpu")
    assert [t for t in y[0].tolist() if t != IGNORE_INDEX] == kept


def test_chat_answer_is_followed_by_a_trained_stop(tok):
    ids, trained = encode_record(CHAT_RECORD, "chat", tok, BLOCK)
    for text in ("A poet from the north.", "Long ago."):
        answer = tok.encode(text)
        last = max(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer) + len(answer) - 1
        assert trained[last] and trained[last + 1], "the token after the answer must be trained"
        assert ids[last + 1] == tok.eot_id
        assert last + 2 == len(ids) or not trained[last + 2]  # the next turn's markup is not


def test_the_chat_format_follows_the_records(base_run, tok, tmp_path):
    """Chat records are trained (and the run is used) in the chat format, Alpaca records in --template."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT_RECORD] * 3)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", synthetic_tasks(3, seed=0))
    for data, template, expected in ((chat, "alpaca", "chat"), (alpaca, "alpaca", "alpaca"),
                                     (alpaca, "chat", "chat")):
        task = SFTTask(sft_cfg(base_run, data, tmp_path / "unused", template=template))
        task.load()
        assert task.format == expected and task.run_config()["template"] == expected, (data, template)
    # what is trained is what render_messages shows in that format
    rec = {"instruction": "Name a colour.", "output": "red"}
    for fmt in ("alpaca", "chat"):
        ids, _ = encode_record(rec, fmt, tok, BLOCK)
        assert tok.decode(ids) == render_messages([{"role": "user", "content": "Name a colour."},
                                                   {"role": "assistant", "content": "red"}], fmt, False)
    assert not (tmp_path / "unused").exists()


# ------------------------------------------------------------------ batches


def test_collate_pads_right_with_pad_in_x_and_ignore_in_y():
    a = ([1, 2, 3], [False, True, True])
    b = ([4, 5, 6, 7, 8], [False, False, True, True, True])
    x, y = pad_examples([a, b], pad_id=99, device="cpu")
    assert x.shape == y.shape == (2, 4) and x.dtype == y.dtype == torch.long
    assert x.tolist() == [[1, 2, 99, 99], [4, 5, 6, 7]]
    assert y.tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 6, 7, 8]]
    x, y = pad_examples([b], pad_id=99, device="cpu")
    assert x.shape == (1, 4) and 99 not in x.tolist()[0]


def fake_examples(n: int) -> list[tuple[list[int], list[bool]]]:
    """Example i starts with the id i, so a batch's x[:, 0] names its examples; lengths vary."""
    return [([i] + [1000 + i] * (1 + i % 3), [False] + [True] * (1 + i % 3)) for i in range(n)]


def drawn(loader: SFTLoader, steps: int) -> list[int]:
    return [i for _ in range(steps) for i in loader.next_batch()[0][:, 0].tolist()]


def test_loader_order_is_a_seeded_permutation_per_epoch():
    n, B = 10, 4
    stream = drawn(SFTLoader(fake_examples(n), B, pad_id=0, seed=5), 10)  # 40 examples: 4 epochs
    assert stream == drawn(SFTLoader(fake_examples(n), B, pad_id=0, seed=5), 10)
    assert stream != drawn(SFTLoader(fake_examples(n), B, pad_id=0, seed=6), 10)
    epochs = [stream[k:k + n] for k in range(0, len(stream), n)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every example once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a fresh order each epoch
    plain = drawn(SFTLoader(fake_examples(n), B, pad_id=0, shuffle=False), 5)
    assert plain == [i % n for i in range(20)]


def test_loader_state_resumes_the_identical_sequence():
    a = SFTLoader(fake_examples(11), 3, pad_id=7, seed=2)
    drawn(a, 5)
    state = json.loads(json.dumps(a.state_dict()))  # it is stored in state.json
    expected = [a.next_batch() for _ in range(6)]
    b = SFTLoader(fake_examples(11), 3, pad_id=7, seed=2)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(6))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    with pytest.raises(UserError, match="made with 11 training items"):
        SFTLoader(fake_examples(12), 3, pad_id=7, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="no training examples"):
        SFTLoader([], 3, pad_id=7)


def test_two_ranks_take_disjoint_examples():
    n, B = 12, 3
    ranks = [SFTLoader(fake_examples(n), B, pad_id=0, seed=9, rank=r, world_size=2) for r in range(2)]
    single = drawn(SFTLoader(fake_examples(n), B, pad_id=0, seed=9), 4)
    per_step = [[drawn(loader, 1) for loader in ranks] for _ in range(2)]  # 2 steps = 1 epoch
    for r0, r1 in per_step:
        assert not set(r0) & set(r1) and len(r0) == len(r1) == B
    seen = [i for step in per_step for part in step for i in part]
    assert sorted(seen) == list(range(n))
    # together the ranks take the same examples, in the same order, as one process with 2B per step
    assert seen == single


# ------------------------------------------------------------------ reading records


def one_line_user_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    for needle in needles:
        assert needle in msg, msg


def test_read_records_accepts_json_lists_and_jsonl(tmp_path):
    recs = synthetic_tasks(5, seed=0)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    write_jsonl(tmp_path / "a.jsonl", recs)
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(CHAT_RECORD) + "\n\n")
    assert read_instructions(tmp_path / "a.json") == recs == read_instructions(tmp_path / "a.jsonl")
    assert read_instructions(tmp_path / "b.jsonl") == [CHAT_RECORD]


def test_read_records_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as e:
        read_instructions(missing)
    one_line_user_error(e, str(missing), "does not exist")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(UserError) as e:
        read_instructions(bad)
    one_line_user_error(e, str(bad), "not valid JSON")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "a", "output": "b"},]')
    with pytest.raises(UserError) as e:
        read_instructions(bad_json)
    one_line_user_error(e, str(bad_json), "not valid JSON")

    fields = tmp_path / "fields.jsonl"
    write_jsonl(fields, [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    with pytest.raises(UserError) as e:
        read_instructions(fields)
    one_line_user_error(e, f"{fields}:2 ", "answer", "`output`")  # the file's line
    fields_json = tmp_path / "fields.json"
    fields_json.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]))
    with pytest.raises(UserError) as e:
        read_instructions(fields_json)
    one_line_user_error(e, f"{fields_json}: record 1 ", "answer", "`output`")  # the list's index

    for name, text, needle in (("empty.jsonl", "", "no records"),
                               ("object.json", '{"instruction": "a", "output": "b"}', "must be a list")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UserError) as e:
            read_instructions(path)
        one_line_user_error(e, str(path), needle)

    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text("1\n2\n")
    with pytest.raises(UserError) as e:
        read_instructions(scalars)
    one_line_user_error(e, f"{scalars}:1 ", "not an object")


def test_invalid_jsonl_error_gives_the_file_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3 is not valid JSON"):
        read_instructions(bad)


def test_a_record_whose_output_is_not_text_is_a_user_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"instruction": "What is 2 + 3?", "output": 5}])
    with pytest.raises(UserError) as e:
        read_instructions(path)
    one_line_user_error(e, f"{path}:1 ", "`output`", "int, not text")


# ------------------------------------------------------------------ training end to end


@pytest.fixture(scope="module")
def full_run(base_run, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-full") / "run"
    result = finetune_sft(sft_cfg(base_run, sft_data[0], out, val_data=str(sft_data[1])))
    return out, result


@pytest.fixture(scope="module")
def lora_run(base_run, sft_data, tmp_path_factory):
    """The same through the command line, with rank-4 adapters on every linear layer."""
    out = tmp_path_factory.mktemp("sft-lora") / "run"
    argv = ["finetune", "sft", "--init", str(base_run), "--data", str(sft_data[0]), "--val-data",
            str(sft_data[1]), "--out", str(out), "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"]
    for key, value in SFT.items():
        if key == "lr":
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return out


def test_full_sft_lowers_the_response_loss(base_run, sft_data, full_run, tok):
    out, result = full_run
    val = read_instructions(sft_data[1])
    base, _ = load_run(base_run)
    before = direct_response_loss(base, tok, val)
    model, _ = gpt2lab.load(out)
    after = direct_response_loss(model, tok, val)
    # the trainer's validation loss is exactly the response loss of the 8 held-out records (one batch)
    assert result.final_val_loss == pytest.approx(after, rel=1e-5)
    assert after < 0.8 * before, (before, after)
    config = read_run_config(out)
    assert config["task"] == "sft" and config["template"] == "alpaca" and "lora" not in config
    assert config["data"]["train_records"] == 40 and config["data"]["val_records"] == 8
    assert not (out / LORA_FILE).exists()
    weights, init = load_file(str(out / "model.safetensors")), load_file(str(base_run / "model.safetensors"))
    assert weights.keys() == init.keys()
    assert all(not torch.equal(weights[k], init[k]) for k in weights if k.endswith("c_attn.weight"))


def merged_by_hand(run: Path) -> GPT:
    """W + alpha/r * B @ A for every adapter, computed here from the two files."""
    config = read_run_config(run)
    model = GPT(GPTConfig.from_dict(config["model"]))
    state = dict(load_file(str(run / "model.safetensors")))
    adapters = load_file(str(run / LORA_FILE))
    scale = config["lora"]["alpha"] / config["lora"]["rank"]
    names = {k.rsplit(".", 1)[0] for k in adapters}
    assert names and all(f"{n}.weight" in state for n in names)
    for n in names:
        delta = scale * adapters[f"{n}.lora_B"] @ adapters[f"{n}.lora_A"]
        state[f"{n}.weight"] = state[f"{n}.weight"] + delta
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def test_lora_sft_keeps_the_base_and_loads_merged(base_run, sft_data, lora_run, tok, tmp_path):
    out = lora_run
    config = read_run_config(out)
    assert config["task"] == "sft" and config["template"] == "alpaca"
    assert config["lora"]["rank"] == 4 and config["lora"]["alpha"] == 8
    assert (out / LORA_FILE).is_file()
    # the base weights are stored untouched; only the adapters trained
    stored, init = load_file(str(out / "model.safetensors")), load_file(str(base_run / "model.safetensors"))
    assert stored.keys() == init.keys() and all(torch.equal(stored[k], init[k]) for k in init)
    adapters = load_file(str(out / LORA_FILE))
    n_linear = 4 * read_run_config(base_run)["model"]["n_layer"]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(adapters) == 2 * n_linear
    assert all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))

    x = torch.tensor([tok.encode(prompt_of(r)) for r in read_instructions(sft_data[1])[:1]])
    model, _ = gpt2lab.load(out)
    logits = model(x)
    torch.testing.assert_close(logits, merged_by_hand(out)(x), atol=1e-5, rtol=1e-5)
    base, _ = load_run(base_run)
    assert (logits - base(x)).abs().max() > 1e-3

    with pytest.raises(SystemExit) as e:
        cli.main(["merge-lora", str(out), "--out", str(tmp_path / "merged")])
    assert e.value.code == 0
    merged, _ = gpt2lab.load(tmp_path / "merged")
    assert read_run_config(tmp_path / "merged")["template"] == "alpaca"
    torch.testing.assert_close(merged(x), logits, atol=1e-5, rtol=1e-5)

    # fewer weights move, so less is learnt in 40 steps than with full fine-tuning, but clearly something
    val = read_instructions(sft_data[1])
    assert direct_response_loss(model, tok, val) < direct_response_loss(base, tok, val) - 0.3


class Stop(Exception):
    """Stands in for a crash between two steps."""


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stopped_and_resumed_sft_is_bitwise_identical(lora, base_run, sft_data, tmp_path, monkeypatch):
    common = dict(max_steps=8, checkpoint_every=3, keep_checkpoints=0, dropout=0.1, val_data=str(sft_data[1]))
    if lora:
        common.update(lora_rank=2, lora_dropout=0.1, lr=1e-2)
    finetune_sft(sft_cfg(base_run, sft_data[0], tmp_path / "straight", **common))

    real = Trainer.train_step

    def train_step(self):
        result = real(self)
        if self.step == 5:  # after the checkpoint at step 3, before the one at 6
            raise Stop
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(Stop):
        finetune_sft(sft_cfg(base_run, sft_data[0], tmp_path / "stopped", **common))
    monkeypatch.setattr(Trainer, "train_step", real)
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    result = finetune_sft(sft_cfg(base_run, sft_data[0], tmp_path / "stopped", resume=True, **common))
    assert result.steps == [4, 5, 6, 7, 8]  # it went on from the checkpoint at step 3

    for name in ("model.safetensors",) + ((LORA_FILE,) if lora else ()):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "stopped" / name))
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k], b[k])], name


def starting_model(monkeypatch, argv: list[str]) -> torch.nn.Module:
    """The model a training command starts from, taken as its first step begins (the run stops there)."""
    seen = []

    def first_step(self):
        seen.append(copy.deepcopy(self.model).eval())
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", first_step)
        with pytest.raises(Stop):
            cli.main(argv)
    assert len(seen) == 1
    return seen[0]


def test_training_from_a_lora_run_starts_from_its_merged_weights(base_run, lora_run, sft_data, tiny_data, tok,
                                                                 tmp_path, monkeypatch):
    x = torch.tensor([tok.encode(prompt_of(SOLO))])
    merged, _ = load_run(lora_run)
    base, _ = load_run(base_run)
    with torch.no_grad():
        want, base_logits = merged(x), base(x)
    assert (want - base_logits).abs().max() > 1e-3  # the adapters matter: starting from the base would show
    common = ["--device", "cpu", "--dtype", "fp32", "--no-tensorboard", "--max-steps", "1", "--batch-size", "2"]
    runs = {
        "pretrain --init-from": ["pretrain", "--data", str(tiny_data), "--init-from", str(lora_run), "--seq-len",
                                 "64", "--eval-batches", "1", "--sample-tokens", "0"],
        "finetune sft --init": ["finetune", "sft", "--init", str(lora_run), "--data", str(sft_data[0])],
        "finetune sft --init --lora-rank": ["finetune", "sft", "--init", str(lora_run), "--data",
                                            str(sft_data[0]), "--lora-rank", "2"],
    }
    for i, (name, argv) in enumerate(runs.items()):
        model = starting_model(monkeypatch, argv + common + ["--out", str(tmp_path / f"run{i}")])
        # the new adapters (of the last run) start as a no-op on top of the merged weights
        assert len(lora_layers(model)) == (2 * 4 if name.endswith("rank") else 0), name
        with torch.no_grad():
            got = model(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
        assert (got - base_logits).abs().max() > 1e-3, name


# ------------------------------------------------------------------ memorising one record


@pytest.fixture(scope="module")
def solo_run(base_run, tmp_path_factory) -> Path:
    """The base model trained on SOLO alone for 100 steps (val_fraction 0: the check batch is SOLO too)."""
    root = tmp_path_factory.mktemp("sft-solo")
    data = write_jsonl(root / "solo.jsonl", [SOLO])
    out = root / "run"
    finetune_sft(sft_cfg(base_run, data, out, batch_size=2, max_steps=100, lr=1e-2, warmup_steps=5,
                         val_fraction=0.0))
    return out


def test_one_record_is_reproduced_and_then_stops(solo_run, base_run, tok):
    model, _ = gpt2lab.load(solo_run)
    answer = tok.encode(SOLO["output"])
    ids = greedy_answer(model, tok, prompt_of(SOLO), n=len(answer) + 4)
    assert ids[:len(answer) + 1] == answer + [tok.eot_id], tok.decode(ids)
    # the base model does not know it: the check can fail
    base, _ = load_run(base_run)
    assert greedy_answer(base, tok, prompt_of(SOLO), n=len(answer) + 1) != answer + [tok.eot_id]


def test_score_sft_on_a_memorised_record(solo_run, base_run, tok):
    model, _ = gpt2lab.load(solo_run)
    table = score_sft(model, tok, [SOLO], "alpaca")
    assert table["solo"]["n"] == 1
    assert table["solo"]["exact_match"] == 1.0 and table["solo"]["clean_stop"] == 1.0
    assert table["solo"]["response_loss"] == pytest.approx(direct_response_loss(model, tok, [SOLO]), rel=1e-5)
    assert table["all"]["clean_stop"] == 1.0 and math.isnan(table["all"]["exact_match_checkable"])

    base, _ = load_run(base_run)
    table = score_sft(base, tok, [SOLO, {**SOLO, "task": "add"}], "alpaca")
    assert table["solo"]["exact_match"] == 0.0 and table["all"]["exact_match_checkable"] == 0.0
    assert table["all"]["n"] == 2
    assert table["solo"]["response_loss"] == pytest.approx(direct_response_loss(base, tok, [SOLO]), rel=1e-5)


def test_score_sft_loss_is_not_diluted_by_records_it_cannot_score(base_run, tok):
    base, _ = load_run(base_run)
    long = {**SOLO, "input": " ".join([SOLO["output"]] * 60)}
    assert encode_record(long, "alpaca", tok, BLOCK - 1) is None
    alone = score_sft(base, tok, [SOLO], "alpaca")["solo"]["response_loss"]
    both = score_sft(base, tok, [SOLO, long], "alpaca")["solo"]["response_loss"]
    # excluding the long record gives `alone`; scoring it (say with the prompt cut) an average of two
    # losses of the same size; today it is alone / 2
    assert both > 0.75 * alone, (alone, both)


def test_chat_prints_only_the_answer(solo_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GPT2LAB_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "chat", str(solo_run), "-p", SOLO["instruction"],
                        "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == SOLO["output"] + "\n"


# ------------------------------------------------------------------ the instruction set


def test_synthetic_tasks_are_seeded_and_correct():
    records = synthetic_tasks(400, seed=3)
    assert records == synthetic_tasks(400, seed=3)
    assert records != synthetic_tasks(400, seed=4)
    assert [r["task"] for r in records[:8]] == ["add", "reverse", "count", "replace"] * 2
    for r in records:
        assert set(r) <= {"instruction", "input", "output", "task"} and isinstance(r["output"], str)
        if r["task"] == "add":
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["instruction"]).groups()
            assert int(r["output"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        elif r["task"] == "reverse":
            assert r["output"] == r["input"][::-1] and r["input"].isalpha()
        elif r["task"] == "count":
            letter = re.fullmatch(r"How many times does the letter '(.)' appear in the word\?",
                                  r["instruction"]).group(1)
            assert r["output"] == str(r["input"].count(letter)) and int(r["output"]) >= 1
        else:
            old, new = re.fullmatch(r"Repeat the sentence, replacing '(\w+)' with '(\w+)'\.",
                                    r["instruction"]).groups()
            src, dst = r["input"].split(), r["output"].split()
            assert len(src) == len(dst) and old in src
            assert [d for s, d in zip(src, dst) if s != d] == [new] * src.count(old)
            assert all(d == (new if s == old else s) for s, d in zip(src, dst))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_instruction_set_splits_and_counts(tmp_path):
    counts = build_instruction_set(tmp_path / "set", synthetic=200, heldout_fraction=0.1, seed=0)
    train, held = read_jsonl(tmp_path / "set" / "train.jsonl"), read_jsonl(tmp_path / "set" / "heldout.jsonl")
    distinct = {json.dumps(r, sort_keys=True) for r in synthetic_tasks(200, 0)}
    assert len(distinct) < 200  # generated tasks repeat, and repeats are dropped
    assert len(held) == int(len(distinct) * 0.1) and len(train) + len(held) == len(distinct)
    for split, rows in (("train", train), ("heldout", held)):
        tasks = {}
        for r in rows:
            tasks[r["task"]] = tasks.get(r["task"], 0) + 1
        assert counts[split] == tasks
    # together they are exactly the distinct generated records, each once
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, train + held)) == sorted(distinct)
    assert read_instructions(tmp_path / "set" / "heldout.jsonl") == held
    again = build_instruction_set(tmp_path / "again", synthetic=200, heldout_fraction=0.1, seed=0)
    assert again == counts
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "set" / name).read_bytes()


def test_heldout_records_do_not_appear_in_train(tmp_path):
    build_instruction_set(tmp_path, synthetic=400, heldout_fraction=0.1, seed=0)
    train = {json.dumps(r, sort_keys=True) for r in read_jsonl(tmp_path / "train.jsonl")}
    leaked = [r for r in read_jsonl(tmp_path / "heldout.jsonl") if json.dumps(r, sort_keys=True) in train]
    assert not leaked, f"{len(leaked)} held-out records are in train.jsonl, e.g. {leaked[0]}"


@pytest.fixture(scope="module")
def instruction_source(shared_data) -> Path:
    source = shared_data / "instruction"
    if not (source / "chatterbot").is_dir():
        pytest.skip(f"no instruction material in {source}")
    return source


def test_qa_records_come_from_all_three_sources(instruction_source):
    records = qa_records(instruction_source)
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
        assert r["instruction"].strip() and isinstance(r["output"], str) and r["output"].strip()
    assert set(by_task) == {"chatterbot", "gsm8k", "squad"}
    with gzip.open(instruction_source / "gsm8k_test.jsonl.gz", "rt", encoding="utf-8") as f:
        gsm = [json.loads(line) for line in f]
    assert len(by_task["gsm8k"]) == len(gsm)
    assert by_task["gsm8k"][0]["output"] == gsm[0]["answer"].split("####")[-1].strip()
    assert all("####" not in r["output"] for r in by_task["gsm8k"])
    assert len(by_task["squad"]) == 1000
    for r in by_task["squad"]:
        assert "\n\nQuestion: " in r["input"] and not r["input"].startswith(("Title:", "Background:"))
        assert not r["input"].rstrip().endswith("Answer:")
    assert len(by_task["chatterbot"]) > 100


# ------------------------------------------------------------------ command-line errors


def test_cli_errors_are_one_line(base_run, tmp_path, gpt2lab_procs):
    not_json = tmp_path / "data.jsonl"
    not_json.write_text("instruction: hello\noutput: world\n")
    a_file = tmp_path / "source.txt"
    a_file.write_text("not a directory\n")
    cases = {
        "no --init": (["finetune", "sft", "--data", str(not_json), "--out", str(tmp_path / "r1")],
                      ["--init"]),
        "data not JSON": (["finetune", "sft", "--init", str(base_run), "--data", str(not_json), "--out",
                           str(tmp_path / "r2"), "--device", "cpu"], [str(not_json), "not valid JSON"]),
        "source not Q/A": (["finetune", "instructions", "--out", str(tmp_path / "set"), "--synthetic", "8",
                              "--source", str(a_file)], [str(a_file), "a Q/A file is .jsonl, .json, .csv or .tsv"]),
    }
    results = gpt2lab_procs([{"argv": argv} for argv, _ in cases.values()], timeout=120, train=False)
    for (name, (_, needles)), res in zip(cases.items(), results):
        rc, out, err = res["rc"][0], res["ranks"][0]["out"], res["ranks"][0]["err"]
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, f"{name}: rc={rc} {err!r}"
        assert "Traceback" not in out + err and all(n in err for n in needles), f"{name}: {err!r}"
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    assert not (tmp_path / "set" / "train.jsonl").exists()


def _instructions(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "instructions", *argv])
    err = capsys.readouterr().err
    if e.value.code:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return e.value.code, err


def _tree(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_instructions_cli_builds_something_and_replaces_only_with_overwrite(tmp_path, capsys):
    # nothing to build: one error, and no empty files
    code, err = _instructions(capsys, "--out", str(tmp_path / "none"), "--synthetic", "0")
    assert code == 2 and "--synthetic 0" in err and "--source" in err
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    code, _ = _instructions(capsys, "--out", str(tmp_path / "empty"), "--synthetic", "0")
    assert code == 2 and not list((tmp_path / "empty").iterdir())

    out = tmp_path / "set"
    code, _ = _instructions(capsys, "--out", str(out), "--synthetic", "40", "--seed", "1")
    assert code == 0 and set(_tree(out)) == {"train.jsonl", "heldout.jsonl", "instructions.json"}
    first = _tree(out)
    # an existing set is not replaced without --overwrite
    code, err = _instructions(capsys, "--out", str(out), "--synthetic", "60", "--seed", "2")
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert _tree(out) == first
    # with it, the set is replaced by exactly what a fresh build writes
    code, _ = _instructions(capsys, "--out", str(out), "--synthetic", "60", "--seed", "2", "--overwrite")
    assert code == 0
    build_instruction_set(tmp_path / "fresh", synthetic=60, seed=2)
    assert _tree(out) == _tree(tmp_path / "fresh") != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left

    # --overwrite replaces only an instruction set: never a directory gpt2lab did not write
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("my own records\n")
    code, err = _instructions(capsys, "--out", str(mine), "--synthetic", "8", "--overwrite")
    assert code == 2 and "did not write" in err
    assert _tree(mine) == {"train.jsonl": b"my own records\n"}


def test_a_full_fine_tune_takes_its_settings_from_a_base_pretrained_here(base_run, full_run, sft_data, tmp_path):
    import dataclasses
    import shutil

    from gpt2lab.finetune.sft import settings_from_base

    cfg = SFTConfig(init=str(base_run), data=str(sft_data[0]), out=str(tmp_path / "x"))
    got = settings_from_base(cfg)  # the base: AdamW at 1e-2 (base_run)
    assert (got.optimizer, got.lr, got.muon_lr, got.freeze_embeddings) == ("adamw", pytest.approx(1e-2 / 3), 0.02,
                                                                           True)
    assert settings_from_base(dataclasses.replace(cfg, freeze_embeddings=False)).freeze_embeddings is False
    assert settings_from_base(dataclasses.replace(cfg, lr=2e-4)).lr == 2e-4  # a rate given wins
    assert settings_from_base(cfg, given={"lr": 1e-4}).lr == 1e-4  # ... also at the default's value, from the CLI
    lora = dataclasses.replace(cfg, lora_rank=4)
    assert settings_from_base(lora) == lora  # LoRA keeps its own
    sft_base = dataclasses.replace(cfg, init=str(full_run[0]))  # not a pretraining run: the defaults stay
    assert settings_from_base(sft_base) == sft_base

    muon_base = tmp_path / "muon-base"
    shutil.copytree(base_run, muon_base, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    config = json.loads((muon_base / "config.json").read_text())
    config["train"].update(optimizer="muon", lr=3e-3, muon_lr=0.03)
    (muon_base / "config.json").write_text(json.dumps(config))
    got = settings_from_base(dataclasses.replace(cfg, init=str(muon_base)), given={"optimizer": "adamw"})
    assert (got.optimizer, got.lr, got.muon_lr) == ("adamw", pytest.approx(1e-3), 0.03)
    got = settings_from_base(dataclasses.replace(cfg, init=str(muon_base)))
    assert (got.optimizer, got.lr, got.muon_lr) == ("muon", pytest.approx(1e-3), 0.03)


def test_frozen_embeddings_stay_as_they_were_and_the_rest_trains(base_run, sft_data, tmp_path):
    out = tmp_path / "frozen"
    finetune_sft(sft_cfg(base_run, sft_data[0], out, max_steps=5, freeze_embeddings=True))
    before, after = load_file(base_run / "model.safetensors"), load_file(out / "model.safetensors")
    frozen = [k for k in after if k.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in after if k not in frozen)
    assert read_run_config(out)["train"]["freeze_embeddings"] is True  # stored, so that a resume keeps it
