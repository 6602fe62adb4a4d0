"""Evaluation (gpt2lab/evals: scoring, benchmarks, data): every score is checked
against a direct computation written here (one example at a time, log-softmax over the concatenated
ids, no batching or packing) and against Hugging Face's GPT2LMHeadModel on the same weights; then the
CLI end to end."""

import gzip
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import load_run, write_run_config
from gpt2lab.errors import UserError
from gpt2lab.evals import benchmarks as ev
from gpt2lab.evals import data as ed
from gpt2lab.evals import scoring
from gpt2lab.evals.data import MCExample
from gpt2lab.evals.scoring import Request
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.train import train_bpe_from_texts
from gpt2lab.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64  # small, so that long contexts and documents need truncation and sliding windows

with gzip.open(ROOT / "gpt2lab" / "assets" / "shakespeare.txt.gz", "rt", encoding="utf-8") as _f:
    TEXT = _f.read(30_000)
PARAGRAPHS = [p.strip() for p in TEXT.split("\n\n") if len(p.strip()) > 40][:12]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_texts([TEXT], 400, name="eval400")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    d = tmp_path_factory.mktemp("run")
    write_run_config(d, model.config, tokenizer_identity=tok.identity())
    save_weights(model, d / "model.safetensors")
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)  # (model, tokenizer): what the CLI scores with


