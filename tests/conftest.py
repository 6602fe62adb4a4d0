from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """Tiny models gain nothing from more threads, and on a busy 2-core machine threads that wait for each
    other make every small op slow: every test module runs torch on one thread (modules that never import
    torch are left alone)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrain_argv(data, out, settings: dict) -> list[str]:
    """`gpt2lab pretrain` arguments: --data, --out and one flag per setting (True: --flag, False: --no-flag,
    None: left out)."""
    argv = ["pretrain", "--data", str(data), "--out", str(out)]
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The developers' shared data folder (../shared/data from the repo root); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


# ---------------------------------------------------------------- training tests (test_train,
# test_resume, test_ddp): a small corpus, a 512-token BPE and data directories made from them

TINY_CORPUS_CHARS = 200_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The run dirs test_serve.py and test_serve_load.py serve (test_serve.make_runs)."""
    from test_serve import make_runs

    return make_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The first ~200 KB of the bundled Shakespeare; documents are separated by blank lines."""
    import gzip

    src = Path(__file__).resolve().parents[1] / "gpt2lab" / "assets" / "shakespeare.txt.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        text = f.read(TINY_CORPUS_CHARS)
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _tiny_data_dir(tmp_path_factory, corpus: Path, vocab_size: int, name: str) -> Path:
    from gpt2lab.data.prepare import prepare
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    tok = train_bpe_from_texts([corpus.read_text(encoding="utf-8")], vocab_size, name=name)
    out = tmp_path_factory.mktemp(name) / "data"
    prepare([str(corpus)], out, tokenizer=tok, val_fraction=0.1, doc_separator="\n\n", workers=1,
            progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_corpus) -> Path:
    """~89k train / ~10k val tokens of a 512-token BPE: a training step of a 2-layer model takes ms."""
    return _tiny_data_dir(tmp_path_factory, tiny_corpus, 512, "tiny512")


@pytest.fixture(scope="session")
def tiny_data_other_tokenizer(tmp_path_factory, tiny_corpus) -> Path:
    """The same text prepared with another tokenizer (a 400-token BPE)."""
    return _tiny_data_dir(tmp_path_factory, tiny_corpus, 400, "tiny400")


# A process that imports torch (and torch._dynamo, which the first AdamW pulls in) once and then
# forks one child per rank of each job: a child runs `gpt2lab <argv>` as a real, separate process
# with its own exit status and output, without paying the ~8 s of imports again. Ranks get the
# environment torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR, ...). A job can be killed with
# SIGKILL once its run dir holds a checkpoint of at least `kill_at_step`, after `kill_delay` s.
_FORK_LAUNCHER = r"""
import json, os, re, signal, socket, sys, time, traceback
import torch
import gpt2lab.checkpoint, gpt2lab.cli, gpt2lab.data.loader, gpt2lab.generate, gpt2lab.train.pretrain  # noqa: F401

spec = json.load(open(sys.argv[1]))
if spec["preload_dynamo"]:
    import torch._dynamo  # noqa: F401

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def newest_checkpoint(run_dir):
    try:
        names = os.listdir(os.path.join(run_dir, "checkpoints"))
    except OSError:
        return -1
    return max([int(m.group(1)) for n in names if (m := re.match(r"^step_(\d+)$", n))], default=-1)

def child(job, rank, world, port, logs):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, ext in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{logs}.rank{rank}.{ext}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    code = 1
    try:
        torch.set_num_threads(1)
        gpt2lab.cli.main(job["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

results = []
for i, job in enumerate(spec["jobs"]):
    world, logs = job.get("nproc", 1), os.path.join(spec["logs"], f"job{i}")
    port = free_port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            child(job, rank, world, port, logs)
        pids.append(pid)
    status, killed, start = {}, False, time.time()
    while len(status) < world:
        for pid in pids:
            if pid not in status:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = os.waitstatus_to_exitcode(st)
        kill = job.get("kill_at_step") is not None and not killed and not status and \
            newest_checkpoint(job["run_dir"]) >= job["kill_at_step"]
        failed = any(code != 0 for code in status.values())  # one rank died: stop the others
        if kill:
            time.sleep(job.get("kill_delay", 0.0))
            killed = True
        if kill or failed or time.time() - start > spec["timeout"]:
            for pid in pids:
                if pid not in status:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    out = []
    for rank in range(world):
        out.append({k: open(f"{logs}.rank{rank}.{k}", encoding="utf-8", errors="replace").read()
                    for k in ("out", "err")})
    newest = newest_checkpoint(job["run_dir"]) if job.get("run_dir") else None
    results.append({"rc": [status[p] for p in pids], "killed": killed, "newest_checkpoint": newest,
                    "ranks": out})
json.dump(results, open(os.path.join(spec["logs"], "results.json"), "w"))
"""


@pytest.fixture(scope="session")
def gpt2lab_procs(tmp_path_factory):
    """run(jobs) -> per job {"rc": [exit status per rank], "killed", "newest_checkpoint", "ranks"}.

    A job is {"argv": [gpt2lab arguments], "nproc": 1, "kill_at_step": None, "kill_delay": 0.0,
    "run_dir": ...}; "ranks" holds each rank's {"out", "err"} text; a negative rc is the signal
    that ended the process (-9 after a kill).
    """
    import json
    import os
    import subprocess
    import sys

    def run(jobs: list[dict], timeout: float = 240.0, train: bool = True) -> list[dict]:
        """train=False: the jobs stop before building an optimizer, so skip preloading torch._dynamo."""
        logs = tmp_path_factory.mktemp("procs")
        spec = logs / "spec.json"
        spec.write_text(json.dumps({"jobs": jobs, "logs": str(logs), "timeout": timeout,
                                    "preload_dynamo": train}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("GPT2LAB_DEBUG", None)  # it turns one-line errors into tracebacks
        r = subprocess.run([sys.executable, "-c", _FORK_LAUNCHER, str(spec)], env=env, capture_output=True,
                           text=True, timeout=timeout * len(jobs) + 60)
        assert r.returncode == 0, f"launcher failed:\n{r.stdout}\n{r.stderr}"
        return json.loads((logs / "results.json").read_text())

    return run
