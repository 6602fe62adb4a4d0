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
    """(model, tokenizer, chat format) of the run dir, on the device, in the dtype and with the weights asked
    for; args.drafter is set for speculative decoding and args.compile resolved for the device."""
    from gpt2lab.checkpoint import open_run
    from gpt2lab.device import resolve_device
    from gpt2lab.generate import check_settings
    from gpt2lab.templates import get_format

    check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    info = open_run(args.run_dir)
    model, tok = info.load(device, kind="lm", dtype=args.dtype, quantize=args.quantize)
    args.drafter = _drafter(args, info, device)
    if args.compile is None:  # measured to help with CUDA graphs, not on the CPU (bench/generate.py)
        args.compile = device.type == "cuda" and args.quantize is None
    return model, tok, get_format(info.template)


def _drafter(args, info, device):
    """The speculative decoder's guesser: --speculative ngram, or --draft RUN (the same tokenizer)."""
    from gpt2lab.checkpoint import open_run
    from gpt2lab.errors import UserError
    from gpt2lab.generate.speculative import DraftModel, PromptLookup

    if args.draft is not None and args.speculative == "ngram":
        raise UserError("give --speculative ngram or --draft RUN, not both")
    if args.draft is not None:
        draft = open_run(args.draft, "--draft")
        if draft.tokenizer_sha256 != info.tokenizer_sha256:
            raise UserError(f"--draft {args.draft} has another tokenizer than {args.run_dir}; a draft model must "
                            "share the target's tokenizer")
        model, _ = draft.load(device, kind="lm", dtype=args.dtype, quantize=args.quantize)
        return DraftModel(model, k=args.draft_tokens or 4)
    if args.speculative == "ngram":
        return PromptLookup(k=args.draft_tokens or 8)
    return None


