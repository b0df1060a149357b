"""The OpenAI-compatible HTTP API of `grc serve` (FastAPI on uvicorn).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format), `POST /v1/embeddings`, `GET /v1/models`,
`GET /health`, `GET /metrics`; GRC extensions `POST /v1/memories`, `GET` / `DELETE
/v1/memories/{id}`, `memories: [id, ...]` on completions and chat, `POST /v1/rag`.

Every request is checked before it reaches the engine; bad input gets a 4xx with OpenAI's error
body (`{"error": {"message", "type", "param", "code"}}`) and one log line; a full queue or memory
pool gets 503 with `Retry-After`. Generation runs on the engine's thread (`EngineWorker`); a
request whose client goes away is cancelled and its pages freed at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from grc_jax.core.errors import MemoryMismatchError, UserError
from grc_jax.infer.index import search
from grc_jax.infer.memory import LatentMemory
from grc_jax.infer.memory_pool import MemoryPoolFullError
from grc_jax.infer.sampling import SamplingParams
from grc_jax.infer.scheduler import Job, QueueFullError
from grc_jax.serve.metrics import ServerMetrics
from grc_jax.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    MemoryRequest,
    RagRequest,
)
from grc_jax.serve.text import TextStream, render_chat

log = logging.getLogger("grc.serve")


class Server:
    """What the routes share: the engine's worker, the served name, an optional rag index."""

    def __init__(self, worker: Any, model_name: str, index: Any = None):
        self.worker, self.model_name, self.index = worker, model_name, index
        self.engine, self.sched = worker.engine, worker.scheduler
        self.metrics = ServerMetrics(worker)
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip

    def prompt_ids(self, text: str) -> list[int]:
        return [self.engine.tok.bos_id, *self.engine.tok.encode(text)]

    def budget(self, body: Any, n_prompt: int, default: int, param: str) -> int:
        """`max_tokens` checked against the context: prompt + new tokens <= max_seq_len."""
        limit = self.engine.opts.max_seq_len
        new = body.max_tokens if body.max_tokens is not None else min(default, limit - n_prompt)
        if new < 0:
            raise APIError(400, f"max_tokens: expected an integer >= 0, got {new}",
                           param="max_tokens")  # fmt: skip
        if n_prompt + new > limit or new == 0 and n_prompt > limit:
            raise APIError(
                400, f"this server's context is {limit} tokens; the {param} has {n_prompt} "
                f"tokens and max_tokens is {new}", param=param, code="context_length_exceeded",
            )  # fmt: skip
        return new

    # ------------------------------------------------------------------ generation

    def _enqueue(self, job: Job) -> Job:
        """On the engine thread: the memories must be held now; then submit."""
        pool = self.engine.memories
        for key in job.memory_keys:
            if key not in pool:
                gone = " (evicted: the memory pool was full; create it again)"
                raise APIError(404, f"memory {key!r} not found" + (gone if pool.was_evicted(key)
                               else ""), param="memories", code="memory_not_found")  # fmt: skip
        return self.sched.submit(job)  # checks the positions and memory reads

    async def start(self, ids: list[int], new: int, body: Any,
                    keys: list[str] | None = None) -> tuple[Job, asyncio.Queue]:  # fmt: skip
        """Submit one generation; its tokens (then None) arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics
        last = [0.0]

        def on_token(job: Job, token: int) -> None:
            now = time.perf_counter()
            metrics.token()
            if len(job.tokens) == 1:
                metrics.ttft.observe(now - job.submitted_at)
            else:
                metrics.itl.observe(now - last[0])
            last[0] = now
            loop.call_soon_threadsafe(q.put_nowait, token)

        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4])
        job = Job(
            ids, new, SamplingParams(body.temperature, body.top_k, body.top_p, seed),
            stop_tokens=(self.engine.tok.eos_id,),
            memory_keys=tuple(keys if keys is not None else body.memories), on_token=on_token,
            on_finish=lambda job: loop.call_soon_threadsafe(q.put_nowait, None),
        )  # fmt: skip
        await asyncio.wrap_future(self.worker.call(self._enqueue, job))
        return job, q

    async def tokens(self, job: Job, q: asyncio.Queue, request: Request,
                     stream: TextStream) -> AsyncIterator[str]:  # fmt: skip
        """Text deltas of `job` until it ends or a stop string appears (then it is cancelled);
        a client that disconnects cancels it too (non-streaming requests poll for that)."""
        try:
            while True:
                try:
                    token = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("client gone: request cancelled")
                        return
                    continue
                if token is None:
                    tail = stream.flush()
                    if tail:
                        yield tail
                    return
                delta = stream.push(token)
                if delta:
                    yield delta
                if stream.stopped:
                    return
        finally:
            if not job.done:
                job.cancelled = True  # read by the engine thread at its next step

    def finish_reason(self, job: Job, stream: TextStream) -> str:
        if stream.stopped:
            return "stop"
        return job.finish_reason if job.finish_reason in ("stop", "length") else "stop"

    async def rag_memories(self, question: str, k: int, self_reason: bool) -> tuple[list, list]:
        """Top-k documents of the index for `question`; their memories held by the pool as
        `index:<id>` (held once, shared by every request that retrieves them) and read-locked
        until the caller releases them (after submitting the job that reads them)."""
        index, engine = self.index, self.engine

        def retrieve():
            q = engine.embed([question], self_reason=self_reason)[0]
            scores, ids = search(index, q, k)
            mems = index.memories([int(i) for i in ids])
            keys = [f"index:{int(i)}" for i in ids]
            for key, m in zip(keys, mems):
                engine.memories.put(key, m, named=True)
                engine.memories.acquire([key])  # not evicted before the job reads it
            return list(zip([int(i) for i in ids], [float(s) for s in scores])), keys

        return await asyncio.wrap_future(self.worker.call(retrieve))


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(worker: Any, model_name: str, index: Any = None) -> FastAPI:
    app = FastAPI(title="grc serve", version="1")
    srv = Server(worker, model_name, index)
    app.state.server = srv

    def error_response(e: APIError, request: Request) -> JSONResponse:
        log.warning("%s %s -> %d %s", request.method, request.url.path, e.status, e.message)
        srv.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the body is not valid JSON", None
        else:
            msg = first.get("msg", "invalid request").removeprefix("Value error, ")
            param = ".".join(loc) or None
            msg = f"{param}: {msg}" if param and not msg.startswith(param) else msg
        return error_response(APIError(400, msg, param=param), request)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError):
        if isinstance(e, QueueFullError | MemoryPoolFullError):
            err = APIError(503, f"server busy: {e}", type="server_overloaded",
                           headers={"Retry-After": "1"})  # fmt: skip
        elif isinstance(e, MemoryMismatchError):
            err = APIError(400, str(e), code="memory_model_mismatch")
        else:
            err = APIError(400, str(e))
        return error_response(err, request)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        if response.status_code < 400:
            srv.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------------ plain routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": srv.sched.running, "waiting": len(srv.sched.waiting)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(srv.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                "created": srv.created, "owned_by": "grc-jax"}]}  # fmt: skip

    # ------------------------------------------------------------------ generation routes

    async def generate(request: Request, body: Any, ids: list[int], new: int, kind: str,
                       keys: list[str] | None = None, extra: dict | None = None):  # fmt: skip
        stops = body.stop_strings()
        job, q = await srv.start(ids, new, body, keys)
        stream = TextStream(srv.engine.tok, stops)
        rid, created = _id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage():
            n = len(job.tokens)
            return {"prompt_tokens": len(ids), "completion_tokens": n,
                    "total_tokens": len(ids) + n}  # fmt: skip

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if body.stream:

            async def events():
                head = {"id": rid, "object": f"{obj}.chunk" if kind == "chat" else obj,
                        "created": created, "model": model_name}  # fmt: skip
                if kind == "chat":
                    yield _sse({**head, "choices": [choice(None, None, first=True)]})
                deltas = srv.tokens(job, q, request, stream)
                try:
                    async for delta in deltas:
                        yield _sse({**head, "choices": [choice(delta, None)]})
                finally:  # also when the client went away: cancels the job now
                    await deltas.aclose()
                final = {**head, "choices": [choice(None, srv.finish_reason(job, stream))]}
                if extra:
                    final.update(extra)
                yield _sse(final)
                if body.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        text = "".join([d async for d in srv.tokens(job, q, request, stream)])
        finish = srv.finish_reason(job, stream)
        if kind == "chat":
            choices = [{"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish, "logprobs": None}]  # fmt: skip
        else:
            choices = [choice(text, finish)]
        out = {"id": rid, "object": obj, "created": created, "model": model_name,
               "choices": choices, "usage": usage()}  # fmt: skip
        return {**out, **(extra or {})}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        if len(body.prompts) != 1:
            raise APIError(400, "prompt: one prompt per request (a list of one string)",
                           param="prompt")  # fmt: skip
        ids = srv.prompt_ids(body.prompts[0])
        new = srv.budget(body, len(ids), 16, "prompt")
        return await generate(request, body, ids, new, "text")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        srv.check_model(body.model)
        text = render_chat(srv.engine.tok, [(m.role, m.text()) for m in body.messages])
        ids = srv.prompt_ids(text)
        new = srv.budget(body, len(ids), 256, "messages")
        return await generate(request, body, ids, new, "chat")

    @app.post("/v1/rag")
    async def rag(body: RagRequest, request: Request):
        srv.check_model(body.model)
        if srv.index is None:
            raise APIError(
                400, "this server has no index: start it with `grc serve MODEL --index DIR` "
                "(an index built by `grc index`)", code="no_index",
            )  # fmt: skip
        k = min(body.k, len(srv.index))
        ids = srv.prompt_ids(body.question)
        new = srv.budget(body, len(ids), 64, "question")
        hits, keys = await srv.rag_memories(body.question, k, body.self_reason)
        extra = {"hits": [{"rank": n, "id": i, "score": round(s, 6), "text": srv.index.texts[i]}
                          for n, (i, s) in enumerate(hits, 1)]}  # fmt: skip
        try:
            return await generate(request, body, ids, new, "text", keys=keys, extra=extra)
        finally:  # the job holds its own reads once submitted
            await asyncio.wrap_future(srv.worker.call(srv.engine.memories.release, keys))

    # ------------------------------------------------------------------ embeddings and memories

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        srv.check_model(body.model)
        dim = srv.engine._embedding_dim()
        if body.dimensions not in (None, dim):
            raise APIError(400, f"dimensions: this model's embeddings have {dim}",
                           param="dimensions")  # fmt: skip
        texts = body.texts
        fut = srv.worker.call(srv.engine.embed, texts, self_reason=body.self_reason,
                              max_reasoning=body.max_reasoning)  # fmt: skip
        vectors = np.asarray(await asyncio.wrap_future(fut), np.float32)
        n_tokens = sum(len(srv.prompt_ids(t)) for t in texts)

        def encode(v: np.ndarray):
            if body.encoding_format == "base64":
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
            return v.tolist()

        return {"object": "list", "model": model_name,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}  # fmt: skip

    def memory_object(key: str, m: Any) -> dict:
        return {"id": key, "object": "memory", "model": model_name, "num_latents": m.num_latents,
                "tokens": m.source_tokens, "fingerprint": m.model}  # fmt: skip

    @app.post("/v1/memories")
    async def create_memory(body: MemoryRequest):
        srv.check_model(body.model)
        engine = srv.engine
        if body.data is not None:
            memory = _decode_memory(body.data)
            engine.check_memory(memory, "data")
        else:
            memory = None
        key = _id("mem")

        def store():
            m = memory if memory is not None else engine.compress([body.input])[0][0]
            engine.check_memory(m, "data")
            engine.memories.put(key, m, named=True)
            return m

        m = await asyncio.wrap_future(srv.worker.call(store))
        return memory_object(key, m)

    def _lookup(memory_id: str):
        m = srv.engine.memories.get(memory_id)
        if m is None:
            gone = " (evicted: the memory pool was full)" if srv.engine.memories.was_evicted(
                memory_id) else ""  # fmt: skip
            raise APIError(404, f"memory {memory_id!r} not found{gone}", param="memory_id",
                           code="memory_not_found")  # fmt: skip
        return m

    @app.get("/v1/memories/{memory_id}")
    async def get_memory(memory_id: str):
        m = await asyncio.wrap_future(srv.worker.call(_lookup, memory_id))
        return memory_object(memory_id, m)

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: str):
        def delete():
            _lookup(memory_id)
            return srv.engine.memories.delete(memory_id)

        await asyncio.wrap_future(srv.worker.call(delete))
        return {"id": memory_id, "object": "memory", "deleted": True}

    return app


def _decode_memory(data: str):
    """A `grc compress` .safetensors file sent as base64 -> LatentMemory (400 if it is not one)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise APIError(400, "data: not base64", param="data") from None
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        try:
            return LatentMemory.load(f.name)
        except UserError as e:
            raise APIError(400, f"data: {e}".replace(f.name, "the file"), param="data") from None
