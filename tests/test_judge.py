"""Task judge: answers scored 0-100 by an OpenAI-compatible server, here a small one run by the test."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import load_run, write_run_config
from gpt2lab.errors import UserError
from gpt2lab.evals.judge import completions_url, eval_judge, judge_score, judge_task, parse_score
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.templates import get_format
from gpt2lab.tokenizer.train import train_bpe_from_texts
from gpt2lab.weights import save_weights

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request. ### Instruction: Name a colour. ### Response: Blue is a colour of the sky. ") * 20

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "REF-A blue"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "REF-B 5"},
    {"instruction": "Say hello.", "input": "", "output": "REF-C hello"},
]
# what the server answers (the message content) for a prompt holding each reference output
REPLIES = {"REF-A": "Score: 85", "REF-B": "95", "REF-C": "I cannot rate this.",
           "REF-LIST": [{"type": "text", "text": "85"}], "REF-NUM": 85, "REF-DICT": {"score": 85}, "REF-NULL": None}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), request))
        if self.path != "/v1/chat/completions" or "model" not in request or "messages" not in request:
            return self._send(400, {"error": {"message": "bad request"}})
        if request["model"] == "missing":
            return self._send(404, {"error": {"message": 'model "missing" not found, try pulling it first'}})
        if request["model"] == "not-openai":
            return self._send(200, {"response": "85"})
        content = request["messages"][-1]["content"]
        reply = next((v for k, v in REPLIES.items() if k in content), "50")
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def closed_url():
    with socket.socket() as s:  # a port that was free a moment ago and has nothing listening now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = train_bpe_from_texts([TEXT], 300, name="judge300")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    d = tmp_path_factory.mktemp("run")
    write_run_config(d, model.config, tokenizer_identity=tok.identity())
    save_weights(model, d / "model.safetensors")
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def test_parse_score_and_url():
    # a bare number (markdown and a final period allowed)
    assert parse_score("85") == 85 and parse_score(" 85\n") == 85
    assert parse_score("85.") == 85
    assert parse_score("**85**.") == 85 and parse_score("`70`") == 70
    assert parse_score("0") == 0 and parse_score("100") == 100
    # an explicit verdict; the last one counts
    assert parse_score("Score: 85") == 85
    assert parse_score("The correct output is 42 and the response says 41. Score: 0") == 0
    assert parse_score("85/100") == 85 and parse_score("I rate it 60 out of 100.") == 60
    assert parse_score("A score of 70 fits.") == 70
    assert parse_score("Score: 20. On reflection, final score: 80") == 80
    # a number that merely appears in the text is no score
    assert parse_score("I'd give it 250 points, so 90") is None
    assert parse_score("The answer 42 is right.") is None
    # out of range, or not a whole number
    assert parse_score("150 out of 100") is None and parse_score("101") is None
    assert parse_score("-5") is None and parse_score("Score: -5") is None
    assert parse_score("Score: 85.5") is None and parse_score("85.0") == 85
    assert parse_score("no number") is None and parse_score("") is None
    for value in (None, 85, 85.0, b"85", ["85"], {"score": 85}):
        assert parse_score(value) is None
    assert completions_url("http://h:1") == completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_eval_judge_scores_and_requests(server, run_dir):
    srv, url = server
    model, tok = load_run(run_dir)
    srv.requests.clear()
    res = eval_judge(model, tok, RECORDS, get_format("alpaca"), url, "judge-m", max_new_tokens=8)
    m = res.metrics
    assert m["task"] == "judge" and m["n"] == 3
    assert m["scored"] == 2 and m["unscored"] == 1
    assert m["mean_score"] == pytest.approx((85 + 95) / 2)
    assert [r["score"] for r in res.records] == [85, 95, None]
    assert [r["index"] for r in res.records] == [0, 1, 2]
    assert all(isinstance(r["answer"], str) for r in res.records)
    assert len(srv.requests) == 3
    for (path, _headers, request), record in zip(srv.requests, RECORDS):
        assert path == "/v1/chat/completions"
        assert request["model"] == "judge-m" and request["temperature"] == 0
        content = request["messages"][0]["content"]
        assert record["output"] in content and record["instruction"] in content
        assert "0 to 100" in content
    assert "2 and 3" in srv.requests[1][2]["messages"][0]["content"]


def authorization(requests) -> list:
    return [{k.lower(): v for k, v in h.items()}.get("authorization") for _p, h, _r in requests]


def test_judge_task_in_evaluate_run(server, run_dir, data_file, monkeypatch):
    """The judge as an extra task of evaluate_run: the run has no chat format, so alpaca is used."""
    from gpt2lab.evals import judge
    from gpt2lab.evals.benchmarks import evaluate_run

    srv, url = server
    model, tok = load_run(run_dir)
    srv.requests.clear()
    direct = eval_judge(model, tok, RECORDS, "alpaca", url, "judge-m", max_new_tokens=8)
    formats, real = [], judge.generate_answer

    def generate_answer(model, tokenizer, fmt, record, max_new_tokens=128):
        formats.append(getattr(fmt, "name", fmt))
        return real(model, tokenizer, fmt, record, max_new_tokens)

    monkeypatch.setattr(judge, "generate_answer", generate_answer)
    (res,) = evaluate_run(run_dir, ["judge"], {"judge": str(data_file)}, device="cpu",
                          extra_tasks={"judge": judge_task(url, "judge-m", None, 8)})
    assert formats == ["alpaca"] * 3
    assert res.metrics["task"] == "judge" and res.metrics["data"] == str(data_file)
    assert res.metrics["mean_score"] == direct.metrics["mean_score"] == pytest.approx(90.0)
    assert res.records == direct.records
    prompts = [r["messages"][0]["content"] for _p, _h, r in srv.requests]
    assert len(prompts) == 6 and prompts[:3] == prompts[3:]


def test_api_key_and_v1_url(server, monkeypatch):
    srv, url = server
    srv.requests.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")  # never read: a key is sent only when given
    assert judge_score(url + "/v1", "m", "Name a colour.", "", "REF-A", "red") == 85
    assert judge_score(url, "m", "Name a colour.", "", "REF-A", "red", api_key="given") == 85
    assert judge_score(url + "/v1/chat/completions", "m", "Name a colour.", "", "REF-A", "red", api_key="") == 85
    assert [p for p, _h, _r in srv.requests] == ["/v1/chat/completions"] * 3
    assert authorization(srv.requests) == [None, "Bearer given", None]


@pytest.mark.parametrize("ref, kind", [("REF-LIST", "list"), ("REF-NUM", "int"), ("REF-DICT", "dict")])
def test_reply_content_that_is_not_text(server, ref, kind):
    _srv, url = server
    with pytest.raises(UserError) as exc:
        judge_score(url, "m", "i", "", ref, "a")
    msg = str(exc.value)
    assert f"answered with content that is not text ({kind})" in msg and len(msg.splitlines()) == 1, msg


def test_reply_without_content(server):
    _srv, url = server
    assert judge_score(url, "m", "i", "", "REF-NULL", "a") is None  # no text: unscored, not an error
    with pytest.raises(UserError, match="did not answer like an OpenAI chat completions endpoint"):
        judge_score(url, "not-openai", "i", "", "r", "a")


def test_http_error_names_status_and_message(server):
    _srv, url = server
    with pytest.raises(UserError, match=r"HTTP 404.*model \"missing\" not found"):
        judge_score(url, "missing", "i", "", "r", "a")


def test_nothing_listening(closed_url):
    with pytest.raises(UserError, match=f"no judge answered at {closed_url}.*ollama serve"):
        judge_score(closed_url, "m", "i", "", "r", "a", timeout=5)


def _cli(run_dir, data_file, url, out):
    # a key in the environment is never sent: the judge gets a key only from --judge-api-key
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "sk-from-env-not-for-this-judge"}
    env.pop("GPT2LAB_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "eval", str(run_dir), "--task", "judge", "--data", str(data_file),
         "--judge-url", url, "--judge-model", "m", "--max-new-tokens", "8", "--output", str(out), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli(server, closed_url, run_dir, data_file, tmp_path):
    srv, url = server
    srv.requests.clear()
    ok = _cli(run_dir, data_file, url, tmp_path / "out.json")
    bad = _cli(run_dir, data_file, closed_url, tmp_path / "bad.json")
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    (metrics,) = json.loads(Path(tmp_path / "out.json").read_text())
    assert metrics["task"] == "judge" and metrics["n"] == 3 and metrics["unscored"] == 1
    assert metrics["mean_score"] == pytest.approx(90.0)
    assert "mean_score" in out
    assert len(srv.requests) == 3 and authorization(srv.requests) == [None] * 3
    _out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no judge answered at " + closed_url), err
    assert not (tmp_path / "bad.json").exists()


def test_cli_in_process_key_and_bad_reply(server, run_dir, tmp_path, capsys, monkeypatch):
    from gpt2lab.cli import main

    srv, url = server
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")

    def gpt2lab_eval(data, *extra):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(run_dir), "--task", "judge", "--data", str(data), "--judge-url", url,
                  "--judge-model", "m", "--max-new-tokens", "4", "--quiet", "--device", "cpu", *extra])
        return exc.value.code, capsys.readouterr().err

    good = tmp_path / "ok.json"
    good.write_text(json.dumps(RECORDS[:1]))
    srv.requests.clear()
    code, err = gpt2lab_eval(good, "--judge-api-key", "sk-given")
    assert code == 0, err
    assert authorization(srv.requests) == ["Bearer sk-given"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], {**RECORDS[1], "output": "REF-NUM 5"}]))
    srv.requests.clear()
    code, err = gpt2lab_eval(bad)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the judge at ") and "not text (int)" in lines[0], err
    assert len(srv.requests) == 2 and authorization(srv.requests) == [None, None]
