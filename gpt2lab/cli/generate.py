"""`gpt2lab generate` and `gpt2lab chat`."""

from __future__ import annotations

import sys

from gpt2lab.cli import nonneg_int, positive_int


def _number(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _temperature(text: str) -> float:
    import argparse

    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 is greedy)")
    return value


def _top_p(text: str) -> float:
    import argparse

    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def _load(args):
    import torch

    from gpt2lab.checkpoint import read_run_config
    from gpt2lab.distributed import resolve_device
    from gpt2lab.generate import check_settings
    from gpt2lab.templates import get_template

    check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    if args.dtype == "bf16" and device.type == "cpu":
        raise ValueError("--dtype bf16 is for GPUs; on the CPU use --dtype fp32")
    from gpt2lab import load

    model, tok = load(args.run_dir, device=device)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    template = get_template(read_run_config(args.run_dir).get("template"))
    return model, tok, template


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _continue(model, tok, prompt: str, args, seed, stop=()) -> str:
    from gpt2lab.generate import stream_text

    out = []
    for piece in stream_text(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, seed, stop=stop, use_cache=not args.no_cache):
        _write(piece)
        out.append(piece)
    return "".join(out)


def cmd_generate(args) -> int:
    from gpt2lab.sources import read_text

    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give the prompt with --prompt or --prompt-file, not both")
    prompt = read_text(args.prompt_file) if args.prompt_file else (args.prompt or "")
    model, tok, template = _load(args)
    stop = list(args.stop or [])
    if template is not None and not args.raw:
        prompt, stop = template.render(prompt), stop + list(template.stop)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            _write(f"--- sample {i + 1} ---\n")
        if template is None or args.raw:
            _write(prompt)
        seed = None if args.seed is None else args.seed + i
        _continue(model, tok, prompt, args, seed, stop)
        _write("\n")
    return 0


def cmd_chat(args) -> int:
    model, tok, template = _load(args)
    seed = args.seed

    def answer(history: str, text: str) -> str:
        if template is not None:
            reply = _continue(model, tok, template.render(text), args, seed, template.stop)
        else:  # a base model continues the running text
            reply = _continue(model, tok, history + text, args, seed)
        _write("\n")
        return reply

    if args.p is not None:
        answer("", args.p)
        return 0

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    kind = (f"instruction model ({template.name} template)" if template
            else "base model: it continues your text")
    print(f"gpt2lab chat with {args.run_dir}, a {kind}. /clear forgets, /quit or Ctrl-D leaves.")
    history = ""
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return 0
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/clear":
            history = ""
            print("(history cleared)")
            continue
        if not text.strip():
            continue
        reply = answer(history, text)
        history = history + text + reply + "\n" if template is None else ""


def _common(p) -> None:
    p.add_argument("run_dir", help="a run directory (trained, fine-tuned or imported)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_top_p, default=None,
                   help="sample from the smallest set of tokens holding p of the probability")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 on a GPU")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate text from a run dir, streaming it to stdout.")
    _common(g)
    g.add_argument("--prompt", default=None, help="the text to continue (default: start a new document)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--num-samples", type=positive_int, default=1, help="how many continuations")
    g.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    g.add_argument("--raw", action="store_true", help="ignore the run's prompt template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model in the terminal",
                       description="Interactive session: /clear forgets the history, /quit or Ctrl-D "
                       "leaves. A base model continues your text; an instruction-tuned one answers.")
    _common(c)
    c.add_argument("-p", default=None, metavar="TEXT", help="answer this once and exit")
    c.set_defaults(func=cmd_chat)
