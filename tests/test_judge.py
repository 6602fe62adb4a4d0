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

from gpt2lab.checkpoint import load_run, save_weights, write_run_config
from gpt2lab.errors import UserError
from gpt2lab.judge import completions_url, eval_judge, judge_score, parse_score
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.templates import ALPACA
from gpt2lab.tokenizer.train import train_bpe_from_texts

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request. ### Instruction: Name a colour. ### Response: Blue is a colour of the sky. ") * 20

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "REF-A blue"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "REF-B 5"},
    {"instruction": "Say hello.", "input": "", "output": "REF-C hello"},
]
# what the server answers for a prompt holding each reference output
REPLIES = {"REF-A": "Score: 85", "REF-B": "95", "REF-C": "I cannot rate this."}


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
    assert parse_score("Score: 85") == 85
    assert parse_score("85.") == 85
    assert parse_score("I'd give it 250 points, so 90") == 90
    assert parse_score("no number") is None and parse_score("") is None
    assert completions_url("http://h:1") == completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_eval_judge_scores_and_requests(server, run_dir):
    srv, url = server
    model, tok = load_run(run_dir)
    srv.requests.clear()
    res = eval_judge(model, tok, RECORDS, ALPACA, url, "judge-m", max_new_tokens=8)
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


def test_api_key_and_v1_url(server, monkeypatch):
    srv, url = server
    srv.requests.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert judge_score(url + "/v1", "m", "Name a colour.", "", "REF-A", "red") == 85
    assert judge_score(url, "m", "Name a colour.", "", "REF-A", "red", api_key="given") == 85
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for _p, h, _r in srv.requests]
    assert auth == ["Bearer from-env", "Bearer given"]


def test_http_error_names_status_and_message(server):
    _srv, url = server
    with pytest.raises(UserError, match=r"HTTP 404.*model \"missing\" not found"):
        judge_score(url, "missing", "i", "", "r", "a")


def test_nothing_listening(closed_url):
    with pytest.raises(UserError, match=f"no judge answered at {closed_url}.*ollama serve"):
        judge_score(closed_url, "m", "i", "", "r", "a", timeout=5)


def _cli(run_dir, data_file, url, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "eval", str(run_dir), "--task", "judge", "--data", str(data_file),
         "--judge-url", url, "--judge-model", "m", "--max-new-tokens", "8", "--output", str(out), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli(server, closed_url, run_dir, data_file, tmp_path):
    _srv, url = server
    ok = _cli(run_dir, data_file, url, tmp_path / "out.json")
    bad = _cli(run_dir, data_file, closed_url, tmp_path / "bad.json")
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    (metrics,) = json.loads(Path(tmp_path / "out.json").read_text())
    assert metrics["task"] == "judge" and metrics["n"] == 3 and metrics["unscored"] == 1
    assert metrics["mean_score"] == pytest.approx(90.0)
    assert "mean_score" in out
    _out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no judge answered at " + closed_url), err
    assert not (tmp_path / "bad.json").exists()