def _hellaswag_records():
    base = {"ctx_b": "", "split": "val"}
    return [
        {**base, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
         "ctx_b": "he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
        {**base, "activity_label": "Food and Entertaining", "ctx_a": "[header] How to cook [title] Pasta "
         "[step] Boil the water.", "endings": ["[substeps] Add salt.", "Eat it raw [title] Enjoy.",
                                               "Put the pot away.", "Stir  it  slowly."], "label": "1"},
        {**base, "activity_label": "Sailing", "ctx_a": "A boat sails on the lake.", "ctx_b": "the wind",
         "endings": ["blows hard.", "is a fish.", "sings loudly to the crew all night long.", "stops."],
         "label": 0},
        {**base, "activity_label": "Baking", "ctx_a": "She mixes flour and eggs.", "ctx_b": "then she",
         "endings": ["bakes it.", "runs.", "flies.", "sleeps."], "label": 2},
    ]


def _mc_examples():
    long_context = " ".join(PARAGRAPHS[:3])  # hundreds of tokens: the context is cut from the left
    return [
        MCExample("The king is", ["dead.", "asleep in the hall", "here, and the queen walks in with him"], 0),
        MCExample("", ["Hello there", "Goodbye"], 1),  # an empty context is <|endoftext|>
        MCExample(long_context, ["my lord.", "and so to bed.", "I", "Go, go, go away now, sir."], 3),
        MCExample("To be, or not to be: ", ["that is the question", "what", "yes"], 2),  # trailing space
        MCExample("First Citizen:", ["Speak.", "You are all resolved", "a", "b c", "Before we proceed"], 1),
    ]


def _direct(model, ctx, cont):
    """Summed log-probability and greedy match of `cont` after `ctx`, the harness's way, unbatched."""
    L = model.config.block_size
    whole = (ctx + cont)[-(L + 1):]
    inp = whole[:-1]
    with torch.no_grad():
        logp = model(torch.tensor([inp]))[0].log_softmax(-1)
    rows = logp[len(inp) - len(cont):]
    lp = sum(rows[k, t].item() for k, t in enumerate(cont))
    return lp, all(rows[k].argmax().item() == t for k, t in enumerate(cont))


def _harness_ids(tok, context, continuation):
    """The harness's tokenisation: trailing context whitespace moves over; empty context -> eot."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode_ordinary(context) if context else [tok.eot_id]
    return ctx, tok.encode_ordinary(continuation)


def _hf_model(model):
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    # Hugging Face stores these four linear weights as Conv1D (in, out): transpose them, drop nothing
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(transposed) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)
    return hf


# --------------------------------------------------------------------- CLI processes, started early
# Each `gpt2lab eval` process spends seconds importing torch; they are started together when the first
# test asks for them and run while the in-process tests below do, and the CLI tests at the end wait.


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("cli")
    with gzip.open(d / "hs.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in _hellaswag_records() + _hellaswag_records()[:1]:
            f.write(json.dumps(r) + "\n")
    (d / "lam.jsonl").write_text("".join(json.dumps({"text": p.replace("\n", " ")}) + "\n"
                                         for p in PARAGRAPHS[:5]), encoding="utf-8")
    (d / "mc.jsonl").write_text("".join(json.dumps({"context": e.context, "choices": e.choices,
                                                    "label": e.label}) + "\n" for e in _mc_examples()),
                                encoding="utf-8")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS[:5]),
                                  encoding="utf-8")
    other = train_bpe_from_texts([TEXT], 300, name="other300")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    from gpt2lab.data.prepare import prepare

    prepare([str(corpus)], d / "data", tokenizer=tok, val_fraction=0.5, doc_separator="\n\n", workers=1,
            progress=False)
    prepare([str(corpus)], d / "data_other", tokenizer=other, val_fraction=0.5, doc_separator="\n\n",
            workers=1, progress=False)
    return d


@pytest.fixture(scope="module")
def cli_runs(run_dir, cli_files):
    d = cli_files
    argv = {
        "tasks": ["--task", "hellaswag,lambada", "--task", "mc", "--task", "loss",
                  "--data", f"hellaswag={d / 'hs.jsonl.gz'}", "--data", f"lambada={d / 'lam.jsonl'}",
                  "--data", f"mc={d / 'mc.jsonl'}", "--data", f"loss={d / 'docs.jsonl'}", "--limit", "3",
                  "--batch-size", "2", "--output", str(d / "out.json"),
                  "--predictions", str(d / "pred.jsonl"), "--quiet"],
        "unknown_task": ["--task", "hellaswag,winogrande"],
        "missing_data": ["--task", "mc", "--data", str(d / "nope.jsonl")],
        "other_tokenizer": ["--task", "loss", "--data", str(d / "data_other")],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPT2LAB_CACHE": str(d / "cache")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "gpt2lab", "eval", str(run_dir), *args], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=d)
             for name, args in argv.items()}
    results = {}

    def result(name):
        if name not in results:
            out, err = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield result
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_cli_task_names_match_library(cli_runs):
    from gpt2lab.cli.evaluate import CHECKABLE, TASK_NAMES
    from gpt2lab.evals.checkable import BUILTIN

    # the judge and exact match are tasks of the CLI (gpt2lab.evals.judge), given to evaluate_run as extra
    # tasks; the checkable tasks are gpt2lab.evals.checkable's built-ins, scored by pass@k
    from gpt2lab.evals.judge import eval_exact, exact_task  # noqa: F401  (the module that owns `exact`)

    assert TASK_NAMES == ev.TASKS + ("judge", "exact") + CHECKABLE
    assert set(CHECKABLE) == set(BUILTIN)


# ----------------------------------------------------------------------------- text rules


def test_hellaswag_preprocess_known_strings():
    pre = ed.preprocess
    # the harness strips first, so a leading tag leaves a leading space behind
    assert pre("[header] How to cook [title] Pasta") == " How to cook. Pasta"
    assert pre("  [header] How to [title] Cook [step] Boil water.  ") == " How to. Cook Boil water."
    assert pre("A man [step] walks.") == "A man walks."
    assert pre("Take [substeps] a [step] walk") == "Take a walk"
    assert pre("a   b") == "a  b"  # one pass of "  " -> " ", as the harness
    assert pre("[title] Start") == " Start"  # no space before the tag: it is just removed
    assert pre("no tags here") == "no tags here"


def test_hellaswag_example_context_and_choices():
    first, wikihow = (ed.hellaswag_example(r) for r in _hellaswag_records()[:2])
    assert first == MCExample("Roof shingle removal: A man is sitting on a roof. He",
                              ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3)
    # ctx_b empty: "ctx_a " + "" then strip; the header tag leaves "label:  How" -> one space
    assert wikihow.context == "Food and Entertaining: How to cook. Pasta Boil the water."
    assert wikihow.choices == [" Add salt.", "Eat it raw. Enjoy.", "Put the pot away.", "Stir it slowly."]
    assert wikihow.label == 1


def test_real_hellaswag_and_lambada_files(shared_data):
    hs = ed.load_hellaswag(shared_data / "eval" / "hellaswag_val.jsonl.gz", limit=3)
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. He" and hs[0].label == 3
    lam = ed.load_lambada(shared_data / "eval" / "lambada_openai_test.jsonl.gz", limit=5)
    with gzip.open(shared_data / "eval" / "lambada_openai_test.jsonl.gz", "rt", encoding="utf-8") as f:
        recs = [json.loads(next(f)) for _ in range(5)]
    for (context, target), rec in zip(lam, recs):
        assert target == " " + rec["target"] and context + target == rec["text"]


def test_lambada_split_and_encode_pair(tok):
    assert ed.lambada_example("the cat sat on the mat") == ("the cat sat on the", " mat")
    assert ed.lambada_example("word") == ("", " word")
    assert scoring.encode_pair(tok, "", " x") == ([tok.eot_id], tok.encode_ordinary(" x"))
    assert scoring.encode_pair(tok, "to be ", "or") == (tok.encode_ordinary("to be"), tok.encode_ordinary(" or"))


# ----------------------------------------------------------------------------- scores


def test_multiple_choice_matches_direct_computation(loaded):
    model, tok = loaded
    examples = _mc_examples()
    res = ev.eval_multiple_choice(model, tok, examples, batch_size=3)
    correct = correct_norm = 0
    for ex, rec in zip(examples, res.records):
        lps = []
        for k, choice in enumerate(ex.choices):
            ctx, cont = _harness_ids(tok, ex.context, " " + choice)
            lp, _ = _direct(model, ctx, cont)
            assert rec["scores"][k] == pytest.approx(lp, abs=1e-5)
            lps.append(lp)
        pred = max(range(len(lps)), key=lambda k: lps[k])
        pred_norm = max(range(len(lps)), key=lambda k: lps[k] / len(ex.choices[k]))
        assert (rec["prediction"], rec["prediction_norm"], rec["gold"]) == (pred, pred_norm, ex.label)
        correct += pred == ex.label
        correct_norm += pred_norm == ex.label
    assert res.metrics["n"] == len(examples)
    assert res.metrics["acc"] == correct / len(examples)
    assert res.metrics["acc_norm"] == correct_norm / len(examples)
    # the long example really was cut: its context alone is longer than the model's
    assert len(tok.encode_ordinary(examples[2].context)) > BLOCK


def test_scores_equal_hugging_face_gpt2(loaded):
    model, tok = loaded
    hf = _hf_model(model)
    examples = _mc_examples()
    res = ev.eval_multiple_choice(model, tok, examples, batch_size=4)
    for ex, rec in zip(examples, res.records):
        for k, choice in enumerate(ex.choices):
            ctx, cont = _harness_ids(tok, ex.context, " " + choice)
            inp = (ctx + cont)[-(BLOCK + 1):][:-1]
            with torch.no_grad():
                logp = hf(torch.tensor([inp])).logits[0].log_softmax(-1)
            rows = logp[len(inp) - len(cont):]
            want = sum(rows[j, t].item() for j, t in enumerate(cont))
            assert rec["scores"][k] == pytest.approx(want, abs=1e-4)


def test_greedy_flag_and_batching_invariance(loaded):
    model, tok = loaded
    rng = random.Random(0)
    V = model.config.vocab_size
    requests = []
    for _ in range(13):
        ctx = [rng.randrange(V) for _ in range(rng.randrange(1, 90))]
        conts = [[rng.randrange(V) for _ in range(rng.randrange(1, 15))] for _ in range(rng.randrange(1, 5))]
        requests.append(Request(ctx, conts))
    # a continuation that is exactly the model's greedy choice at every step
    ctx = tok.encode_ordinary("First Citizen: Before we proceed")
    cont = []
    with torch.no_grad():
        for _ in range(4):
            cont.append(int(model(torch.tensor([ctx + cont]))[0, -1].argmax()))
    wrong = cont[:2] + [(cont[2] + 1) % V] + cont[3:]
    requests.append(Request(ctx, [cont, wrong]))
    one = scoring.score_requests(model, requests, batch_size=1)
    seven = scoring.score_requests(model, requests, batch_size=7, return_argmax=True)
    for req, a, b in zip(requests, one, seven):
        for c, sa, sb in zip(req.continuations, a, b):
            assert abs(sa.logprob - sb.logprob) <= 1e-5
            assert sa.greedy == sb.greedy
            lp, greedy = _direct(model, list(req.context), list(c))
            assert sa.logprob == pytest.approx(lp, abs=1e-5) and sa.greedy == greedy
    assert [s.greedy for s in seven[-1]] == [True, False]
    assert seven[-1][0].argmax == tuple(cont)


def test_lambada_matches_direct_computation(loaded):
    model, tok = loaded
    texts = [p.replace("\n", " ") for p in PARAGRAPHS[:6]] + ["alone"]
    examples = [ed.lambada_example(t) for t in texts]
    res = ev.eval_lambada(model, tok, examples, batch_size=4)
    lps, hits = [], []
    for context, target in examples:
        ctx, cont = _harness_ids(tok, context, target)
        lp, greedy = _direct(model, ctx, cont)
        lps.append(lp)
        hits.append(greedy)
    assert [r["scores"][0] for r in res.records] == pytest.approx(lps, abs=1e-5)
    assert res.metrics["acc"] == sum(hits) / len(hits)
    assert res.metrics["ppl"] == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-6)
    assert res.records[0]["gold"] == examples[0][1]


# ----------------------------------------------------------------------------- loss


def _direct_doc_nll(model, ids, stride):
    """Token j is scored in the first window (begin = k * stride, input <= BLOCK tokens) that reaches
    it, conditioned on every token from that window's beginning: one forward per token."""
    total = 0.0
    for j in range(1, len(ids)):
        begin = max(0, -(-(j - BLOCK) // stride)) * stride
        with torch.no_grad():
            logp = model(torch.tensor([ids[begin:j]]))[0, -1].log_softmax(-1)
        total -= logp[ids[j]].item()
    return total


def test_loss_windows_cover_every_token_once():
    for n, stride in [(200, 64), (200, 20), (65, 64), (66, 1), (2, 7), (1, 5)]:
        windows = ev.loss_windows(n, BLOCK, stride)
        scored = [t for _, first, end in windows for t in range(first, end + 1)]
        assert scored == list(range(1, n))
        for begin, first, end in windows:
            assert 0 < end - begin <= BLOCK and begin < first
            assert first - begin >= min(BLOCK + 1 - stride, first)
    # stride == context: windows that touch and never overlap
    assert ev.loss_windows(200, BLOCK, BLOCK) == [(0, 1, 64), (64, 65, 128), (128, 129, 192), (192, 193, 199)]
    with pytest.raises(UserError, match="stride 65"):
        ev.loss_windows(200, BLOCK, 65)


def test_loss_sliding_window_matches_direct_computation(loaded):
    model, tok = loaded
    rng = random.Random(1)
    docs = [[tok.eot_id] + [rng.randrange(tok.eot_id) for _ in range(n)] for n in (150, 9, 63, 64, 1)]
    for stride in (24, BLOCK):
        res = ev.eval_loss(model, tok, docs, stride=stride, batch_size=3, chunk_windows=2)
        want = [_direct_doc_nll(model, d, stride) for d in docs]
        assert [r["nll"] for r in res.records] == pytest.approx(want, rel=1e-5)
        assert res.metrics["tokens"] == sum(len(d) - 1 for d in docs)
        assert res.metrics["loss"] == pytest.approx(sum(want) / res.metrics["tokens"], rel=1e-5)
    # stride == context is the training loss over consecutive, non-overlapping windows
    from gpt2lab.train.task import IGNORE_INDEX, lm_loss

    doc = torch.tensor(docs[0])
    x = torch.zeros(3, BLOCK, dtype=torch.long)
    y = torch.full((3, BLOCK), IGNORE_INDEX)
    for k in range(3):
        chunk = doc[k * BLOCK:(k + 1) * BLOCK + 1]
        x[k, :len(chunk) - 1], y[k, :len(chunk) - 1] = chunk[:-1], chunk[1:]
    with torch.no_grad():
        train_style = lm_loss(model(x), y).item()
    res = ev.eval_loss(model, tok, docs[:1], stride=BLOCK)
    assert res.metrics["loss"] == pytest.approx(train_style, rel=1e-5)


def test_bits_per_byte_formula(loaded, tmp_path):
    model, tok = loaded
    texts = ["héllo wörld, a non-ASCII line ✓ 日本語 " * 4, "Plain ASCII text about kings and queens."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    docs = ed.loss_documents(tok, str(path))
    assert docs == [[tok.eot_id] + tok.encode_ordinary(t) for t in texts]
    res = ev.eval_loss(model, tok, docs)
    nll = sum(_direct_doc_nll(model, d, BLOCK // 2) for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    m = res.metrics
    assert m["bytes"] == n_bytes and m["stride"] == BLOCK // 2
    assert m["bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)
    assert m["bpb"] == pytest.approx(m["loss"] * m["tokens"] / (math.log(2) * n_bytes), rel=1e-12)


def test_data_dir_val_split_scores_like_its_text(loaded, cli_files):
    model, tok = loaded
    # val_fraction 0.5 puts documents 1, 3, 5, ... in val
    val_texts = PARAGRAPHS[1::2]
    from_dir = ev.eval_loss(model, tok, ed.loss_documents(tok, str(cli_files / "data")))
    path = cli_files / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in val_texts), encoding="utf-8")
    from_text = ev.eval_loss(model, tok, ed.loss_documents(tok, str(path)))
    for key in ("n", "tokens", "bytes"):
        assert from_dir.metrics[key] == from_text.metrics[key]
    assert from_dir.metrics["bpb"] == pytest.approx(from_text.metrics["bpb"], rel=1e-6)
    assert from_dir.metrics["bytes"] == sum(len(t.encode("utf-8")) for t in val_texts)
    with pytest.raises(UserError, match="tokenizer"):
        ed.loss_documents(tok, str(cli_files / "data_other"))


def test_split_documents():
    split = lambda ids, eot: [d.tolist() for d in ed.split_documents(ids, eot)]
    assert split([9, 1, 2, 9, 9, 3], 9) == [[9, 1, 2], [9, 3]]
    assert split([1, 2, 9, 3], 9) == [[9, 1, 2], [9, 3]]
    assert split([1, 2, 3], None) == [[1, 2, 3]]


# ----------------------------------------------------------------------------- data files


def test_mc_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "label": 2}) + "\n")
    with pytest.raises(UserError, match="label 2"):
        ed.load_mc(bad)
    bad.write_text(json.dumps({"context": "a", "choices": ["x"]}) + "\n")
    with pytest.raises(UserError, match="no field 'label'"):
        ed.load_mc(bad)
    with pytest.raises(UserError, match="does not exist"):
        ed.load_mc(tmp_path / "missing.jsonl")


def test_default_data_cache_then_download(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache))
    calls = []

    def offline(url, dest, lines):
        calls.append((url, dest, lines))
        raise OSError("offline")

    monkeypatch.setattr(ed, "_download", offline)
    with pytest.raises(UserError, match=r"cannot download the hellaswag data .*--data PATH \(or put it at "
                       + str(cache / "hellaswag_val.jsonl")):
        ed.default_data("hellaswag")
    assert calls == [(ed.DOWNLOADS["hellaswag"][0], cache / "hellaswag_val.jsonl", 10042)]
    cache.mkdir()
    (cache / "hellaswag_val.jsonl").write_text("{}\n")
    assert ed.default_data("hellaswag") == cache / "hellaswag_val.jsonl"
    assert len(calls) == 1  # a cached file is not downloaded again


def test_download_is_checked_and_atomic(tmp_path, monkeypatch):
    """A download lands in the cache only whole and with the expected number of records."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache))
    source = tmp_path / "lambada_source.jsonl"
    source.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    monkeypatch.setitem(ed.DOWNLOADS, "lambada", (source.as_uri(), "lambada_test.jsonl", 3))
    with pytest.raises(UserError, match="got 2 records, expected 3.*--data PATH"):
        ed.default_data("lambada")
    assert list(cache.iterdir()) == []  # neither the file nor a temporary one
    monkeypatch.setitem(ed.DOWNLOADS, "lambada", (source.as_uri(), "lambada_test.jsonl", 2))
    assert ed.default_data("lambada") == cache / "lambada_test.jsonl"
    assert (cache / "lambada_test.jsonl").read_bytes() == source.read_bytes()
    assert ed.load_lambada(cache / "lambada_test.jsonl") == [("a", " b"), ("c", " d")]
    assert sorted(p.name for p in cache.iterdir()) == ["lambada_test.jsonl"]


def test_default_data_never_reads_the_shared_folder(tmp_path, monkeypatch, shared_data):
    """The developers' ../shared/data copies are test data only: the library never falls back to them."""
    assert (shared_data / "eval" / "hellaswag_val.jsonl.gz").is_file()
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))

    def offline(url, dest, lines):
        raise OSError("offline")

    monkeypatch.setattr(ed, "_download", offline)
    for task in ("hellaswag", "lambada"):
        with pytest.raises(UserError, match=f"cannot download the {task} data"):
            ed.default_data(task)
        with pytest.raises(UserError, match=f"cannot download the {task} data"):
            ed.resolve_data(task, None)


