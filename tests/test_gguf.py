"""export-gguf, proven in llama.cpp itself (llama-cpp-python builds it): the tokenizer gives gpt2lab's ids,
the logits agree within what each type allows, greedy continuations of a trained model are identical in
f32, an SFT run's chat template renders gpt2lab's format, and what llama.cpp cannot compute is refused."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import pretrain_argv
from test_hf import CORPUS, TEXTS, randomise, write_run

from gpt2lab import cli
from gpt2lab.checkpoint import open_run
from gpt2lab.errors import UserError
from gpt2lab.export.gguf import export_gguf, ollama_modelfile
from gpt2lab.generate import generate
from gpt2lab.model import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.templates import encode_messages, jinja_template, ollama_template, render_messages
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.train import train_bpe_from_texts

llama_cpp = pytest.importorskip("llama_cpp")

FAMILIES = {
    "gpt2": {},
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, no_tie_embeddings=True,
                  no_bias=True),
    "qwen3": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, no_bias=True),
}
# the largest logit difference each type may make on these small trained models; GPT-2's f32 bound is looser
# than Llama's because llama.cpp computes GELU from a table of f16 values
TOLERANCE = {"f32": {"gpt2": 2e-2, "llama": 1e-3, "qwen3": 1e-3}, "f16": 0.05, "bf16": 0.3, "q8_0": 0.3}


def load(path: Path, n_ctx: int = 64):
    # keys and values kept in f32 (llama.cpp's default cache is f16), so that f32 is compared as f32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, type_k=0,
                           type_v=0, seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One short pretraining run per family on the tiny Shakespeare (a trained tokenizer of 512 tokens)."""
    root = tmp_path_factory.mktemp("gguf-runs")
    runs = {}
    for name, options in FAMILIES.items():
        settings = dict(model="tiny", n_embd=64, n_head=2, block_size=64, batch_size=8, max_steps=300, lr=3e-3,
                        warmup_steps=5, eval_every=300, eval_batches=1, log_every=300, checkpoint_every=300,
                        tensorboard=False, device="cpu", sample_tokens=0, seed=1)
        argv = pretrain_argv(tiny_data, root / name, settings)
        for flag, value in options.items():
            argv += [f"--{flag.replace('_', '-')}"] + ([] if value is True else [str(value)])
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        runs[name] = root / name
    return runs


def play_text() -> str:
    src = Path(__file__).resolve().parents[1] / "gpt2lab" / "assets" / "shakespeare.txt.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        return f.read(300_000)[-2_000:]  # past the tiny corpus the models were trained on


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_trained_model_runs_in_llama_cpp(trained, tmp_path, family):
    run = trained[family]
    info = open_run(run)
    model, tok = info.load()
    text = play_text()
    ids = tok.encode(text)[:60]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    found = {}
    for typ in ("f32", "f16", "bf16", "q8_0"):
        path = export_gguf(run, tmp_path / f"{family}-{typ}.gguf", type=typ)
        llm = load(path)
        # the tokenizer inside the file: the run's own ids on real text, and on awkward text
        for sample in [text] + TEXTS:
            assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok.encode(sample), sample
        assert llm.detokenize(ids).decode() == tok.decode(ids)
        found[typ] = np.abs(llama_logits(llm, ids) - ours).max()
        tol = TOLERANCE[typ][family] if isinstance(TOLERANCE[typ], dict) else TOLERANCE[typ]
        assert found[typ] < tol, (typ, found)
        if typ == "f32":  # greedy continuations, token for token, from three places in the text
            made = set()
            for start in (0, 20, 40):
                prompt = ids[start:start + 12]
                want = generate(model, prompt, max_new_tokens=30, temperature=0.0)
                made.update(want)
                got = [t for _, t in zip(range(30), llm.generate(prompt, temp=0.0, top_k=1, reset=True))]
                assert got == want
            assert len(made) >= 6  # continuations that move, not one token over and over
        del llm
    # the smaller types are smaller files, and q8_0 is a quarter of f32's matrices or less
    sizes = {t: (tmp_path / f"{family}-{t}.gguf").stat().st_size for t in found}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"] and sizes["bf16"] == sizes["f16"]


def test_gpt2s_own_tokenizer_is_inside_the_file(tmp_path):
    """OpenAI's vocabulary (50,257 tokens and its merges): llama.cpp gives tiktoken's ids."""
    tok = get_tokenizer("gpt2")
    cfg = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=32)
    run = write_run(tmp_path / "run", randomise(GPT(cfg)), tok)
    llm = load(export_gguf(run, tmp_path / "gpt2.gguf", type="f32"), n_ctx=32)
    for text in TEXTS + CORPUS[:4] + [play_text()]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.token_eos() == llm.token_bos() == 50256
    text = "one<|endoftext|>two"  # a special token only where asked
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, allowed_special="all")
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)


