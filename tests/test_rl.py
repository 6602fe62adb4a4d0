"""Reinforcement learning: the checkable tasks, the group-relative loss, thinking, pass@k, and the command."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import cli
from gpt2lab.errors import UserError
from gpt2lab.evals.checkable import Arithmetic, Countdown, evaluate_expression, get_task, held_out, pass_at_k
from gpt2lab.text import split_thinking, with_thinking

TEXT = "What is 12 + 34? Using the numbers 3, 7, 2, make 23. <think>3*7=21 21+2=23</think>3*7+2 " * 40


# ----------------------------------------------------------------------------- tasks


def test_arithmetic_worked_steps_and_rewards():
    task = Arithmetic(difficulty=2)
    records = [r for _, r in zip(range(300), task.prompts(0))]
    for r in records:
        steps, answer = task.solution(r)  # the worked solution reaches the answer (checked inside)
        assert answer == r["answer"] and task.reward(r, with_thinking(steps, answer)) == 1.0
    r = {"prompt": "What is 85 + 46?", "a": 85, "b": 46, "op": "+", "answer": "131"}
    assert task.solution(r) == ("5+6=11 8+4+1=13", "131")
    assert task.reward(r, "131") == task.reward(r, "<think>junk 42</think>131.") == 1.0
    assert task.reward(r, "<think>131</think>130") == 0.0  # only the answer counts, not the thinking
    assert Arithmetic(format_reward=0.1).reward(r, "130") == 0.1 and Arithmetic(format_reward=0.1).reward(r, "x") == 0
    assert task.reward(r, "<think>131") == 0.0  # an unfinished thinking section has no answer


def test_countdown_rewards_only_expressions_with_the_given_numbers():
    task = Countdown(difficulty=2)
    r = {"prompt": "...", "numbers": [3, 7, 2], "target": 23}
    assert task.reward(r, "3*7+2") == 1.0 and task.reward(r, "<think>x</think> (7*3)+2") == 1.0
    assert task.reward(r, "3*7+2+0") == 0.0  # 0 is not a given number
    assert task.reward(r, "7*3+2*1") == 0.0
    assert task.reward(r, "7+7+7+2") == 0.0  # 7 given once
    assert task.reward(r, "3*7") == 0.0  # wrong value
    for bad in ("__import__('os')", "2**99", "7/7", "x+1", "1" * 90):
        assert evaluate_expression(bad) is None
    for r in [r for _, r in zip(range(200), task.prompts(1))]:
        steps, expr = task.solution(r)
        assert task.reward(r, expr) == 1.0, (r, expr)


def test_held_out_prompts_are_never_in_the_train_stream():
    for task in (get_task("arithmetic"), get_task("countdown", 2)):
        held = {r["prompt"] for r in task.heldout(100)}
        train = {r["prompt"] for _, r in zip(range(3000), task.prompts(0, "train"))}
        assert len(held) == 100 and not held & train
        assert all(held_out(p) for p in held) and not any(held_out(p) for p in train)
        assert [r["prompt"] for r in task.heldout(5)] == [r["prompt"] for r in task.heldout(5)]  # reproducible


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 1) == 0 and pass_at_k(8, 8, 1) == 1 and pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 2, 8) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))


def test_thinking_is_read_apart_from_the_answer():
    assert split_thinking("<think>a b</think> 42") == ("a b", "42")
    assert split_thinking("42") == (None, "42")
    assert split_thinking("  <think>unfinished") == ("unfinished", "")
    assert with_thinking("x", "y") == "<think>x</think>y" and with_thinking(None, "y") == "y"


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny model in the chat format, with a tokenizer trained on task-like text."""
    from gpt2lab.checkpoint import write_run_config
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT
    from gpt2lab.tokenizer.train import train_bpe_from_texts
    from gpt2lab.weights import save_weights

    tok = train_bpe_from_texts([TEXT], 300, name="rl")
    out = tmp_path_factory.mktemp("rl") / "sft"
    out.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32))
    write_run_config(out, model.config, tokenizer_identity=tok.identity(), extra={"template": "chat"})
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


