"""What the server has done, for operators: `/metrics` in Prometheus' text format, and one log line per
request.

    gpt2lab_requests_total{endpoint="/v1/chat/completions",status="200"} 12
    gpt2lab_prompt_tokens_total 3456              gpt2lab_completion_tokens_total 789
    gpt2lab_prefix_cache_tokens_total 1024        (prompt tokens whose keys and values were reused)
    gpt2lab_queue_length 0                        gpt2lab_batch_size 3   (rows decoding now)
    gpt2lab_time_to_first_token_seconds_bucket{le="0.5"} 10 ... (a histogram; _sum and _count)
    gpt2lab_inter_token_latency_seconds_bucket{le="0.05"} 700 ...
    gpt2lab_request_duration_seconds_bucket{le="1"} 9 ...

The log line (logger "gpt2lab.serve", on stderr) of each request, when it ends:

    request 3f2a9c01 POST /v1/chat/completions 200 in=42 out=17 ttft=0.081s total=0.412s

Everything here runs on the event loop (the scheduler's thread only updates its own counters), so no
lock is needed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

log = logging.getLogger("gpt2lab.serve")

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(edge)}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}",
                f"{name}_count {self.count}"]
        return out


def _num(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ("+Inf" if x > 0 else "-Inf")


class Metrics:
    """The server's counters and histograms (see the module's docstring)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.started = time.time()

    def request_done(self, request_id: str, method: str, endpoint: str, status: int, prompt_tokens: int,
                     completion_tokens: int, seconds: float, ttft: float | None) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.duration.observe(seconds)
        first = f" ttft={ttft:.3f}s" if ttft is not None else ""
        log.info(f"request {request_id} {method} {endpoint} {status} in={prompt_tokens} out={completion_tokens}"
                 f"{first} total={seconds:.3f}s")

    def render(self, stats: dict) -> str:
        """The Prometheus text exposition of everything, with the scheduler's `stats()`."""
        lines = ["# HELP gpt2lab_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE gpt2lab_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'gpt2lab_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        counters = {"prompt_tokens_total": ("Prompt tokens of finished requests.", self.prompt_tokens),
                    "completion_tokens_total": ("Tokens generated for finished requests.", self.completion_tokens),
                    "generated_tokens_total": ("Tokens sampled by the batch, all requests.", stats["tokens"]),
                    "prefill_tokens_total": ("Prompt tokens run through the model.", stats["prefill_tokens"]),
                    "prefix_cache_tokens_total": ("Prompt tokens whose keys and values came from the prefix "
                                                  "cache.", stats.get("prefix_tokens", 0)),
                    "decode_steps_total": ("Decoding steps of the batch.", stats["steps"]),
                    "cancelled_total": ("Requests cancelled (the client went away or stopped reading).",
                                        stats["cancelled"]),
                    "failed_total": ("Requests whose generation failed.", stats["failed"]),
                    "rejected_total": ("Requests refused because the queue was full (429).", stats["rejected"])}
        for name, (help, value) in counters.items():
            lines += [f"# HELP gpt2lab_{name} {help}", f"# TYPE gpt2lab_{name} counter", f"gpt2lab_{name} {value}"]
        gauges = {"queue_length": ("Requests waiting for a place in the batch.", stats["waiting"]),
                  "batch_size": ("Rows decoding now.", stats["active"]),
                  "prefilling": ("Requests whose prompt is being read.", stats["prefilling"]),
                  "max_batch": ("Rows the batch may hold.", stats["max_batch"]),
                  "max_queue": ("Requests that may wait.", stats["max_queue"]),
                  "start_time_seconds": ("When the server started (Unix time).", self.started)}
        for name, (help, value) in gauges.items():
            lines += [f"# HELP gpt2lab_{name} {help}", f"# TYPE gpt2lab_{name} gauge", f"gpt2lab_{name} {value}"]
        for name, hist, help in (("time_to_first_token_seconds", self.ttft, "From a request's arrival to its first "
                                  "token."),
                                 ("inter_token_latency_seconds", self.itl, "Between two tokens of a stream."),
                                 ("request_duration_seconds", self.duration, "From arrival to the last byte.")):
            lines += [f"# HELP gpt2lab_{name} {help}", f"# TYPE gpt2lab_{name} histogram",
                      *hist.lines(f"gpt2lab_{name}")]
        return "\n".join(lines) + "\n"


class RequestLog:
    """ASGI middleware: every API request, when its last byte is sent (a stream's too), counted and logged
    with the token counts and time to first token its handler left in `request.state.run`."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["arrived"] = start = time.monotonic()
        request_id, status, logged = uuid.uuid4().hex[:8], [500], [False]

        def done():
            if logged[0]:
                return
            logged[0] = True
            run = state.get("run")
            usage = run.usage() if run is not None else {"prompt_tokens": 0, "completion_tokens": 0}
            self.metrics.request_done(request_id, scope.get("method", ""), path, status[0], usage["prompt_tokens"],
                                      usage["completion_tokens"], time.monotonic() - start,
                                      run.first_token if run is not None else None)

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done()

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            done()