def test_run_level_argument_errors(run_dir, cli_files):
    with pytest.raises(UserError, match="unknown dtype 'fp16'; use fp32 or bf16"):
        ev.evaluate_run(run_dir, ["mc"], {"mc": str(cli_files / "mc.jsonl")}, device="cpu", dtype="fp16")
    with pytest.raises(UserError, match="unknown task 'boolq'; choose from loss, hellaswag"):
        ev.evaluate_run(run_dir, ["boolq"])
    with pytest.raises(UserError, match="not among the tasks"):
        ev.evaluate_run(run_dir, ["mc"], {"loss": str(cli_files / "docs.jsonl")})
    with pytest.raises(UserError, match="needs --data"):
        ev.evaluate_run(run_dir, ["mc"], device="cpu")
    results = ev.evaluate_run(run_dir, ["loss"], {"loss": str(cli_files / "docs.jsonl")}, stride=BLOCK,
                              limit=2, device="cpu")
    assert results[0].metrics["n"] == 2 and results[0].metrics["stride"] == BLOCK


def test_bf16_on_the_cpu(run_dir, cli_files):
    mc = {"mc": str(cli_files / "mc.jsonl")}
    (fp,) = ev.evaluate_run(run_dir, ["mc"], mc, limit=2, device="cpu", dtype="fp32")
    (bf,) = ev.evaluate_run(run_dir, ["mc"], mc, limit=2, device="cpu", dtype="bf16")
    assert bf.metrics["n"] == 2
    fp_scores = [x for r in fp.records for x in r["scores"]]
    bf_scores = [x for r in bf.records for x in r["scores"]]
    assert bf_scores == pytest.approx(fp_scores, rel=0.05, abs=0.5)
    assert bf_scores != fp_scores  # the scores really were computed in bf16


