"""The Responses API (`POST /v1/responses`), stateless: what llama.cpp, Ollama and transformers serve
answer, and what coding agents such as Codex CLI speak.

A request's `input` (text, or a list of messages whose content is text or input_text/output_text parts)
with its `instructions` (a system message first) becomes the same chat prompt as /v1/chat/completions;
`max_output_tokens`, `temperature` and `top_p` set the sampling. The answer is a `response` object whose
`output` holds a reasoning item when the model wrote a thinking section (<think>...</think>), then the
assistant's message. Streamed, it is the API's typed server-sent events:

    response.created, response.in_progress
    [response.output_item.added (reasoning), response.reasoning_text.delta..., response.reasoning_text.done,
     response.output_item.done]
    response.output_item.added (message), response.content_part.added, response.output_text.delta...,
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut the answer)

Like chat completions, the whole answer is the stream folded (`fold_response`), so the two agree. Nothing
is stored: `previous_response_id` is refused (send the whole conversation), and so are tools.
"""

from __future__ import annotations

import json
import time
import uuid

from gpt2lab.serve.api import APIError, Params, bad_request, parse_params
from gpt2lab.serve.openai import Run, ServedModel
from gpt2lab.serve.scheduler import Finish, Text
from gpt2lab.text import ThinkSplitter

_TEXT_PARTS = ("input_text", "output_text", "text")


def parse_request(data: dict, max_n: int) -> tuple[list[dict], Params]:
    """(messages, sampling settings) of a Responses request; anything it cannot honour is a 400 naming it."""
    for name in ("previous_response_id", "conversation"):
        if data.get(name):
            raise bad_request(f"`{name}`: gpt2lab serve keeps no state; send the whole conversation in `input`",
                              name)
    if data.get("tools"):
        raise bad_request("tools are not supported by gpt2lab serve", "tools")
    fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else None
    if fmt not in (None, {"type": "text"}):
        raise bad_request("only the text format ({\"type\": \"text\"}) is supported", "text.format")
    if data.get("max_output_tokens") is not None and not (
            isinstance(data["max_output_tokens"], int) and not isinstance(data["max_output_tokens"], bool)
            and data["max_output_tokens"] >= 1):
        raise bad_request("`max_output_tokens` must be an integer >= 1", "max_output_tokens")
    chat_fields = {k: data[k] for k in ("temperature", "top_p", "top_k", "seed", "stop") if k in data}
    chat_fields.update(max_tokens=data.get("max_output_tokens"), stream=data.get("stream"))
    p = parse_params(chat_fields, chat=True, max_n=max_n)
    messages = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("`instructions` must be text", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(data.get("input"))
    return messages, p


def _input_messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("`input` must be text or a non-empty list of messages", "input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be a message object with `role` and `content`", where)
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # an earlier answer's thinking: the model does not read it back
        if kind != "message":
            raise bad_request(f"{where}: items of type {json.dumps(kind)[:40]} are not supported (messages only)",
                              where)
        role = {"developer": "system"}.get(item.get("role"), item.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role must be system, developer, user or assistant", f"{where}.role")
        content = item.get("content")
        if isinstance(content, list):
            if not all(isinstance(c, dict) and c.get("type") in _TEXT_PARTS and isinstance(c.get("text"), str)
                       for c in content):
                raise bad_request(f"{where}.content: only text parts (input_text, output_text) are supported",
                                  f"{where}.content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be text", f"{where}.content")
        out.append({"role": role, "content": content})
    if not out:
        raise bad_request("`input` holds no message", "input")
    return out


# ------------------------------------------------------------------------------------ the answer


class _Answer:
    """The response object as it grows, and the sequence numbers of its events."""

    def __init__(self, served: ServedModel, data: dict, p: Params):
        self.seq = 0
        self.response = {
            "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "model": served.name, "output": [], "error": None, "incomplete_details": None,
            "instructions": data.get("instructions"), "max_output_tokens": data.get("max_output_tokens"),
            "temperature": p.temperature, "top_p": p.top_p if p.top_p is not None else 1.0,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "store": False,
            "metadata": data.get("metadata") if isinstance(data.get("metadata"), dict) else {},
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": None}

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}


def _item(kind: str) -> dict:
    if kind == "reasoning":
        return {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [], "content": [],
                "status": "in_progress"}
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "content": [],
            "status": "in_progress"}


async def response_events(run: Run, data: dict):
    """The typed events of one answer (the request's one choice), ending with response.completed."""
    a = _Answer(run.served, data, run.p)
    yield a.event("response.created", response={**a.response})
    yield a.event("response.in_progress", response={**a.response})
    splitter, reason = ThinkSplitter(), None
    open_item, text = None, ""  # the output item being written, its text so far

    def start(kind: str):
        nonlocal open_item, text
        item, text = _item(kind), ""
        a.response["output"].append(item)
        open_item = item
        out = [a.event("response.output_item.added", output_index=len(a.response["output"]) - 1, item={**item})]
        if kind == "message":
            out.append(a.event("response.content_part.added", item_id=item["id"], output_index=len(a.response[
                "output"]) - 1, content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def finish(status: str):
        nonlocal open_item
        item, index = open_item, len(a.response["output"]) - 1
        open_item = None
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item.update(content=[part], status=status)
            return [a.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text),
                    a.event("response.output_item.done", output_index=index, item={**item})]
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item.update(content=[part], status=status)
        return [a.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text, logprobs=[]),
                a.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part),
                a.event("response.output_item.done", output_index=index, item={**item})]

    def write(kind: str, piece: str):
        nonlocal text
        out = []
        if open_item is not None and open_item["type"] != kind:
            out += finish("completed")
        if open_item is None:
            out += start(kind)
        text += piece
        index = len(a.response["output"]) - 1
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        out.append(a.event(name, item_id=open_item["id"], output_index=index, content_index=0, delta=piece,
                           **extra))
        return out

    reasoning = ""
    async for _, _, ev in run.events():
        if isinstance(ev, Text):
            thinking, content = splitter.push(ev.text)
        elif isinstance(ev, Finish):
            thinking, content = splitter.flush()
            reason = ev.reason
        else:
            continue
        reasoning += thinking
        for kind, piece in (("reasoning", thinking), ("message", content)):
            if piece:
                for e in write(kind, piece):
                    yield e
    if open_item is None or open_item["type"] != "message":  # an answer that was all thinking, or empty
        if open_item is not None:
            for e in finish("completed"):
                yield e
        for e in start("message"):
            yield e
    cut = reason == "length"
    for e in finish("incomplete" if cut else "completed"):
        yield e
    usage = run.usage()
    reasoning_tokens = len(run.served.tokenizer.encode(reasoning)) if reasoning else 0  # the thinking's share
    a.response.update(status="incomplete" if cut else "completed", usage={
        "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage["total_tokens"]})
    if cut:
        a.response["incomplete_details"] = {"reason": "max_output_tokens"}
    yield a.event("response.incomplete" if cut else "response.completed", response=a.response)


async def fold_response(run: Run, data: dict) -> dict:
    """The whole response object: the events folded (the last one carries it)."""
    last = None
    async for event in response_events(run, data):
        last = event
    return last["response"]


def error_event(e: APIError) -> dict:
    return {"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param}
