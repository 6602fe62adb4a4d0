"""Serving: an OpenAI-compatible HTTP API and a chat page, for many clients at once.

Serving points one way:

    command.py    the `gpt2lab serve` command: load, listen, run, stop gracefully on SIGTERM or Ctrl-C
    app.py        the web app: routes, the event streams
    guards.py     who may ask and what: the API key, trusted Host names, JSON bodies of bounded size and time
    metrics.py    /metrics (Prometheus) and the log line of each request
    openai.py     the answers' shapes: a request's jobs on the scheduler, their events as OpenAI chunks
    responses.py  the Responses API: its requests, and the answer as typed events
    api.py        the requests' fields, checked, and OpenAI's errors
    scheduler.py  continuous batching: requests' rows join and leave one running batch between steps; admission
    prefix.py     prefix caching: the keys and values of prompt beginnings, reused
    jobs.py       what the scheduler is handed and hands back: jobs, their events, a row's tokens and text

Needs the optional extra `gpt2lab[serve]` (FastAPI, uvicorn).
"""