def _report_speculation(args) -> None:
    stats = args.drafter.stats if getattr(args, "drafter", None) is not None else None
    if stats is not None and stats.steps:
        sys.stderr.write(f"(speculative decoding: {stats.tokens_per_step:.2f} tokens per forward of the model, "
                         f"{100 * stats.acceptance:.0f}% of {stats.drafted} guesses kept)\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _answer(model, tok, prompt, args, seed, stop=()) -> str:
    from gpt2lab.generate import stream_answer
    from gpt2lab.text import ThinkSplitter

    # --think hide: nothing of a <think> ... </think> section at the start of the answer is shown
    hide = ThinkSplitter() if getattr(args, "think", "show") == "hide" else None
    out = []
    for piece in stream_answer(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, seed, stop=stop, use_cache=not args.no_cache,
                               drafter=getattr(args, "drafter", None), compile=bool(getattr(args, "compile", False))):
        out.append(piece)
        _write(hide.push(piece)[1] if hide is not None else piece)
    if hide is not None:
        _write(hide.flush()[1])
    return "".join(out)


def cmd_generate(args) -> int:
    from gpt2lab import io
    from gpt2lab.errors import UserError
    from gpt2lab.templates import PLAIN, encode_messages

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt with --prompt or --prompt-file, not both")
    prompt = io.read_text(args.prompt_file, "prompt file") if args.prompt_file else unescape(args.prompt or "")
    model, tok, fmt = _load(args)
    stop = [unescape(s) for s in args.stop or []]  # --stop "\n\n" means two line breaks, as in --prompt
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
    _report_speculation(args)
    return 0


class Conversation:
    """The turns of a chat, rendered in the run's chat format and kept inside the context by
    `templates.fit_conversation` (the oldest turns dropped), as the server and the chat page do."""

    def __init__(self, tokenizer, fmt, block_size: int, max_new_tokens: int):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.block, self.max_new_tokens = block_size, max_new_tokens
        self.messages: list[dict] = []

    def clear(self) -> None:
        self.messages = []

    def prompt(self, text: str) -> list[int]:
        """The prompt ids for the user's next message (earlier turns kept while they fit)."""
        from gpt2lab.errors import UserError
        from gpt2lab.templates import encode_messages, fit_conversation

        turns = self.messages + [{"role": "user", "content": text}]
        try:
            fitted = fit_conversation(self.tokenizer, turns, self.fmt, self.block, self.max_new_tokens)
        except UserError:  # one message longer than the context: its end is kept (generate crops the prompt)
            self.messages = []
            return encode_messages(self.tokenizer, turns[-1:], self.fmt, add_generation_prompt=True)[0]
        self.messages = fitted.messages[:-1]
        return fitted.ids

    def add(self, text: str, reply: str) -> None:
        from gpt2lab.templates import PLAIN
        from gpt2lab.text import split_thinking

        # a base model's running text: keep the line break the terminal showed after the reply; an earlier
        # answer's thinking is left out of the history (its answer is what the conversation goes on from)
        answer = reply + "\n" if self.fmt is PLAIN else split_thinking(reply)[1]
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def cmd_chat(args) -> int:
    from gpt2lab.errors import UserError
    from gpt2lab.templates import PLAIN

    if args.url is not None:
        if args.run_dir is not None:
            raise UserError("give a RUN_DIR or --url of a server, not both")
        local = [f for f, v in (("--quantize", args.quantize), ("--draft", args.draft),
                                ("--speculative", args.speculative), ("--compile", args.compile)) if v]
        if local:
            raise UserError(f"{', '.join(local)} apply to a RUN_DIR decoded here, not to a model behind --url")
        return _remote_chat(args)
    if args.model is not None or args.api_key is not None:
        raise UserError("--model and --api-key go with --url (a server); a RUN_DIR is used directly")
    if args.run_dir is None:
        raise UserError("chat needs a RUN_DIR, or --url of an OpenAI-compatible server (gpt2lab serve, vLLM, ...)")
    model, tok, fmt = _load(args)
    conv = Conversation(tok, fmt, model.config.block_size, args.max_new_tokens)

    def answer(text: str) -> str:
        reply = _answer(model, tok, conv.prompt(text), args, args.seed, fmt.stop)
        _write("\n")
        conv.add(text, reply)
        return reply

    kind = (f"instruction model ({fmt.name} format): it answers, and remembers the conversation"
            if fmt is not PLAIN else "base model: it continues your text")
    return _session(args, f"gpt2lab chat with {args.run_dir}, a {kind}.", answer, conv.clear)


def _remote_chat(args) -> int:
    """Chat with a model behind an OpenAI-compatible server: the conversation is kept here and sent whole."""
    from gpt2lab.client import Client, ServerError
    from gpt2lab.errors import UserError
    from gpt2lab.text import THINK_CLOSE, THINK_OPEN

    hide = getattr(args, "think", "show") == "hide"
    client = Client(args.url, args.api_key)
    name = args.model
    if name is None:
        names = client.models()
        if not names:
            raise UserError(f"the server at {client.base} lists no models; pass --model NAME")
        name = names[0]
    history: list[dict] = []
    settings = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed}

    def answer(text: str) -> str:
        turns = history + [{"role": "user", "content": text}]
        while True:
            try:
                pieces = client.stream_chat(name, turns, **settings)
                reply, thinking, finish = [], False, None
                for kind, piece in pieces:
                    if kind == "finish":
                        finish = piece
                        continue
                    # the server sends a thinking section apart (reasoning_content): shown as the model wrote
                    # it, <think>...</think> before the answer, as `chat RUN_DIR` shows it (--think hide: not)
                    if kind == "reasoning" and not hide:
                        if not thinking:
                            _write(THINK_OPEN)
                            thinking = True
                        _write(piece)
                    elif kind == "content":
                        if thinking:
                            _write(THINK_CLOSE)
                            thinking = False
                        _write(piece)
                        reply.append(piece)
                if thinking:
                    _write(THINK_CLOSE)
                break
            except ServerError as e:
                if e.code == "context_length_exceeded" and len(turns) > 2:
                    turns = turns[2:]  # drop the oldest exchange and ask again
                    continue
                raise
        _write("\n")
        if finish == "length":  # the server stopped it at the token limit: say so, the text is not whole
            sys.stderr.write(f"(the answer was cut at {args.max_new_tokens} tokens; raise --max-new-tokens for "
                             "longer ones)\n")
        # the answer goes on in the history, its thinking does not (as in `chat RUN_DIR`)
        history[:] = turns + [{"role": "assistant", "content": "".join(reply)}]
        return "".join(reply)

    return _session(args, f"gpt2lab chat with {name} at {client.base}.", answer, history.clear)