def test_cli_data_flags():
    from gpt2lab.cli.evaluate import _data_map

    assert _data_map([__file__], ["mc"]) == {"mc": __file__}
    both = _data_map([f"loss={__file__}", f"mc={__file__}"], ["mc", "loss"])
    assert both == {"loss": __file__, "mc": __file__}
    with pytest.raises(ValueError, match="say which one"):
        _data_map([__file__], ["mc", "loss"])
    with pytest.raises(ValueError, match="twice"):
        _data_map([f"mc={__file__}", f"mc={__file__}"], ["mc"])


# ----------------------------------------------------------------------------- CLI


def test_cli_several_tasks_output_and_predictions(cli_runs, cli_files, loaded):
    rc, out, err = cli_runs("tasks")
    assert rc == 0, err
    for task in ("hellaswag", "lambada", "mc", "loss"):
        assert task in out
    results = json.loads((cli_files / "out.json").read_text())
    assert [r["task"] for r in results] == ["hellaswag", "lambada", "mc", "loss"]
    assert all(r["n"] == 3 for r in results)
    by_task = {r["task"]: r for r in results}
    assert set(by_task["hellaswag"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert set(by_task["lambada"]) >= {"acc", "ppl"} and set(by_task["loss"]) >= {"loss", "ppl", "bpb"}
    preds = [json.loads(line) for line in (cli_files / "pred.jsonl").read_text().splitlines()]
    assert [p["task"] for p in preds] == ["hellaswag"] * 3 + ["lambada"] * 3 + ["mc"] * 3 + ["loss"] * 3
    assert [p["index"] for p in preds[:3]] == [0, 1, 2]
    assert all(len(p["scores"]) == 4 and p["gold"] in range(4) for p in preds[:3])
    # the CLI's numbers are the library's
    model, tok = loaded
    hs = ev.eval_multiple_choice(model, tok, ed.load_hellaswag(cli_files / "hs.jsonl.gz", 3), "hellaswag")
    assert [p["scores"] for p in preds[:3]] == [pytest.approx(r["scores"], abs=1e-5) for r in hs.records]
    assert by_task["hellaswag"]["acc_norm"] == hs.metrics["acc_norm"]
    loss = ev.eval_loss(model, tok, ed.loss_documents(tok, str(cli_files / "docs.jsonl"), 3))
    assert by_task["loss"]["bpb"] == pytest.approx(loss.metrics["bpb"], rel=1e-5)


@pytest.mark.parametrize("case, expected", [
    ("unknown_task", r"unknown task 'winogrande'; choose from loss, hellaswag, lambada, mc"),
    ("missing_data", r"nope\.jsonl for task mc does not exist"),
    ("other_tokenizer", r"prepared with tokenizer 'other300'.*--tokenizer"),
])
def test_cli_errors_are_one_line(cli_runs, case, expected):
    import re

    rc, out, err = cli_runs(case)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(expected, lines[0]), lines[0]


# ----------------------------------------------------------------------------- CLI, in this process


def cli_main(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """`gpt2lab eval ARGV` in this process: (exit status, stdout, stderr)."""
    from gpt2lab.cli import main

    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)  # it turns one-line errors into tracebacks
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["eval", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def error_line(result) -> str:
    code, _out, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every path under a directory (hidden ones too), with the bytes of each file."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


@pytest.fixture
def no_evaluation(monkeypatch):
    """evaluate_run, made to fail the test if a refused command ever reaches it."""
    calls = []

    def evaluate_run(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(ev, "evaluate_run", evaluate_run)
    return calls


@pytest.mark.parametrize("flag", ["--output", "--predictions"])
def test_cli_refuses_an_output_it_must_not_replace(flag, run_dir, cli_files, tmp_path, capsys, monkeypatch,
                                                   no_evaluation):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((run_dir / "model.safetensors").read_bytes())
    config = tmp_path / "config.json"
    config.write_text((run_dir / "config.json").read_text())
    (tmp_path / "adir").mkdir()
    (tmp_path / "nodir").write_text("a file")
    # the other kind of eval output is not replaced either
    other = tmp_path / ("pred.jsonl" if flag == "--output" else "metrics.json")
    if flag == "--output":
        other.write_text(json.dumps({"task": "mc", "index": 0}) + "\n")
    else:
        other.write_text(json.dumps([{"task": "mc", "n": 1}]))
    cases = [
        (run_dir / "model.safetensors", "lies inside the input"),
        (weights, "exists and is not gpt2lab eval"),
        (config, "exists and is not gpt2lab eval"),
        (other, "exists and is not gpt2lab eval"),
        (tmp_path / "adir", "is a directory"),
        (tmp_path / "nodir" / "x.json", "is a file, not a directory"),
        (cli_files / "mc.jsonl", "is the input"),
    ]
    run_before, tmp_before, mc_before = listing(run_dir), listing(tmp_path), (cli_files / "mc.jsonl").read_bytes()
    for target, words in cases:
        line = error_line(cli_main([run_dir, "--task", "mc", "--data", cli_files / "mc.jsonl", flag, target,
                                    "--quiet", "--device", "cpu"], capsys, monkeypatch))
        assert line.startswith(f"error: {flag} {target}") and words in line, line
    assert no_evaluation == []
    assert listing(run_dir) == run_before and listing(tmp_path) == tmp_before  # no temporary file either
    assert (cli_files / "mc.jsonl").read_bytes() == mc_before


def test_cli_replaces_earlier_eval_outputs(run_dir, cli_files, tmp_path, capsys, monkeypatch):
    out, pred = tmp_path / "metrics.json", tmp_path / "pred.jsonl"
    out.write_text(json.dumps([{"task": "lambada", "n": 99, "acc": 0.0}]))
    pred.write_text(json.dumps({"task": "lambada", "index": 0}) + "\n")
    code, stdout, err = cli_main([run_dir, "--task", "mc", "--data", cli_files / "mc.jsonl", "--limit", "2",
                                  "--output", out, "--predictions", pred, "--quiet", "--device", "cpu"],
                                 capsys, monkeypatch)
    assert code == 0, err
    assert "acc_norm" in stdout
    (metrics,) = json.loads(out.read_text())
    assert metrics["task"] == "mc" and metrics["n"] == 2
    preds = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [(p["task"], p["index"]) for p in preds] == [("mc", 0), ("mc", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "pred.jsonl"]


def test_cli_outputs_in_a_new_directory(run_dir, cli_files, tmp_path, capsys, monkeypatch):
    out, pred = tmp_path / "results" / "a" / "metrics.json", tmp_path / "results" / "b" / "pred.jsonl"
    code, _stdout, err = cli_main([run_dir, "--task", "mc", "--data", cli_files / "mc.jsonl", "--limit", "1",
                                   "--output", out, "--predictions", pred, "--quiet", "--device", "cpu"],
                                  capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out.read_text())[0]["n"] == 1 and json.loads(pred.read_text())["task"] == "mc"


def test_cli_binary_data_is_one_error(run_dir, tmp_path, capsys, monkeypatch):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80 binary")
    not_gzip = tmp_path / "data.jsonl.gz"
    not_gzip.write_bytes(b"\x00\xff\xfe\x80 binary, not gzip")
    cases = [(binary, "not UTF-8 text"), (not_gzip, "not a readable gzip file"),
             (run_dir / "model.safetensors", "")]
    for task in ("mc", "hellaswag", "lambada"):
        for path, words in cases:
            line = error_line(cli_main([run_dir, "--task", task, "--data", path, "--quiet", "--device", "cpu"],
                                       capsys, monkeypatch))
            assert str(path) in line and words in line, line


def test_cli_loss_data_with_ids_outside_the_vocabulary(run_dir, cli_files, tmp_path, capsys, monkeypatch):
    from gpt2lab.data.shards import HEADER_BYTES, read_meta

    vocab = load_run(run_dir)[0].config.vocab_size
    bad = tmp_path / "data"
    bad.mkdir()
    for p in (cli_files / "data").iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    meta = read_meta(bad)
    assert meta["dtype"] == "uint16"
    shard = bad / meta["splits"]["val"]["shards"][0]
    raw = bytearray(shard.read_bytes())
    for bad_id in (vocab, 60000):  # the first id past the vocabulary, and one far past it
        raw[HEADER_BYTES + 10:HEADER_BYTES + 12] = bad_id.to_bytes(2, "little")
        shard.write_bytes(bytes(raw))
        line = error_line(cli_main([run_dir, "--task", "loss", "--data", bad, "--quiet", "--device", "cpu"],
                                   capsys, monkeypatch))
        assert f"token id {bad_id}, outside the model's vocabulary of {vocab}" in line, line
        with pytest.raises(UserError, match=f"token id {bad_id}"):
            ed.loss_documents(load_run(run_dir)[1], str(bad), vocab_size=vocab)
    raw[HEADER_BYTES + 10:HEADER_BYTES + 12] = (vocab - 1).to_bytes(2, "little")  # the last id is fine
    shard.write_bytes(bytes(raw))
    code, out, err = cli_main([run_dir, "--task", "loss", "--data", bad, "--quiet", "--device", "cpu"], capsys,
                              monkeypatch)
    assert code == 0, err
