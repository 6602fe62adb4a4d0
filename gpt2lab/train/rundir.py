"""The run dir a training run writes: which settings it runs with, whether it starts or resumes, the lock
that keeps a second process out, and the config.json it records.

    resolve_settings   on --resume: the run's stored settings, with the given ones that may change
    claim              decide where the run starts (fresh, or from its newest checkpoint) and lock the dir
    write_config       config.json: the model, the tokenizer, the settings as given and as resolved
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2lab import checkpoint as ckpt
from gpt2lab import io
from gpt2lab.checkpoint import RunInfo
from gpt2lab.errors import UserError
from gpt2lab.metrics import console
from gpt2lab.train.checkpoints import list_checkpoints
from gpt2lab.train.config import LoopConfig, build, explicit_settings, merge_for_resume
from gpt2lab.train.distributed import DistInfo

PATH_SETTINGS = ("data", "init", "init_from", "val_data", "train", "val", "test", "prompts", "val_prompts")


def resolve_settings(cfg: LoopConfig, given: dict | None) -> LoopConfig:
    """The settings a run goes with: `cfg` itself, or on --resume of a run in cfg.out its stored settings
    with the `given` ones that may change (a given setting that may not is refused, naming it)."""
    out = Path(cfg.out) if cfg.out else None
    if not cfg.resume or out is None:
        return cfg
    if not (out / ckpt.CONFIG_FILE).is_file():
        why = "does not exist" if not out.exists() else f"has no {ckpt.CONFIG_FILE} (no run was started there)"
        raise UserError(f"--resume: {out} {why}, so there is no run to resume; check --out, or start a new run "
                        "there without --resume")
    stored = ckpt.open_run(out, "--out").config
    given = explicit_settings(cfg) if given is None else given
    train = dict(stored.get("train") or {})
    if train.get("total_batch_tokens") is None and isinstance(stored.get("resolved"), dict):
        # an implied batch (one micro-batch per process) stays the run's batch on any number of processes
        train["total_batch_tokens"] = stored["resolved"].get("total_batch_tokens")
    given = dict(given)
    for name in PATH_SETTINGS:
        # a path given another way (relative, absolute) is the same setting when it names the same file
        if isinstance(given.get(name), str) and isinstance(train.get(name), str) and given[name] != train[name] \
                and Path(given[name]).resolve() == Path(train[name]).resolve():
            given[name] = train[name]
    if not given.get("data") and isinstance(stored.get("data"), dict) and stored["data"].get("path") \
            and isinstance(train.get("data"), str) and train["data"]:
        train["data"] = stored["data"]["path"]  # the absolute path: resumable from any directory
    values = merge_for_resume(type(cfg), train, given)
    if "max_steps" in given:  # a new length replaces one derived from --epochs
        values["epochs"] = None
    if "data" in values and not values.get("data") and not given.get("data") \
            and isinstance(stored.get("data"), dict) and stored["data"].get("path"):
        values["data"] = stored["data"]["path"]  # (a classifier trained on --train files has no --data)
    return build(type(cfg), values)


@dataclass
class Claim:
    """Where a run starts: `resume_from` (its newest checkpoint) or None; the lock it holds (rank 0); and
    whether this process created the run dir (so that a set-up that fails can remove it again)."""

    out: Path
    resume_from: Path | None = None
    lock: io.RunLock | None = None
    created: bool = False

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self, dist: DistInfo) -> None:
        """A set-up that failed leaves nothing behind: the lock goes, and so does a run dir it created."""
        self.release()
        if self.created and dist.is_main and not (self.out / ckpt.CONFIG_FILE).exists():
            (self.out / ".lock").unlink(missing_ok=True)
            try:
                self.out.rmdir()
            except OSError:
                pass


def claim(cfg: LoopConfig, inputs: list[str], dist: DistInfo, claimed: Claim) -> None:
    """Decide where the run in cfg.out starts from and lock it (rank 0), filling in `claimed`. Raises a
    UserError for a run dir that must not be written: one holding a run without --resume, one that is or
    holds an input, another kind of directory."""
    out = claimed.out
    has_run = (out / ckpt.CONFIG_FILE).is_file()
    if has_run:
        checkpoints = list_checkpoints(out)
        finished = (out / ckpt.WEIGHTS_FILE).is_file()
        if not cfg.resume and (checkpoints or finished):
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        if cfg.resume and checkpoints:
            claimed.resume_from = checkpoints[-1]
        elif cfg.resume and finished:
            raise UserError(f"--resume: {out} holds a finished run without checkpoints to continue from; "
                            "start a new run with --init-from it")
        # else: a run stopped before its first checkpoint simply starts again from step 0
    elif cfg.resume:
        raise UserError(f"--resume: {out} holds no run to continue; start it without --resume")
    if not has_run:
        io.check_output_dir(out, "run", flag="--out", inputs=inputs)
    else:
        io.check_not_an_input(out, inputs, "--out")
    if dist.is_main:
        claimed.lock = io.RunLock(out)
        claimed.lock.acquire()
    if has_run and claimed.resume_from is None and dist.is_main:
        console(f"{out} has no checkpoint yet: starting it again from step 0")


# data identity entries that name where the data is, not what it is: a run may resume from a moved copy
WHERE = {"path", "source", "files", "prompts", "val_prompts", "reward"}


def check_same_data(run: RunInfo, now: dict | None) -> None:
    """A resumed run trains on the data it started with: every entry of its recorded data identity (content
    hashes, token and record counts, splits) must match the data given now; paths may differ."""
    stored = run.config.get("data")
    if not isinstance(stored, dict) or not isinstance(now, dict):
        return
    changed = [k for k in sorted(set(stored) & set(now)) if k not in WHERE and stored[k] != now[k]]
    if changed:
        what = ", ".join(f"{k} {str(stored[k])[:40]} -> {str(now[k])[:40]}" for k in changed)
        raise UserError(f"the data given is not the data the run in {run.path} was trained on ({what}); resume "
                        "with the run's own data, or start a new run with --init-from it")


def write_config(out: Path, cfg: LoopConfig, task, model_config, resolved: dict) -> None:
    """config.json of a run: the model, the tokenizer, the settings as given (`train`) and as resolved
    (batch geometry, steps, device), the task's data identity and its own entries."""
    train = asdict(cfg)
    train["resume"] = False
    ckpt.write_run_config(out, model_config, tokenizer_identity=task.tokenizer.identity(), kind=task.kind,
                          task=task.name, train=train, data=task.data_identity,
                          extra={"resolved": resolved, **task.run_config()})
