"""The chat format: how a conversation becomes the tokens an instruction-tuned model reads.

One function turns messages into a prompt, for every user of it: SFT (what is
trained), `gpt2lab chat`, the judge and instruction scoring (what is asked).

    messages = [{"role": "user", "content": "Spell it backwards.", "input": "garden"},
                {"role": "assistant", "content": "nedrag"}, {"role": "user", "content": ...}]
    ids, trained = encode_messages(tokenizer, messages, "alpaca", add_generation_prompt=True)
    text = render_messages(messages, "alpaca", add_generation_prompt=True)   # the same, as text

Formats (a run dir made by SFT stores its name in config.json as "template"):

- "alpaca": the Stanford Alpaca prompt ("Below is an instruction ... ### Instruction: ...
  ### Response:"); a user message may carry an "input" (Alpaca's optional context). Later turns
  repeat the "### Instruction:" / "### Response:" blocks.
- "chat": "### System:", "### User:", "### Assistant:" turns.

GPT-2's vocabulary has a single special token, so turn markers are ordinary text; every
assistant answer ends with <|endoftext|>, which SFT trains, so a model learns to stop. An answer
also stops at the format's stop text ("\\n### ", the start of a next turn) in case it runs on.
A base model (no format) gets no markup: the conversation is its running text (`gpt2lab chat`), or,
through the server's chat API, a plain transcript ("User: ...\nAssistant:") that it continues.

Thinking. An answer may begin with a thinking section, `<think>worked steps</think>`, then the
answer itself (plain text markers: GPT-2's vocabulary has no spare special tokens, and text works
with any tokenizer). SFT trains it like the rest of the answer; rewards, `chat --think hide` and the
server's `reasoning_content` read it apart with gpt2lab.text's `ThinkSplitter`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2lab.errors import UserError

EOT_TEXT = "<|endoftext|>"  # how render_messages shows the end-of-answer token
ROLES = ("system", "user", "assistant")

_ALPACA_HEAD = ("Below is an instruction that describes a task{extra}. "
                "Write a response that appropriately completes the request.\n\n")
_WITH_INPUT = ", paired with an input that provides further context"


@dataclass(frozen=True)
class Segment:
    text: str
    answer: bool = False  # an assistant answer: trained by SFT and followed by <|endoftext|>


@dataclass(frozen=True)
class ChatFormat:
    name: str
    stop: tuple[str, ...]  # text that ends an answer besides <|endoftext|>

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        msgs = check_messages(messages)
        out: list[Segment] = []
        if self.name == "plain":  # a base model: the messages are its running text
            return [Segment(m["content"], answer=m["role"] == "assistant") for m in msgs]
        if self.name == "transcript":  # a base model asked through a chat API: a transcript to continue
            out = [Segment(f"{m['role'].capitalize()}: {m['content']}\n") for m in msgs]
            if add_generation_prompt:
                out.append(Segment("Assistant:"))
            return out
        system = " ".join(m["content"] for m in msgs if m["role"] == "system")
        turns = [m for m in msgs if m["role"] != "system"]
        if self.name == "alpaca":
            for i, m in enumerate(turns):
                if m["role"] == "user":
                    head = ""
                    if not any(t["role"] == "user" for t in turns[:i]):
                        head = (system + "\n\n") if system else _ALPACA_HEAD.format(
                            extra=_WITH_INPUT if m.get("input") else "")
                    elif out:
                        head = "\n\n"
                    body = f"### Instruction:\n{m['content']}\n\n"
                    if m.get("input"):
                        body += f"### Input:\n{m['input']}\n\n"
                    out.append(Segment(head + body + "### Response:\n"))
                else:
                    out.append(Segment(m["content"], answer=True))
        else:  # chat
            if system:
                out.append(Segment(f"### System:\n{system}\n\n"))
            for m in turns:
                if m["role"] == "user":
                    text = m["content"] if not m.get("input") else f"{m['content']}\n\n{m['input']}"
                    sep = "\n\n" if out and out[-1].answer else ""
                    out.append(Segment(f"{sep}### User:\n{text}\n\n"))
                else:
                    sep = "\n\n" if out and out[-1].answer else ""
                    out.append(Segment(f"{sep}### Assistant:\n"))
                    out.append(Segment(m["content"], answer=True))
        if add_generation_prompt:
            if turns and turns[-1]["role"] == "assistant":
                raise UserError("the conversation already ends with an answer; add a user message "
                                "before asking for another")
            if self.name == "chat":
                out.append(Segment(("\n\n" if out and out[-1].answer else "") + "### Assistant:\n"))
        return out


FORMATS = {f.name: f for f in (ChatFormat("alpaca", ("\n### ",)), ChatFormat("chat", ("\n### ",)))}
PLAIN = ChatFormat("plain", ())
TRANSCRIPT = ChatFormat("transcript", ("\nUser:",))  # the server's rendering of a chat for a base model


def get_format(name: str | None) -> ChatFormat:
    """The chat format named in a run dir's config ("template"); a base model (None) gets "plain"."""
    if name is None:
        return PLAIN
    if not isinstance(name, str) or name not in FORMATS:
        raise UserError(f"unknown chat format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def check_messages(messages) -> list[dict]:
    """Messages are a non-empty list of {"role": system|user|assistant, "content": text}."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} ({str(m)[:80]}) needs a `role` ({', '.join(ROLES)}) and text "
                            "`content`")
        if "input" in m and m["input"] is not None and not isinstance(m["input"], str):
            raise UserError(f"message {i}: `input` must be text")
    return messages


def _format(fmt: str | ChatFormat | None) -> ChatFormat:
    return fmt if isinstance(fmt, ChatFormat) else get_format(fmt)


def render_messages(messages: list[dict], fmt: str | ChatFormat | None = "chat",
                    add_generation_prompt: bool = True) -> str:
    """The prompt as text; the end of each answer shows as <|endoftext|> (one special token)."""
    return "".join(s.text + (EOT_TEXT if s.answer and fmt not in (None, PLAIN) else "")
                   for s in _format(fmt).segments(messages, add_generation_prompt))


def encode_messages(tokenizer, messages: list[dict], fmt: str | ChatFormat | None = "chat",
                    add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """(ids, trained): every answer's tokens and the <|endoftext|> after it are marked trained.

    The text between two ends of answer is encoded in one piece, so the ids are those of the rendered
    prompt, as llama.cpp, Ollama or transformers' chat templates tokenize it (encoding each segment on its
    own would split runs of whitespace at turn boundaries differently). A token belongs to an answer when
    it ends inside one. User text never becomes a special token, even when it contains the characters
    "<|endoftext|>".
    """
    f = _format(fmt)
    ends = f is not PLAIN
    ids: list[int] = []
    trained: list[bool] = []
    chunk: list[Segment] = []

    def flush():
        text = "".join(s.text for s in chunk)
        piece = tokenizer.encode(text) if text else []
        answer_bytes, at = [], 0  # byte ranges of the answers in `text`
        for s in chunk:
            size = len(s.text.encode("utf-8"))
            if s.answer:
                answer_bytes.append((at, at + size))
            at += size
        ids.extend(piece)
        end = 0
        for i in piece if answer_bytes else ():
            end += len(tokenizer.decode_bytes([i]))
            trained.append(any(a < end <= b for a, b in answer_bytes))
        trained.extend([False] * (len(ids) - len(trained)))
        chunk.clear()

    for seg in f.segments(messages, add_generation_prompt):
        chunk.append(seg)
        if seg.answer and ends:
            if tokenizer.eot_id is None:
                raise UserError("the tokenizer has no <|endoftext|> token to end an answer with")
            flush()
            ids.append(tokenizer.eot_id)
            trained.append(True)
    flush()
    return ids, trained


@dataclass(frozen=True)
class Fitted:
    """A conversation fitted to the context: the prompt's ids, the messages they hold, how many of the oldest
    were left out, and how many tokens the answer may have."""

    ids: list[int]
    messages: list[dict]
    dropped: int
    max_new_tokens: int


def fit_conversation(tokenizer, messages: list[dict], fmt: str | ChatFormat | None, block_size: int,
                     max_new_tokens: int | None = None) -> Fitted:
    """Keep a conversation inside the context, as every chat of gpt2lab does (the terminal's, the server's, the
    page's): the system messages stay, the oldest turns go until the prompt leaves room for the answer
    (max_new_tokens, or half the context when that is more; all that is left when it is None), and the
    answer gets what is left. A last message that does not fit alone is a UserError."""
    msgs = check_messages(messages)
    system = [m for m in msgs if m["role"] == "system"]
    turns = [m for m in msgs if m["role"] != "system"]
    want = block_size // 2 if max_new_tokens is None else min(max_new_tokens, block_size // 2)
    dropped = 0
    while True:
        kept = system + turns
        ids, _ = encode_messages(tokenizer, kept, fmt, add_generation_prompt=True)
        if len(ids) + max(want, 1) <= block_size or len(turns) <= 1:
            break
        # the oldest exchange goes (a user message and the answer to it), or one message when it stands alone
        n = 2 if len(turns) > 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[n:], dropped + n
    room = block_size - len(ids)
    if room < 1:
        raise UserError(f"the last message makes a prompt of {len(ids)} tokens, and the model's context holds "
                        f"{block_size}; shorten it")
    limit = room if max_new_tokens is None else min(max_new_tokens, room)
    return Fitted(ids, kept, dropped, limit)


def record_messages(record: dict) -> list[dict]:
    """An Alpaca record {instruction, input, output} or a chat record {messages} as messages."""
    if "messages" in record:
        return record["messages"]
    user = {"role": "user", "content": record["instruction"]}
    if record.get("input"):
        user["input"] = record["input"]
    messages = [user]
    if "output" in record:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


# ------------------------------------------------------------------ the same formats for other tools
# render_messages as a Jinja chat template (transformers' tokenizer_config.json, GGUF's
# tokenizer.chat_template for llama.cpp) and as a Go template (an Ollama Modelfile's TEMPLATE). Tests render
# both against render_messages.

_JINJA_SYSTEM = (
    "{%- set ns = namespace(system='', n=0, users=0, answered=false) -%}"
    "{%- for m in messages if m.role == 'system' -%}"
    "{%- set ns.system = ns.system + (' ' if ns.n else '') + m.content -%}{%- set ns.n = ns.n + 1 -%}"
    "{%- endfor -%}")
_JINJA = {
    "chat": _JINJA_SYSTEM + (
        "{%- if ns.system %}{{ '### System:\\n' + ns.system + '\\n\\n' }}{% endif -%}"
        "{%- for m in messages if m.role != 'system' -%}"
        "{%- if ns.answered %}{{ '\\n\\n' }}{% endif -%}"
        "{%- if m.role == 'user' -%}"
        "{{ '### User:\\n' + m.content }}{% if m.input %}{{ '\\n\\n' + m.input }}{% endif %}{{ '\\n\\n' }}"
        "{%- set ns.answered = false -%}"
        "{%- else -%}{{ '### Assistant:\\n' + m.content + '<|endoftext|>' }}{%- set ns.answered = true -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{%- if ns.answered %}{{ '\\n\\n' }}{% endif -%}"
        "{{ '### Assistant:\\n' }}{%- endif -%}"),
    "alpaca": _JINJA_SYSTEM + (
        "{%- for m in messages if m.role != 'system' -%}"
        "{%- if m.role == 'user' -%}"
        "{%- if ns.users -%}{{ '\\n\\n' }}"
        "{%- elif ns.system -%}{{ ns.system + '\\n\\n' }}"
        "{%- else -%}{{ '" + _ALPACA_HEAD.replace("\n", "\\n").replace("{extra}", "' + ('"
        + _WITH_INPUT + "' if m.input else '') + '") + "' }}"
        "{%- endif -%}{%- set ns.users = ns.users + 1 -%}"
        "{{ '### Instruction:\\n' + m.content + '\\n\\n' }}"
        "{%- if m.input %}{{ '### Input:\\n' + m.input + '\\n\\n' }}{% endif -%}"
        "{{ '### Response:\\n' }}"
        "{%- else -%}{{ m.content + '<|endoftext|>' }}{%- endif -%}{%- endfor -%}"),
}

# Ollama gives a template .System (the system prompt) and .Messages (each with .Role and .Content);
# "input" has no place there, and a conversation opens with at most one system message
_GO = {
    "chat": (
        "{{- if .System }}### System:\n{{ .System }}\n\n{{ end }}"
        "{{- $answered := false }}"
        "{{- range .Messages }}{{- if ne .Role \"system\" }}"
        "{{- if $answered }}\n\n{{ end }}"
        "{{- if eq .Role \"user\" }}### User:\n{{ .Content }}\n\n{{ $answered = false }}"
        "{{- else }}### Assistant:\n{{ .Content }}<|endoftext|>{{ $answered = true }}{{ end }}"
        "{{- end }}{{- end }}"
        "{{- if $answered }}\n\n{{ end }}### Assistant:\n"),
    "alpaca": (
        "{{- $users := 0 }}"
        "{{- range .Messages }}{{- if eq .Role \"user\" }}"
        "{{- if $users }}\n\n{{ else if $.System }}{{ $.System }}\n\n{{ else }}"
        + _ALPACA_HEAD.format(extra="") + "{{ end }}{{- $users = 1 }}"
        "### Instruction:\n{{ .Content }}\n\n### Response:\n"
        "{{ else if eq .Role \"assistant\" }}{{ .Content }}<|endoftext|>{{ end }}{{- end }}"),
}


_JINJA["transcript"] = ("{%- for m in messages -%}{{ m.role | capitalize + ': ' + m.content + '\\n' }}{%- endfor -%}"
                        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}")


def jinja_template(fmt: str | None) -> str:
    """The chat template (Jinja, as transformers and llama.cpp read it) of a run's format; a base model's is
    the transcript gpt2lab serve gives it ("User: ...\\nAssistant:"), so that other servers chat with it alike."""
    return _JINJA[fmt or "transcript"]


def ollama_template(fmt: str | None) -> str:
    """The TEMPLATE of an Ollama Modelfile for a run's format; a base model continues the prompt."""
    return _GO[fmt] if fmt else "{{ .Prompt }}"
