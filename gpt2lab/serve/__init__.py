"""Serving: an OpenAI-compatible HTTP API and a chat page, for many clients at once.

Serving points one way:

    app.py        the web app: routes, the event stream, the `gpt2lab serve` command
    guards.py     who may ask and what: the API key, trusted Host names, JSON bodies of bounded size and time
    openai.py     the answers' shapes: a request's jobs on the scheduler, their events as OpenAI chunks
    api.py        the requests' fields, checked, and OpenAI's errors
    scheduler.py  continuous batching: requests' rows join and leave one running batch between steps
    jobs.py       what the scheduler is handed and hands back: jobs, their events, a row's tokens and text

Needs the optional extra `gpt2lab[serve]` (FastAPI, uvicorn).
"""
