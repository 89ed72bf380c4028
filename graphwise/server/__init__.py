"""The OpenAI-compatible HTTP server (`graphwise serve`).

- `protocol`: pydantic request/response models in OpenAI's shapes.
- `async_engine`: the thread that owns the `LLMEngine` and its asyncio bridge.
- `metrics`: the Prometheus registry behind `GET /metrics`.
- `app`: the FastAPI application (routes, errors, streaming).
- `cli`: `add_arguments` / `run` for the `serve` subcommand.
"""