def make_task(chat_run, tmp_path, **kw):
    from gpt2lab.finetune.config import RLConfig
    from gpt2lab.finetune.rl import RLTask
    from gpt2lab.train.distributed import DistInfo
    from gpt2lab.train.task import Context

    cfg = RLConfig(init=str(chat_run), task="arithmetic", out=str(tmp_path / "rl"), device="cpu", max_steps=2,
                   tensorboard=False, **kw)
    task = RLTask(cfg)
    task.load()
    model = task.build_model(task.model_config(None), resuming=False)
    task.setup(Context(cfg=cfg, model=model, model_config=model.config, device=torch.device("cpu"),
                       dtype=torch.float32, dist=DistInfo(), seq_len=cfg.max_new_tokens, grad_accum=1,
                       out=tmp_path / "rl", autocast=contextlib.nullcontext))
    return task, model


def kept(task, rollout):
    """Make the task reuse `rollout` (as a later update of --updates-per-batch does) and give its batch."""
    from gpt2lab.finetune.rl import PromptBatch

    task.rollouts = {0: rollout}
    return PromptBatch(None, seed=0, slot=0, fresh=False)


def test_the_loss_of_a_batch_equals_a_computation_by_hand(chat_run, tmp_path):
    task, model = make_task(chat_run, tmp_path, group_size=3, scale_advantages=False)
    prompt = task.prompt_ids({"prompt": "What is 1 + 2?"})
    samples = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batch = kept(task, {"prompts": [prompt], "samples": [samples], "rewards": [[1.0, 0.0, 0.5]], "old_logp": None})
    loss, metrics = task.loss(model, batch)
    # by hand: advantages r - mean(r) = (0.5, -0.5, 0); each sampled token's log-probability; ratio 1
    adv = [0.5, -0.5, 0.0]
    n = sum(len(s) for s in samples)  # every sampled token, normalised once over the batch
    assert loss.item() == pytest.approx(sum(-a * len(s) for a, s in zip(adv, samples)) / n, abs=1e-6)  # ratio 1
    assert metrics["reward"].item() == pytest.approx(0.5) and metrics["informative"].item() == 1.0
    assert metrics["response_length"].item() == pytest.approx(3.0)
    # the gradient is the policy gradient: d loss = -(1/n) sum_t A_t d log p(token_t)
    model.zero_grad()
    loss.backward()
    got = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    expected = 0.0
    for a, s in zip(adv, samples):
        logp = F.log_softmax(model(torch.tensor([prompt + s[:-1]])).float(), -1)[0]
        expected = expected - a * sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(s)) / n
    expected.backward()
    torch.testing.assert_close(got, model.transformer.wte.weight.grad, atol=1e-6, rtol=1e-5)


def test_advantages_are_mean_centred_and_optionally_scaled(chat_run, tmp_path):
    for scale in (False, True):
        task, model = make_task(chat_run, tmp_path / str(scale), group_size=4, scale_advantages=scale)
        prompt = task.prompt_ids({"prompt": "What is 1 + 2?"})
        samples = [[5, 6], [5, 6], [5, 6], [5, 6]]  # the same answer four times: only the advantages differ
        rewards = [1.0, 0.0, 0.0, 0.0]
        batch = kept(task, {"prompts": [prompt], "samples": [samples], "rewards": [rewards], "old_logp": None})
        loss, _ = task.loss(model, batch)
        adv = torch.tensor(rewards) - 0.25
        if scale:
            adv = adv / (torch.tensor(rewards).std() + 1e-6)
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)  # ratio 1, equal token counts


