"""`taskfed serve RUN_DIR`: a trained run's adapters and router behind an OpenAI-compatible API.

    run.py      the run folder as served: its adapters, its router (routing.py), what a `model` name means
    batcher.py  one thread owns the base model and its adapter bank: routes and decodes every request,
                new ones joining the running decode loop between steps (continuous batching)
    api.py      FastAPI: /v1/completions, /v1/chat/completions (with SSE streaming), /v1/models, /health,
                /v1/reload, the page at /; API key, limits and OpenAI-shaped errors
"""
