"""Prompt templates: how an instruction-tuned model expects its input laid out.

A run dir made by instruction fine-tuning stores the name of its template in
config.json (`"template": "alpaca"`); `gpt2lab chat` and `generate` read it
and put the user's text in the instruction slot. A base model has none and
simply continues the text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    with_input: str  # fields: {instruction}, {input}
    without_input: str  # fields: {instruction}
    stop: tuple[str, ...] = ()  # text that ends an answer besides <|endoftext|>

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


_ALPACA_HEAD = ("Below is an instruction that describes a task{extra}. "
                "Write a response that appropriately completes the request.\n\n")
ALPACA = Template(
    name="alpaca",
    with_input=_ALPACA_HEAD.format(extra=", paired with an input that provides further context")
    + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    without_input=_ALPACA_HEAD.format(extra="") + "### Instruction:\n{instruction}\n\n### Response:\n",
    stop=("\n### ",),
)



@dataclass(frozen=True)
class ChatTemplate:
    """Conversations as plain text turns: '### User:' ... '### Assistant:' ...

    GPT-2's vocabulary has one special token, so the turn markers are
    ordinary text; <|endoftext|> ends each assistant turn during training.
    """

    name: str = "chat"
    assistant_prefix: str = "### Assistant:\n"
    turn_end: str = "\n\n"
    stop: tuple[str, ...] = ("\n### ",)

    def render_turn(self, role: str, content: str) -> str:
        return f"### {role.capitalize()}:\n{content}{self.turn_end}"

    def render(self, instruction: str, input: str = "") -> str:
        text = instruction if not input else f"{instruction}\n\n{input}"
        return self.render_turn("user", text) + self.assistant_prefix


CHAT = ChatTemplate()
TEMPLATES = {t.name: t for t in (ALPACA, CHAT)}


def get_template(name: str | None) -> Template | ChatTemplate | None:
    if name is None:
        return None
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
