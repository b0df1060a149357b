"""`grc serve MODEL`: an OpenAI-compatible HTTP server over the engine (see docs/serving.md).

FastAPI on uvicorn: the ASGI stack vLLM's OpenAI server also uses, maintained, with server-sent
events and request validation built in. The model is loaded and both generation programs are
compiled before the port opens, so the first request does not pay for compilation.
"""

from __future__ import annotations

import argparse
import dataclasses

from grc_jax.core.errors import UsageError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory (runs/<name>), import or adapter directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` clients name (default: the model directory's name)",
    )
    p.add_argument("--index", default=None, help="a `grc index` directory for POST /v1/rag")
    g = p.add_argument_group("engine", "fixed shapes: each compiles once")
    g.add_argument("--max-batch", type=int, default=16, help="decode slots (16)")
    g.add_argument(
        "--max-seq-len", type=int, default=1024, help="prompt + generated tokens per request (1024)"
    )
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page (16)")
    g.add_argument(
        "--n-pages",
        type=int,
        default=0,
        help="KV pages (default: enough for every slot at --max-seq-len)",
    )
    g.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per step (64)")
    g.add_argument("--max-memories", type=int, default=8, help="memories one request reads (8)")
    g.add_argument("--memory-slots", type=int, default=256, help="memories held at once (256)")
    g.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait; beyond it: 503 with Retry-After (256)",
    )
    g.add_argument(
        "--policy",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous batching, or whole batches in turn (for comparison)",
    )
    g.add_argument(
        "--attention-impl",
        default="auto",
        choices=["auto", "reference", "tpu", "gpu"],
        help="hybrid paged attention for decoding (auto: the backend's kernel)",
    )
    g.add_argument(
        "--poison-freed-pages",
        action="store_true",
        help="debugging: fill every freed KV page with NaN (outputs must not change)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from grc_jax.serve.launch import ServeOptions, build_server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    app, worker, name = build_server(ServeOptions(**{k: v for k, v in vars(args).items()
                                                     if k in fields}))  # fmt: skip
    print(
        f"grc serve: model {name!r} on http://{args.host}:{args.port}/v1 "
        f"({args.policy} batching, {args.max_batch} slots)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        worker.stop()
    return 0
