"""README.md's tour of the command line, run line by line as written, in order, from a fresh directory.

Only sizes shrink so that it fits the suite: the bundled Shakespeare is replaced by a slice of it (20
plays, the first few kilobytes of each), and step counts, vocabulary size and token counts are scaled
down. Everything else (the paths, the flags, the order, the config file) is the README's; a line that
stops working, or a new line that does not work, fails here.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gpt2lab import cli

REPO = Path(__file__).resolve().parents[1]
CORPUS = "gpt2lab/assets/shakespeare.txt.gz"
SMALLER = {"--vocab-size": {"4096": "300"}, "--max-new-tokens": {"100": "12"},
           "--max-steps": {"200": "6", "300": "8", "100": "3"}}


def tour_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("## A tour of the command line")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def shrink(argv: list[str]) -> list[str]:
    out = list(argv)
    for i in range(1, len(out)):
        out[i] = SMALLER.get(out[i - 1], {}).get(out[i], out[i])
    return out


def small_corpus(path: Path) -> None:
    plays = gzip.decompress((REPO / CORPUS).read_bytes()).decode().split("\n\n\n")
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress("\n\n\n".join(p[:4000] for p in plays[:20]).encode()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str], cwd: Path) -> None:
    port = free_port()
    argv = [a if prev != "--port" else str(port) for prev, a in zip([""] + argv, argv)]
    # the installed command: `python -m gpt2lab` would import the tour's gpt2lab/assets folder as the package
    command = str(Path(sys.executable).with_name("gpt2lab"))
    proc = subprocess.Popen([command, *argv[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    assert json.load(r)["data"][0]["id"]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        req = urllib.request.Request(f"{url}/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "Hail!"}],
                                                      "max_tokens": 8}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.load(r)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        with urllib.request.urlopen(url, timeout=10) as r:  # the chat page
            assert "<html" in r.read().decode().lower()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, proc.stdout.read()


def test_the_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    lines = tour_lines()
    assert len(lines) >= 12 and all(line.startswith("gpt2lab ") for line in lines), lines
    small_corpus(tmp_path / CORPUS)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = shrink(shlex.split(line, comments=True))
        if argv[1] == "serve":
            serve(argv, tmp_path)
            continue
        if argv[1] == "chat":
            monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Hail, good friend!\n/quit\n"))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main(argv[1:])
        out = capsys.readouterr()
        assert e.value.code in (0, None), f"{line}\n{out.err}"
        if argv[1:3] == ["tokenizer", "encode"]:
            assert "[15496, 995]" in out.out
    # what the tour made is what it says it makes
    assert json.loads((tmp_path / "runs/plays/config.json").read_text())["resolved"]["max_steps"] == 8
    for png in ("runs/plays/curves.png", "runs/abl/curves.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert {p.name for p in (tmp_path / "runs/abl").iterdir()} >= {"demo", "gelu", "adamw"}
