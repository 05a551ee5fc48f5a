"""OpenAI-compatible HTTP server over Engine.

    moe-offload serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from moe_offload.server.app import create_app      # an ASGI app for one loaded Engine
    app = create_app(engine, ServerConfig())

Modules: `schemas` (request bodies, validated to one-line 400s), `scheduler` (the arrival-order
queue and the worker thread that steps generations), `choices` (a request's prompts x n, run in
turn), `shapes` (answers, chunks and logprobs in OpenAI's JSON), `anthropic` (the Messages API),
`metrics` (Prometheus text), `app` (routes, errors, streaming). This package file stays free of imports so that `moe-offload generate` does
not pay for FastAPI.
"""