CONVERSATIONS = [
    [{"role": "user", "content": "Spell garden backwards."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to  three:\n\n"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4\n"},
     {"role": "user", "content": "and 3+3?"}],
]


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
def test_an_sft_runs_chat_template_is_gpt2labs_format(tmp_path, fmt):
    tok = train_bpe_from_texts(CORPUS, 300, name="t300")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    run = write_run(tmp_path / "run", randomise(GPT(cfg)), tok)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "template": fmt}))
    path = export_gguf(run, tmp_path / "sft.gguf", type="f32", ollama=True)

    reader = gguf.GGUFReader(str(path))
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == jinja_template(fmt)
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token="<|endoftext|>",
                                                                bos_token="<|endoftext|>")
    llm = load(path)
    for messages in CONVERSATIONS:
        prompt = formatter(messages=messages).prompt
        assert prompt == render_messages(messages, fmt, add_generation_prompt=True)
        # llama.cpp tokenizes the rendered prompt as gpt2lab's SFT and chat do
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == encode_messages(tok, messages, fmt)[0]

    modelfile = (tmp_path / "sft.Modelfile").read_text()
    assert modelfile == ollama_modelfile("sft.gguf", fmt, True, 64)
    assert "FROM ./sft.gguf" in modelfile and f'TEMPLATE """{ollama_template(fmt)}"""' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and 'PARAMETER stop "\\n### "' in modelfile


LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)


@pytest.mark.parametrize("options,named", [
    (dict(LLAMA, mlp="relu2"), ["--mlp relu2"]),
    (dict(LLAMA, n_experts=2, experts_per_token=1, attention="mla"), ["--n-experts 2", "--attention mla"]),
    (dict(LLAMA, rope_scaling="yarn", rope_factor=2.0), ["--rope-scaling yarn"]),
    (dict(LLAMA, qk_norm=True, bias=True), ["--qk-norm with --bias"]),
    (dict(norm="rmsnorm", qk_norm=True, mlp="relu2"), ["--norm rmsnorm", "--qk-norm", "--mlp relu2"]),
], ids=["relu2", "moe-mla", "yarn", "qwen3-bias", "gpt2-like"])
def test_what_llama_cpp_cannot_compute_is_refused_naming_every_option(tmp_path, options, named):
    tok = train_bpe_from_texts(CORPUS, 300, name="t300")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, **options)
    run = write_run(tmp_path / "run", GPT(cfg), tok)
    with pytest.raises(UserError) as e:
        export_gguf(run, tmp_path / "m.gguf")
    assert all(option in str(e.value) for option in named), str(e.value)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == [run]


def test_the_command_writes_the_file_or_one_line(tmp_path, capsys):
    tok = train_bpe_from_texts(CORPUS, 300, name="t300")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    run = write_run(tmp_path / "run", randomise(GPT(cfg)), tok)

    def gpt2lab(*argv) -> int:
        with pytest.raises(SystemExit) as e:
            cli.main(["export-gguf", str(run), *map(str, argv)])
        return e.value.code

    assert gpt2lab("--out", tmp_path / "m.gguf", "--type", "q8_0", "--ollama") == 0
    out = capsys.readouterr().out
    assert "m.gguf" in out and "ollama create m -f" in out
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF" and (tmp_path / "m.Modelfile").is_file()
    assert gpt2lab("--out", tmp_path / "m.gguf", "--type", "f32") == 0  # an earlier GGUF is replaced
    for argv, message in [
        (["--out", tmp_path / "m.bin"], "should end in .gguf"),
        (["--out", run / "model.gguf"], "--out"),  # never inside the run it reads
        (["--out", tmp_path / "m.gguf", "--type", "q4"], "invalid choice"),
    ]:
        assert gpt2lab(*argv) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "notes.gguf").write_text("mine")
    assert gpt2lab("--out", tmp_path / "notes.gguf") == 2  # a file gpt2lab did not write is kept
    assert "is not a GGUF file" in capsys.readouterr().err and (tmp_path / "notes.gguf").read_text() == "mine"
    (tmp_path / "x.Modelfile").write_text("FROM llama3\n")
    assert gpt2lab("--out", tmp_path / "x.gguf", "--ollama") == 2  # nor a Modelfile of someone else's
    assert "Modelfile" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


# Ollama renders a Modelfile's TEMPLATE with Go's text/template, given .System (the system messages) and
# .Messages (each with .Role and .Content); this program does the same with the Go toolchain when one is here
_GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

func main() {
\tsrc, _ := os.ReadFile(os.Args[1])
\tvar data map[string]any
\traw, _ := os.ReadFile(os.Args[2])
\tif err := json.Unmarshal(raw, &data); err != nil { panic(err) }
\tt := template.Must(template.New("m").Parse(string(src)))
\tif err := t.Execute(os.Stdout, data); err != nil { panic(err) }
}
"""


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
def test_the_modelfile_template_renders_gpt2labs_format_in_go(tmp_path, fmt):
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (Debian: golang-go) to run Ollama's template language")
    (tmp_path / "main.go").write_text(_GO_RENDER)
    (tmp_path / "template").write_text(ollama_template(fmt))
    env = {"GOCACHE": str(tmp_path / "cache"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), str(tmp_path / "main.go")], check=True,
                   env=env, capture_output=True, timeout=300)
    for messages in CONVERSATIONS:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        (tmp_path / "data.json").write_text(json.dumps({
            "System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}))
        r = subprocess.run([str(tmp_path / "render"), str(tmp_path / "template"), str(tmp_path / "data.json")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == render_messages(messages, fmt, add_generation_prompt=True)