def test_an_all_equal_group_contributes_no_gradient(chat_run, tmp_path):
    task, model = make_task(chat_run, tmp_path, group_size=2)
    p1, p2 = task.prompt_ids({"prompt": "What is 1 + 2?"}), task.prompt_ids({"prompt": "What is 3 + 4?"})
    informative = {"prompts": [p1], "samples": [[[5, 6], [7]]], "rewards": [[1.0, 0.0]], "old_logp": None}
    both = {"prompts": [p1, p2], "samples": [[[5, 6], [7]], [[8], [9, 10]]], "rewards": [[1.0, 0.0], [1.0, 1.0]],
            "old_logp": None}
    grads = []
    for rollout in (informative, both):
        batch = kept(task, rollout)
        model.zero_grad()
        loss, metrics = task.loss(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=0)
    assert metrics["informative"].item() == 0.5
    # no informative group at all: a loss of zero with a graph (every process takes part), zero gradient
    batch = kept(task, {"prompts": [p2], "samples": [[[8], [9]]], "rewards": [[0.0, 0.0]], "old_logp": None})
    model.zero_grad()
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert loss.item() == 0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- the command


REWARD = '''
def score(prompt, completion, record):
    """The share of the letter of the record in the answer: a toy a tiny model learns fast."""
    return completion.count(record["letter"]) / max(1, len(completion))
'''


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


RL_ARGS = ["--max-steps", "30", "--batch-size", "2", "--group-size", "8", "--max-new-tokens", "8", "--lr", "1e-2",
           "--eval-every", "30", "--eval-prompts", "4", "--log-every", "1", "--checkpoint-every", "10",
           "--device", "cpu", "--no-tensorboard"]


def test_a_toy_reward_rises_and_resume_is_bitwise(chat_run, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {c}.", "letter": c}) + "\n"
                                                    for c in "aeiou"))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": f"Write {c}.", "letter": c}) + "\n"
                                                 for c in "aeiou"))
    (tmp_path / "reward.py").write_text(REWARD)
    task = ["--prompts", tmp_path / "prompts.jsonl", "--val-prompts", tmp_path / "held.jsonl", "--reward",
            f"{tmp_path / 'reward.py'}:score"]
    code, out, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl", *task, *RL_ARGS], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 30
    for key in ("reward", "pass_rate", "response_length", "informative", "kl", "entropy"):
        assert all(key in r and math.isfinite(r[key]) for r in steps)
    first, last = sum(r["reward"] for r in steps[:5]) / 5, sum(r["reward"] for r in steps[-5:]) / 5
    assert last > 3 * first and last > first + 0.04, (first, last)
    assert steps[-1]["kl"] > 0  # it moved away from the start
    # the same run stopped at step 20 and resumed: the same bits (the samples are a function of seed and step)
    code, _, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "half", *task,
                        *[a if a != "30" else "20" for a in RL_ARGS[:2]], *RL_ARGS[2:]], capsys)
    assert code == 0, err
    code, _, err = run(["finetune", "rl", "--out", tmp_path / "half", "--resume", "--max-steps", "30"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "rl" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reward,records,message", [
    ("missing.py:score", None, "does not exist"),
    ("{dir}/reward.py:nope", None, "has no function 'nope'"),
    ("{dir}/reward.py", None, "PATH.py:FUNCTION"),
    ("{dir}/raises.py:score", None, "raised ZeroDivisionError"),
    ("{dir}/nan.py:score", None, "returned nan"),
    ("{dir}/text.py:score", None, "returned 'good'"),
    ("{dir}/reward.py:score", "", "holds no prompts"),
    ("{dir}/reward.py:score", '{"text": "x"}\n', "no text \"prompt\""),
])
def test_bad_rewards_are_one_error_line_and_write_nothing(chat_run, tmp_path, capsys, reward, records, message):
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "raises.py").write_text("def score(p, c, r):\n    return 1 / 0\n")
    (tmp_path / "nan.py").write_text("def score(p, c, r):\n    return float('nan')\n")
    (tmp_path / "text.py").write_text("def score(p, c, r):\n    return 'good'\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(records if records is not None else json.dumps({"prompt": "Say a.", "letter": "a"}) + "\n")
    code, _, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl", "--prompts", prompts,
                        "--reward", reward.format(dir=tmp_path), *RL_ARGS], capsys)
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "rl").exists()


