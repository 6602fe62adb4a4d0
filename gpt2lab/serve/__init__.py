"""Serving: an OpenAI-compatible HTTP API and a chat page, for many clients at once.

Serving points one way:

    app.py        the web app: routes, auth, limits, the event stream; the `gpt2lab serve` command
    openai.py     the answers' shapes: a request's jobs on the scheduler, their events as OpenAI chunks
    api.py        the requests' fields, checked, and OpenAI's errors
    scheduler.py  continuous batching: requests' rows join and leave one running batch between steps

Needs the optional extra `gpt2lab[serve]` (FastAPI, uvicorn).
"""
