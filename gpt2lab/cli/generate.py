"""`gpt2lab generate` and `gpt2lab chat`."""

from __future__ import annotations

import argparse
import sys

from gpt2lab.cli import finite_float, nonneg_int, positive_int, unescape


def _temperature(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 is greedy)")
    return value


def _top_p(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def _load(args):
    """(model, tokenizer, chat format) of the run dir, on the device and in the dtype asked for."""
    import torch

    from gpt2lab.checkpoint import load_run, open_run
    from gpt2lab.distributed import resolve_device
    from gpt2lab.generate import check_settings
    from gpt2lab.templates import get_format

    check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    model, tok = load_run(args.run_dir, device=device, kind="lm")
    if args.dtype == "bf16":  # fast on GPUs, and on CPUs with AVX512-BF16 or AMX
        model = model.to(torch.bfloat16)
    return model, tok, get_format(open_run(args.run_dir).template)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _answer(model, tok, prompt, args, seed, stop=()) -> str:
    from gpt2lab.generate import stream_answer

    out = []
    for piece in stream_answer(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, seed, stop=stop, use_cache=not args.no_cache):
        _write(piece)
        out.append(piece)
    return "".join(out)


def cmd_generate(args) -> int:
    from gpt2lab import io
    from gpt2lab.errors import UserError
    from gpt2lab.templates import PLAIN, encode_messages

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt with --prompt or --prompt-file, not both")
    prompt = io.read_text(args.prompt_file, "prompt file") if args.prompt_file else unescape(args.prompt or "")
    model, tok, fmt = _load(args)
    stop = list(args.stop or [])
    chat = fmt is not PLAIN and not args.raw
    if chat:  # an instruction-tuned model: the prompt is the user's message
        ids, _ = encode_messages(tok, [{"role": "user", "content": prompt}], fmt, add_generation_prompt=True)
        stop += list(fmt.stop)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            _write(f"--- sample {i + 1} ---\n")
        if not chat:
            _write(prompt)
        seed = None if args.seed is None else args.seed + i
        _answer(model, tok, ids if chat else prompt, args, seed, stop)
        _write("\n")
    return 0


class Conversation:
    """The turns of a chat, rendered in the run's chat format; the oldest turns are dropped when the prompt
    and the answer would not fit in the context."""

    def __init__(self, tokenizer, fmt, block_size: int, max_new_tokens: int):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.room = max(1, block_size - min(max_new_tokens, block_size // 2))
        self.messages: list[dict] = []

    def clear(self) -> None:
        self.messages = []

    def prompt(self, text: str) -> list[int]:
        """The prompt ids for the user's next message (earlier turns kept while they fit)."""
        from gpt2lab.templates import encode_messages

        turns = self.messages + [{"role": "user", "content": text}]
        while True:
            ids, _ = encode_messages(self.tokenizer, turns, self.fmt, add_generation_prompt=True)
            if len(ids) <= self.room or len(turns) == 1:
                return ids  # a single message longer than the context keeps its end (generate does that)
            turns = turns[2:]  # drop the oldest exchange
            self.messages = turns[:-1]

    def add(self, text: str, reply: str) -> None:
        from gpt2lab.templates import PLAIN

        # a base model's running text: keep the line break the terminal showed after the reply
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": reply + ("\n" if self.fmt is PLAIN else "")}]


def cmd_chat(args) -> int:
    from gpt2lab.templates import PLAIN

    model, tok, fmt = _load(args)
    conv = Conversation(tok, fmt, model.config.block_size, args.max_new_tokens)

    def answer(text: str) -> str:
        reply = _answer(model, tok, conv.prompt(text), args, args.seed, fmt.stop)
        _write("\n")
        conv.add(text, reply)
        return reply

    if args.p is not None:
        answer(unescape(args.p))
        return 0

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    kind = (f"instruction model ({fmt.name} format): it answers, and remembers the conversation"
            if fmt is not PLAIN else "base model: it continues your text")
    print(f"gpt2lab chat with {args.run_dir}, a {kind}. /clear forgets, /quit or Ctrl-D leaves.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return 0
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/clear":
            conv.clear()
            print("(history cleared)")
            continue
        if not text.strip():
            continue
        try:
            answer(text)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            _write("\n(stopped)\n")


def _common(p) -> None:
    p.add_argument("run_dir", help="a run directory (trained, fine-tuned or imported)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=_top_p, default=None,
                   help="sample from the smallest set of tokens holding p of the probability (default 1: all)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="seed for reproducible sampling (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16: half the memory traffic, fast on GPUs and on CPUs with AVX512-BF16 or "
                   "AMX (default fp32)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate text from a run dir, streaming it to stdout. An instruction-tuned "
                       "run answers the prompt in its chat format (--raw: continue it as plain text).")
    _common(g)
    g.add_argument("--prompt", default=None, help="the text to continue; \\n and \\t are a newline and a tab "
                   "(default: start a new document)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--num-samples", type=positive_int, default=1, help="how many continuations (default 1)")
    g.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    g.add_argument("--raw", action="store_true", help="ignore the run's chat format")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model in the terminal",
                       description="Interactive session: /clear forgets the history, /quit or Ctrl-D "
                       "leaves, Ctrl-C stops an answer. A base model continues your text; an instruction-tuned "
                       "one answers and keeps the conversation (the oldest turns go when the context fills).")
    _common(c)
    c.add_argument("-p", default=None, metavar="TEXT", help="answer this once and exit; \\n and \\t are a "
                   "newline and a tab")
    c.set_defaults(func=cmd_chat)