def _session(args, intro: str, answer, clear) -> int:
    from gpt2lab.errors import UserError

    if args.p is not None:
        answer(unescape(args.p))
        return 0

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(f"{intro} /clear forgets, /quit or Ctrl-D leaves.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return 0
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/clear":
            clear()
            print("(history cleared)")
            continue
        if not text.strip():
            continue
        try:
            answer(text)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            _write("\n(stopped)\n")
        except UserError as e:  # a failed turn (a server error, a cut stream) is one line; the session goes on
            _write("\n")
            sys.stderr.write(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}\n")
            sys.stderr.flush()


def _common(p, run_optional: bool = False) -> None:
    if run_optional:
        p.add_argument("run_dir", nargs="?", default=None, help="a run directory (trained, fine-tuned or imported); "
                       "or leave it out and give --url")
    else:
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
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights for every linear layer and the LM head: about 3x faster decoding on a CPU, "
                   "a little less accurate (README: fast local inference)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a compiled step (torch.compile; CUDA graphs on a GPU); default: on with "
                   "CUDA, off on the CPU, where it is not faster")
    p.add_argument("--speculative", choices=["ngram"], default=None,
                   help="speculative decoding with guesses looked up in the context (fast when the answer quotes "
                   "the prompt or repeats itself); the same text as without")
    p.add_argument("--draft", default=None, metavar="RUN",
                   help="speculative decoding with a smaller run (the same tokenizer) guessing ahead; the same "
                   "text as without")
    p.add_argument("--draft-tokens", type=positive_int, default=None, metavar="K",
                   help="with --speculative or --draft: tokens guessed per step (default 8 for ngram, 4 for a "
                   "draft model)")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate text from a run dir, streaming it to stdout. An instruction-tuned "
                       "run answers the prompt in its chat format (--raw: continue it as plain text).")
    _common(g)
    g.add_argument("--prompt", default=None, help="the text to continue; \\n and \\t are a newline and a tab "
                   "(default: start a new document)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--num-samples", type=positive_int, default=1, help="how many continuations (default 1)")
    g.add_argument("--stop", action="append",
                   help="stop at this text (repeatable; \\n and \\t are line breaks and tabs)")
    g.add_argument("--raw", action="store_true", help="ignore the run's chat format")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model in the terminal",
                       description="Interactive session with a run dir, or with a model behind an OpenAI-compatible "
                       "server (--url: gpt2lab serve, vLLM, ...): /clear forgets the history, /quit or Ctrl-D "
                       "leaves, Ctrl-C stops an answer. A base model continues your text; an instruction-tuned "
                       "one answers and keeps the conversation (the oldest turns go when the context fills).")
    _common(c, run_optional=True)
    c.add_argument("--url", default=None, help="talk to a model behind this OpenAI-compatible server instead "
                   "(gpt2lab serve, vLLM, llama.cpp, Ollama, ...), e.g. http://127.0.0.1:8000")
    c.add_argument("--model", default=None, metavar="NAME", help="with --url: the model to ask (default: the "
                   "first the server lists)")
    c.add_argument("--api-key", default=None, metavar="KEY", help="with --url: the server's API key")
    c.add_argument("-p", default=None, metavar="TEXT", help="answer this once and exit; \\n and \\t are a "
                   "newline and a tab")
    c.add_argument("--think", choices=["show", "hide"], default="show",
                   help="a model trained with a thinking stage: show its <think> section, or only the answer "
                   "(default show)")
    c.set_defaults(func=cmd_chat)
