"""Text that a model writes, as it arrives: whole characters, cut at a stop, a thinking section apart.

Every place that turns generated ids into what a reader sees goes through these three, so that
`generate`, `chat`, the server, the judge, RL rewards and instruction scoring cut and split alike:

    StreamDecoder   ids -> text, holding back the bytes of a character that is not whole yet
    StopText        cut at the first stop string, holding back what could be the start of one
    ThinkSplitter   split a thinking section (<think> ... </think> at the start) from the answer

`cut_at_stop` and `split_thinking` do the same to a whole text.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # a thinking section, plain text, at the start of an answer


class StreamDecoder:
    """Turns ids into text as they arrive, UTF-8 safe.

    A character can span several byte-level tokens (most emoji and CJK do); its bytes are held back until
    it is whole, so a stream never shows a replacement character for half a character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _first_stop(text: str, stops: list[str]) -> int:
    return min((text.find(s) for s in stops if s in text), default=-1)


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """`text` up to the first of the stop strings (the stop itself not included)."""
    cut = _first_stop(text, [s for s in stops if s])
    return text[:cut] if cut >= 0 else text


class StopText:
    """Cuts a text that arrives in pieces at the first of some stop strings.

    `push(piece)` returns the text that is ready: text that could be the start of a stop string is held
    back until it is clear that it is not, and the stop string itself is never returned. Once a stop
    string has been seen `stopped` is True and everything after it is dropped. `flush(tail)` returns
    what was held back (plus `tail`) when the text ends without a stop.
    """

    def __init__(self, stop: Iterable[str] = ()):
        self.stops = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        held = self.held + piece
        cut = _first_stop(held, self.stops)
        if cut >= 0:
            self.held, self.stopped = "", True
            return held[:cut]
        # keep back the longest tail that is a prefix of some stop string
        keep = max((k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self, tail: str = "") -> str:
        if self.stopped:
            return ""
        out, self.held = self.held + tail, ""
        return out


class ThinkSplitter:
    """Splits an answer that arrives in pieces into (reasoning, content) pieces.

    A thinking section is the text between <think> and </think> at the start of the answer (white space
    before <think> allowed); it is the reasoning (its surrounding white space dropped), the rest is the
    content (white space right after </think> dropped). An answer that does not begin with <think> is all
    content; one whose </think> never comes is all reasoning. Text that could be the start of a tag, and
    white space that could end the reasoning, is held back until it is clear. `thinking` says whether a
    section began.
    """

    def __init__(self):
        self.state, self.buf, self.started, self.thinking = "start", "", False, False

    def _reasoning(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buf, self.thinking = "think", head[len(THINK_OPEN):], True
            elif THINK_OPEN.startswith(head):
                return "", ""  # empty, white space, or a prefix of <think>: not clear yet
            else:
                self.state = "answer"
        if self.state == "think":
            end = self.buf.find(THINK_CLOSE)
            if end < 0:
                keep = max((k for k in range(1, len(THINK_CLOSE)) if self.buf.endswith(THINK_CLOSE[:k])), default=0)
                ready = self.buf[:len(self.buf) - keep]
                out = ready.rstrip()  # trailing white space may be the end of the section
                self.buf = ready[len(out):] + self.buf[len(self.buf) - keep:]
                return self._reasoning(out), ""
            reasoning = self._reasoning(self.buf[:end].rstrip())
            self.state, self.buf = "after", self.buf[end + len(THINK_CLOSE):]
        if self.state == "after":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return reasoning, ""
            self.state = "answer"
        content, self.buf = self.buf, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is held back when the answer ends."""
        buf, self.buf = self.buf, ""
        if self.state == "think":
            return self._reasoning(buf.rstrip()), ""
        if self.state == "after":
            return "", ""
        return "", buf


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a whole answer that may begin with <think> ... </think>; thinking is None when
    there is no section, and an unfinished section is all thinking and no answer."""
    splitter = ThinkSplitter()
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.flush()
    return (r1 + r2 if splitter.thinking else None), c1 + c2


def with_thinking(thinking: str | None, answer: str) -> str:
    """An assistant answer with its thinking section first."""
    return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{answer}" if thinking else answer
