"""An instruction set built from what exists offline, and the numbers that judge SFT.

No Alpaca-style set ships with gpt2lab, so `build_instruction_set` makes one:

- checkable tasks generated here, whose answers can be compared exactly:
  arithmetic, spelling a word backwards, counting a letter, copying a
  sentence with one word replaced;
- question/answer material converted into records: ChatterBot's Q/A
  dialogues, GSM8K problems (their final numeric answers), SQuAD passages
  and questions.

Duplicate records are dropped, then the rest is split into train and
held-out deterministically, so no held-out record appears in train. `score_sft`
measures a model on held-out records: the response loss (mean cross-entropy
of the response and its end-of-text token given the prompt), exact-match
accuracy on the checkable tasks, and how often greedy decoding stops cleanly
(emits <|endoftext|> or the template's stop text) before the token limit.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch
import yaml

from gpt2lab import io
from gpt2lab.data.records import read_qa_file
from gpt2lab.errors import UserError
from gpt2lab.evals.checkable import get_task
from gpt2lab.finetune.sft import encode_record, pad_examples
from gpt2lab.generate import fit_to_context, stream
from gpt2lab.templates import EOT_TEXT, encode_messages, get_format, record_messages, render_messages
from gpt2lab.text import cut_at_stop, with_thinking
from gpt2lab.train.task import lm_loss

WORDS = (
    "apple river garden window yellow silver castle market winter summer pencil candle forest "
    "rabbit dragon planet letter button mirror orange purple bridge island jungle ladder meadow "
    "rocket saddle tunnel violin wizard harbor pepper copper bottle basket cotton dinner engine "
    "flower hammer kettle lemon monkey needle pillow puzzle shadow spider tomato turtle wallet"
).split()
NOUNS_SENTENCES = (
    "the cat sat on the mat", "a bird sang in the tree", "the boy kicked the red ball",
    "my sister reads a long book", "the farmer feeds the hungry cows", "a ship sailed across the sea",
    "the baker sells fresh bread", "our teacher wrote on the board", "the dog chased a small cat",
    "the wind moved the old door",
)


def synthetic_tasks(n: int, seed: int = 0) -> list[dict]:
    """`n` records of four kinds, each with an exactly checkable `output` (kind in `task`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = ("add", "reverse", "count", "replace")[i % 4]
        if kind == "add":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice(["+", "-"])
            rec = {"instruction": f"What is {a} {op} {b}?", "output": str(a + b if op == "+" else a - b)}
        elif kind == "reverse":
            w = rng.choice(WORDS)
            rec = {"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]}
        elif kind == "count":
            w = rng.choice(WORDS)
            letter = rng.choice(sorted(set(w)))
            rec = {"instruction": f"How many times does the letter '{letter}' appear in the word?",
                   "input": w, "output": str(w.count(letter))}
        else:
            sentence = rng.choice(NOUNS_SENTENCES)
            old = rng.choice([t for t in sentence.split() if len(t) > 2])
            new = rng.choice(WORDS)
            rec = {"instruction": f"Repeat the sentence, replacing '{old}' with '{new}'.",
                   "input": sentence, "output": " ".join(new if t == old else t for t in sentence.split())}
        rec["task"] = kind
        out.append(rec)
    return out


def qa_records(source: str | os.PathLike, question_field: str | None = None,
               answer_field: str | None = None) -> list[dict]:
    """Instruction records from your own Q/A file (JSONL, JSON, CSV or TSV with named fields: data.records'
    `read_qa_file`), or from the Q/A files of a folder: chatterbot/*.yml, gsm8k_test.jsonl.gz,
    squad_val_1000.jsonl.gz (the layout of the offline Q/A collection the README names)."""
    source = Path(source)
    if source.is_file():
        return read_qa_file(source, question_field, answer_field)
    if not source.is_dir():
        raise UserError(f"--source {source} does not exist; pass your Q/A file (.jsonl, .json, .csv, .tsv) or a "
                        "folder holding chatterbot/*.yml, gsm8k_test.jsonl.gz or squad_val_1000.jsonl.gz")
    out: list[dict] = []
    for path in sorted((source / "chatterbot").glob("*.yml")):
        try:
            data = yaml.safe_load(io.read_text(path, "YAML file")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        convs = data.get("conversations", []) if isinstance(data, dict) else []
        for conv in convs if isinstance(convs, list) else []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                out.append({"instruction": conv[0].strip(), "output": conv[1].strip(), "task": "chatterbot"})
    gsm = source / "gsm8k_test.jsonl.gz"
    if gsm.exists():
        for lineno, r in io.read_jsonl(gsm, "GSM8K file"):
            if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
                raise UserError(f"{gsm}:{lineno} is not a GSM8K record (text `question` and `answer`)")
            answer = r["answer"].split("####")[-1].strip()
            out.append({"instruction": r["question"].strip(), "output": answer, "task": "gsm8k"})
    squad = source / "squad_val_1000.jsonl.gz"
    if squad.exists():
        for lineno, r in io.read_jsonl(squad, "SQuAD file"):
            answers = r.get("answers_text")
            if not isinstance(r.get("query"), str) or not isinstance(answers, list) or not answers \
                    or not isinstance(answers[0], str):
                raise UserError(f"{squad}:{lineno} is not a SQuAD record (text `query`, list `answers_text`)")
            query = r["query"].split("\nBackground: ", 1)[-1]
            passage, _, question = query.partition("\nQuestion: ")
            question = question.split("\nAnswer:")[0].strip()
            out.append({"instruction": "Answer the question about the passage in a few words.",
                        "input": f"{passage.strip()}\n\nQuestion: {question}",
                        "output": answers[0].strip(), "task": "squad"})
    if not out:
        raise UserError(f"{source} holds no chatterbot/*.yml, gsm8k_test.jsonl.gz or squad_val_1000.jsonl.gz")
    return out


def build_instruction_set(out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
                          synthetic: int = 4000, heldout_fraction: float = 0.1, seed: int = 0,
                          overwrite: bool = False, question_field: str | None = None,
                          answer_field: str | None = None) -> dict:
    """Write train.jsonl and heldout.jsonl (and instructions.json, which describes them) into a new
    directory; return their sizes per task."""
    if isinstance(synthetic, bool) or not isinstance(synthetic, int) or synthetic < 0:
        raise UserError(f"--synthetic must be an integer >= 0, got {synthetic!r}")
    if not 0 < heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    if synthetic == 0 and source is None:
        raise UserError("nothing to build: --synthetic 0 and no --source; ask for generated records or give "
                        "Q/A material")
    out = Path(out_dir)
    io.check_output_dir(out, "instructions", overwrite=overwrite, flag="--out",
                        inputs=[source] if source is not None else [])
    records = synthetic_tasks(synthetic, seed)
    if source is not None:
        records += qa_records(source, question_field, answer_field)
    seen, unique = set(), []
    for r in records:  # generated tasks repeat; a held-out record must not also be in train
        key = (r["instruction"], r.get("input", ""), r["output"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    records = unique
    if len(records) < 2:
        raise UserError(f"only {len(records)} distinct record(s): too few to split into train and held-out")
    rng = random.Random(seed)
    rng.shuffle(records)
    n_held = max(1, int(len(records) * heldout_fraction))
    held, train = records[:n_held], records[n_held:]
    counts = {}
    for split, rows in (("train", train), ("heldout", held)):
        for r in rows:
            counts.setdefault(split, {}).setdefault(r["task"], 0)
            counts[split][r["task"]] += 1
    with io.staging(out) as tmp:
        io.write_jsonl(tmp / "train.jsonl", train)
        io.write_jsonl(tmp / "heldout.jsonl", held)
        io.write_json(tmp / io.INSTRUCTIONS_MARKER, {"format": "gpt2lab-instructions", "synthetic": synthetic,
                                                     "source": str(source) if source else None, "seed": seed,
                                                     "heldout_fraction": heldout_fraction, "counts": counts})
        io.publish(tmp, out)
    return counts


def build_task_set(out_dir: str | os.PathLike, task: str, count: int, difficulty: int = 1, think: bool = False,
                   heldout: int = 200, seed: int = 0, overwrite: bool = False,
                   heldout_flag: str | None = "--heldout") -> dict:
    """Chat records of a built-in checkable task (gpt2lab.evals.checkable): `count` distinct train records from its
    train stream and `heldout` from its held-out set (never in train), each answer with its worked steps in
    a <think> section when `think`; and train.txt, the train records as text (one conversation a document).
    For pretraining and SFT before RL, and to measure them. A task with fewer held-out prompts than `heldout`
    is a UserError naming `heldout_flag` (None: take all it has)."""
    if count < 1:
        raise UserError(f"--synthetic must be at least 1 with --task, got {count}")
    t = get_task(task, difficulty)
    out = Path(out_dir)
    io.check_output_dir(out, "instructions", overwrite=overwrite, flag="--out")

    def record(r: dict) -> dict:
        steps, answer = t.solution(r)
        reply = with_thinking(steps if think else None, answer)
        return {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": reply}],
                "task": task, "answer": answer}

    # a small task has fewer distinct prompts than asked for: all it has (the counts say so)
    train = [record(r) for r in t.distinct(count, seed, "train")]
    held = [record(r) for r in t.heldout(heldout, seed=seed, flag=heldout_flag)] if heldout else []
    counts = {"train": {task: len(train)}, "heldout": {task: len(held)}}
    # the train records as plain text too, one conversation a document, for a tokenizer and for pretraining
    # (`gpt2lab prepare --doc-separator '\n\n\n'` puts the <|endoftext|> before each)
    text = "\n\n\n".join(render_messages(r["messages"], "chat", add_generation_prompt=False).replace(EOT_TEXT, "")
                          for r in train)
    with io.staging(out) as tmp:
        io.write_jsonl(tmp / "train.jsonl", train)
        io.write_jsonl(tmp / "heldout.jsonl", held)
        io.write_text(tmp / "train.txt", text + "\n")
        io.write_json(tmp / io.INSTRUCTIONS_MARKER, {"format": "gpt2lab-instructions", "task": task,
                                                     "difficulty": difficulty, "think": think, "seed": seed,
                                                     "counts": counts})
        io.publish(tmp, out)
    return counts


CHECKABLE = ("add", "reverse", "count", "replace")


@torch.no_grad()
def score_sft(model, tokenizer, records: list[dict], fmt="alpaca", max_new_tokens: int = 32,
              limit: int | None = None) -> dict:
    """Response loss, exact match on checkable tasks, clean-stop rate; per task and overall."""
    fmt = get_format(fmt) if not hasattr(fmt, "segments") else fmt
    model.eval()
    device = next(model.parameters()).device
    records = records[:limit] if limit else records
    block = model.config.block_size
    stats: dict[str, dict] = {}
    for r in records:
        s = stats.setdefault(r.get("task", "other"),
                             {"n": 0, "scored": 0, "loss": 0.0, "correct": 0, "clean": 0})
        s["n"] += 1
        enc = encode_record(r, fmt, tokenizer, block - 1)
        if enc is not None:  # an answer that does not fit in the context has no loss
            x, y = pad_examples([enc], tokenizer.eot_id, device)
            s["loss"] += lm_loss(model(x), y).item()
            s["scored"] += 1
        messages = [m for m in record_messages(r) if m["role"] != "assistant"]
        prompt, room = fit_to_context(encode_messages(tokenizer, messages, fmt, add_generation_prompt=True)[0],
                                      max_new_tokens, block)
        # greedy, to the token limit, so that a clean stop (eot or the format's stop text) can be seen
        ids = list(stream(model, prompt, room, temperature=0))
        stop_at = ids.index(tokenizer.eot_id) if tokenizer.eot_id in ids else len(ids)
        whole = tokenizer.decode(ids[:stop_at])
        text = cut_at_stop(whole, fmt.stop)
        s["clean"] += stop_at < len(ids) or text != whole
        s["correct"] += text.strip() == r["output"].strip()
    table = {}
    total = {"n": 0, "scored": 0, "loss": 0.0, "correct": 0, "clean": 0}
    for task, s in sorted(stats.items()):
        table[task] = {"n": s["n"], "scored": s["scored"],
                       "response_loss": s["loss"] / s["scored"] if s["scored"] else math.nan,
                       "exact_match": s["correct"] / s["n"], "clean_stop": s["clean"] / s["n"]}
        for k in ("n", "scored", "loss", "correct", "clean"):
            total[k] += s[k]
    checkable = [stats[t] for t in CHECKABLE if t in stats]
    n_check = sum(s["n"] for s in checkable)
    table["all"] = {"n": total["n"], "scored": total["scored"],
                    "response_loss": total["loss"] / total["scored"] if total["scored"] else math.nan,
                    "exact_match_checkable": (sum(s["correct"] for s in checkable) / n_check
                                              if n_check else math.nan),
                    "clean_stop": total["clean"] / max(1, total["n"])}
    return table
