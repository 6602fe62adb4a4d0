"""The load shapes of bench/serve.py: what the clients do, and what is measured of it.

    concurrency  N clients at once, each one short prompt (streamed completion, greedy)
    mixed        8 clients streaming short prompts, while 4 clients with long prompts (--long-tokens) join
                 one after another: the running streams' inter-token latency, against the same 8 alone
    chat         8 conversations of --turns turns each: every turn sends the whole conversation so far
                 (a system prompt, the earlier questions and answers) and a new question
    poisson      requests arriving at random (Poisson) at rising rates; the goodput is the highest rate
                 whose p95 time to first token stays under 2 s
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

SYSTEM = ("You are a careful assistant who answers questions about the plays of William Shakespeare, "
          "quoting the text where it helps, and saying so when you do not know. ") * 3


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def stream_completion(client, model: str, prompt: str, new_tokens: int) -> dict:
    """One streamed /v1/completions request: its times (start, first text, each text, end) and text."""
    start = time.perf_counter()
    times, text, tokens = [], [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        for c in chunk.choices or []:
            if c.text:
                times.append(time.perf_counter())
                text.append(c.text)
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "ttft": (times[0] if times else end) - start, "end": end, "tokens": tokens or 0,
            "text": "".join(text), "gaps": [b - a for a, b in zip(times, times[1:])]}


async def stream_chat(client, model: str, messages: list[dict], new_tokens: int) -> dict:
    start = time.perf_counter()
    times, text, tokens = [], [], None
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        for c in chunk.choices or []:
            if c.delta.content:
                times.append(time.perf_counter())
                text.append(c.delta.content)
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "ttft": (times[0] if times else end) - start, "end": end, "tokens": tokens or 0,
            "text": "".join(text), "gaps": [b - a for a, b in zip(times, times[1:])]}


def summarize(results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"ttft_p50": percentile([r["ttft"] for r in results], 0.5),
            "ttft_p95": percentile([r["ttft"] for r in results], 0.95),
            "itl_p95": percentile(gaps, 0.95),
            "per_client": statistics.mean(r["tokens"] / (r["end"] - r["start"]) for r in results),
            "total": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "wall": wall, "requests": len(results)}


def _client(base_url: str):
    import openai

    # (the client's default connection pool holds far more than 64 connections)
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)


async def concurrency(base_url: str, model: str, texts: list[str], new_tokens: int) -> list[dict]:
    async with _client(base_url) as client:
        return await asyncio.gather(*(stream_completion(client, model, t, new_tokens) for t in texts))


async def mixed(base_url: str, model: str, short: list[str], long: list[str], new_tokens: int) -> dict:
    """The short streams' latencies alone, then with the long prompts joining them one by one."""
    async with _client(base_url) as client:
        alone = await asyncio.gather(*(stream_completion(client, model, t, new_tokens * 4) for t in short))

        async def late(k: int, text: str):
            await asyncio.sleep(0.3 + 0.5 * k)
            return await stream_completion(client, model, text, new_tokens)

        runs = [stream_completion(client, model, t, new_tokens * 4) for t in short]
        both = await asyncio.gather(*runs, *(late(k, t) for k, t in enumerate(long)))
    return {"alone": summarize(alone), "with_long": summarize(list(both[:len(short)])),
            "long": summarize(list(both[len(short):]))}


async def chat(base_url: str, model: str, questions: list[str], conversations: int, turns: int,
               new_tokens: int) -> dict:
    """`conversations` chats at once, `turns` questions each; every request sends the whole chat so far."""
    async with _client(base_url) as client:
        async def one(c: int) -> list[dict]:
            messages, out = [{"role": "system", "content": SYSTEM}], []
            for t in range(turns):
                messages.append({"role": "user", "content": questions[(c * turns + t) % len(questions)]})
                r = await stream_chat(client, model, messages, new_tokens)
                messages.append({"role": "assistant", "content": r["text"]})
                out.append(r)
            return out

        results = await asyncio.gather(*(one(c) for c in range(conversations)))
    flat = [r for conv in results for r in conv]
    later = [conv[t] for conv in results for t in range(1, turns)]
    return {**summarize(flat), "later_ttft_p50": percentile([r["ttft"] for r in later], 0.5)}


async def poisson(base_url: str, model: str, texts: list[str], new_tokens: int, rate: float, seconds: float,
                  seed: int = 0) -> dict:
    """Requests arriving at `rate` per second on average for `seconds`; every one is waited for."""
    rng = random.Random(seed)
    async with _client(base_url) as client:
        tasks, t, k = [], 0.0, 0
        start = time.perf_counter()
        while True:
            t += rng.expovariate(rate)
            if t > seconds:
                break
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(stream_completion(client, model, texts[k % len(texts)], new_tokens)))
            k += 1
        results = await asyncio.gather(*tasks)
    return {**summarize(results), "rate": rate}