def test_eval_gives_pass_at_1_and_pass_at_k(chat_run, capsys, tmp_path):
    code, out, err = run(["eval", chat_run, "--task", "countdown", "--limit", "6", "--samples", "4", "--k", "4",
                          "--max-new-tokens", "8", "--quiet", "--output", tmp_path / "m.json"], capsys)
    assert code == 0, err
    (m,) = json.loads((tmp_path / "m.json").read_text())
    assert m["task"] == "countdown" and m["n"] == 6 and 0 <= m["pass_at_1"] <= m["pass_at_4"] <= 1
    assert "pass_at_4" in out
    code, _, err = run(["eval", chat_run, "--task", "countdown", "--k", "4"], capsys)
    assert code == 2 and "--samples" in err


def test_chat_can_hide_the_thinking(chat_run, monkeypatch, capsys):
    import gpt2lab.generate as gen

    pieces = ["<th", "ink>7*3", "=21</think>", "21"]
    monkeypatch.setattr(gen, "stream_answer", lambda *a, **k: iter(pieces))
    code, out, _ = run(["chat", chat_run, "-p", "x", "--think", "hide"], capsys)
    assert code == 0 and out == "21\n"
    code, out, _ = run(["chat", chat_run, "-p", "x"], capsys)
    assert code == 0 and out == "<think>7*3=21</think>21\n"


def test_rl_settings_are_checked():
    from gpt2lab.finetune.config import RLConfig

    with pytest.raises(UserError, match="one of the two"):
        RLConfig(init="x", out="o").validate()
    with pytest.raises(UserError, match="go together"):
        RLConfig(init="x", out="o", prompts="p.jsonl").validate()
    with pytest.raises(UserError, match="--difficulty"):
        get_task("countdown", 9)


def test_an_moe_model_is_balanced_under_rl_as_under_every_task(tmp_path, capsys):
    """The loop adds the experts' balance loss for every task: RL of a mixture of experts logs it, and it keeps
    the router from collapsing onto two experts, which it does without the loss (weight 0)."""
    from gpt2lab.checkpoint import write_run_config
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT
    from gpt2lab.tokenizer.train import train_bpe_from_texts
    from gpt2lab.weights import save_weights

    tok = train_bpe_from_texts([TEXT], 300, name="rl")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {c}.", "letter": c}) + "\n"
                                                    for c in "aeiou"))
    (tmp_path / "reward.py").write_text(REWARD)
    final = {}
    for weight in (0.0, 0.5):
        moe = tmp_path / f"moe-{weight}"
        moe.mkdir()
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32,
                              n_experts=4, experts_per_token=2, moe_aux_weight=weight))
        write_run_config(moe, model.config, tokenizer_identity=tok.identity(), extra={"template": "chat"})
        save_weights(model, moe / "model.safetensors")
        tok.save(moe)
        code, _, err = run(["finetune", "rl", "--init", moe, "--out", tmp_path / f"rl-{weight}", "--prompts",
                            tmp_path / "prompts.jsonl", "--reward", f"{tmp_path / 'reward.py'}:score",
                            *RL_ARGS, "--lr", "3e-2"], capsys)
        assert code == 0, err
        steps = [json.loads(line) for line in (tmp_path / f"rl-{weight}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "reward" in r]
        assert len(steps) == 30 and all(math.isfinite(r["moe_aux"]) and r["moe_max_load"] >= 1.0 for r in steps)
        assert steps[0]["moe_aux"] < 1.2  # balanced at the start (1.0: every expert its share)
        final[weight] = sum(r["moe_aux"] for r in steps[-5:]) / 5
    assert final[0.0] > 1.7 and final[0.5] < 1.2, final  # without the loss the router collapses; with it, not
