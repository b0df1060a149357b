"""`grc serve` live on 127.0.0.1, called with the official `openai` client (and httpx for what the
client does not send): completions, chat, streaming, embeddings, memories, 32 concurrent requests,
disconnects, bad requests. The model is a tiny run trained for two steps."""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import socket
import threading
import time
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
import uvicorn

from grc_jax.cli.serve import add_serve_arguments, build_server
from grc_jax.core.config import load_config
from grc_jax.data.synth import synthesize
from grc_jax.train.loop import train
from tests.infer.test_cli import SMALL

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    "velora is a city . its population is 42 thousand .",
    "the river arun flows north into the lake of tarn .",
    "marek painted the old bridge blue in the spring .",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("serve")
    data = root / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    overrides = [*SMALL, f"data.train_path={data}/train.jsonl",
                 f"data.eval_path={data}/validation.jsonl", f"train.output_dir={root}/runs",
                 "train.run_name=tiny"]  # fmt: skip
    train(load_config(ROOT / "configs/tiny.yaml", overrides), quiet=True)
    return str(root / "runs/tiny")


class LiveServer:
    """`build_server` (what `grc serve` runs) under uvicorn in a thread; stopped by `close`."""

    def __init__(self, run: str, *flags: str):
        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        self.port = _free_port()
        args = p.parse_args([run, "--port", str(self.port), "--max-batch", "8", "--max-seq-len",
                             "96", "--page-size", "8", "--prefill-chunk", "16",
                             "--memory-slots", "6", "--max-memories", "3", *flags])  # fmt: skip
        self.app, self.worker, self.name = build_server(args)
        self.engine = self.worker.engine
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)  # fmt: skip
        self.http = httpx2.Client(base_url=self.url, timeout=120)

    def on_engine(self, fn, *args, **kwargs):
        return self.worker.call(fn, *args, **kwargs).result(timeout=300)

    def quiet(self) -> None:
        """Wait until no request runs or waits (cancellations land at the next step)."""
        deadline = time.monotonic() + 60
        while not self.worker.scheduler.idle:
            assert time.monotonic() < deadline, "requests still running"
            time.sleep(0.02)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()


@pytest.fixture(scope="module")
def live(run_dir):
    server = LiveServer(run_dir, "--poison-freed-pages")
    yield server
    server.close()


def _leak_free(live: LiveServer) -> None:
    live.quiet()
    e = live.engine
    assert e.pool.free_pages == e.pool.n_pages - 1, "pages leaked"
    assert e.memories.read == 0, "memory reads leaked"
    held_named = e.memories.named
    assert e.memories.held == held_named, "an unnamed memory slot leaked"


# --------------------------------------------------------------------------- the client's calls


def test_models_health_and_metrics(live):
    assert [m.id for m in live.client.models.list().data] == [live.name]
    assert live.http.get("/health").json()["status"] == "ok"
    text = live.http.get("/metrics").text
    for name in ("grc_queue_length", "grc_running_requests", "grc_pages_in_use",
                 "grc_memories_held", "grc_generation_tokens_per_second",
                 "grc_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert name in text


def test_completion_chat_and_streaming_agree_with_the_engine(live):
    prompt = "which city has a population of forty two thousand ?"
    (want,) = live.on_engine(live.engine.generate, [prompt], max_new_tokens=12)
    got = live.client.completions.create(model=live.name, prompt=prompt, max_tokens=12,
                                         temperature=0)  # fmt: skip
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.tokens)
    chunks = list(live.client.completions.create(model=live.name, prompt=prompt, max_tokens=12,
                                                 temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    chat = live.client.chat.completions.create(
        model=live.name, messages=[{"role": "user", "content": prompt}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    (want_chat,) = live.on_engine(live.engine.generate, [f"user: {prompt}\nassistant:"],
                                  max_new_tokens=8)  # fmt: skip
    assert chat.choices[0].message.content == want_chat.text
    assert chat.choices[0].message.role == "assistant"
    streamed = live.client.chat.completions.create(
        model=live.name, messages=[{"role": "user", "content": prompt}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    parts = list(streamed)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want_chat.text
    assert parts[-1].usage.completion_tokens == len(want_chat.tokens)
    _leak_free(live)


def test_embeddings_match_engine_embed(live):
    out = live.client.embeddings.create(model=live.name, input=DOCS)
    want = live.on_engine(live.engine.embed, DOCS)
    got = np.asarray([d.embedding for d in out.data], np.float32)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    one = live.client.embeddings.create(model=live.name, input=DOCS[0], encoding_format="base64")
    raw = np.frombuffer(base64.b64decode(one.data[0].embedding), "<f4")  # little-endian float32
    np.testing.assert_allclose(raw, want[0], atol=1e-6, rtol=0)
    reasoned = live.client.embeddings.create(model=live.name, input=DOCS[:1],
                                             extra_body={"self_reason": True})  # fmt: skip
    want_r = live.on_engine(live.engine.embed, DOCS[:1], self_reason=True)
    np.testing.assert_allclose(reasoned.data[0].embedding, want_r[0], atol=1e-6)


def test_memories_are_created_read_shared_and_deleted(live):
    made = live.http.post("/v1/memories", json={"model": live.name, "input": DOCS[0]}).json()
    assert made["object"] == "memory" and made["num_latents"] == live.engine.K
    assert made["tokens"] == len(live.engine.tok.encode(DOCS[0])) + 1
    assert live.http.get(f"/v1/memories/{made['id']}").json()["id"] == made["id"]
    mem = live.on_engine(live.engine.memories.get, made["id"])
    q = "what is the population ?"
    (want,) = live.on_engine(live.engine.generate, [q], [[mem]], max_new_tokens=10)
    got = live.client.completions.create(model=live.name, prompt=q, max_tokens=10, temperature=0,
                                         extra_body={"memories": [made["id"]]})  # fmt: skip
    assert got.choices[0].text == want.text
    gone = live.http.delete(f"/v1/memories/{made['id']}").json()
    assert gone == {"id": made["id"], "object": "memory", "deleted": True}
    assert live.http.get(f"/v1/memories/{made['id']}").status_code == 404
    _leak_free(live)


# --------------------------------------------------------------------------- under load


def test_32_concurrent_requests_equal_each_request_alone(live):
    """32 greedy requests of mixed lengths, a third reading shared memories, sent at once from
    32 threads: each answer equals the engine's answer to that request alone; afterwards every
    page and every unread memory slot is free (freed pages were NaN-poisoned all along)."""
    ids = [live.http.post("/v1/memories", json={"model": live.name, "input": d}).json()["id"]
           for d in DOCS]  # fmt: skip
    rng = np.random.default_rng(0)
    words = " ".join(DOCS).split()
    reqs = []
    for i in range(32):
        prompt = " ".join(rng.choice(words, int(rng.integers(1, 30))))
        mems = [ids[j] for j in rng.choice(3, int(rng.integers(1, 3)), replace=False)] \
            if i % 3 == 0 else []  # fmt: skip
        reqs.append((prompt, mems, int(rng.integers(1, 24))))

    def call(r):
        prompt, mems, n = r
        return live.client.completions.create(
            model=live.name, prompt=prompt, max_tokens=n, temperature=0,
            extra_body={"memories": mems},
        ).choices[0]  # fmt: skip

    live.worker.scheduler.peak_running = 0
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, reqs))
    assert live.worker.scheduler.peak_running == 8  # every slot was busy at some step
    for (prompt, mems, n), choice in zip(reqs, got):
        objs = [live.on_engine(live.engine.memories.get, m) for m in mems]
        (want,) = live.on_engine(live.engine.generate, [prompt], [objs], max_new_tokens=n)
        assert choice.text == want.text and choice.finish_reason == want.finish_reason
    _leak_free(live)
    assert live.engine.memories.named == 3
    for m in ids:
        live.http.delete(f"/v1/memories/{m}")
    assert live.engine.memories.held == 0


def test_a_client_that_disconnects_mid_stream_frees_its_pages(live):
    with httpx2.stream("POST", live.url + "/v1/completions", timeout=60, json={
            "model": live.name, "prompt": "velora", "max_tokens": 80, "temperature": 0,
            "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
        assert live.worker.scheduler.running == 1
    _leak_free(live)
    assert live.client.completions.create(model=live.name, prompt="velora", max_tokens=2,
                                          temperature=0).choices[0].text is not None  # fmt: skip


# --------------------------------------------------------------------------- bad requests


def _error(r: httpx2.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_bad_requests_get_4xx_with_openai_error_bodies(live, run_dir, caplog):
    post = live.http.post
    r = post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400)["message"]
    body = {"model": live.name, "prompt": "velora", "max_tokens": 4}
    assert _error(post("/v1/completions", json={**body, "model": "gpt-9"}), 404)["code"] == \
        "model_not_found"  # fmt: skip
    e = _error(post("/v1/completions", json={**body, "prompt": "velora " * 200}), 400)
    assert e["code"] == "context_length_exceeded"
    assert _error(post("/v1/completions", json={**body, "max_tokens": -1}), 400)["param"] == \
        "max_tokens"  # fmt: skip
    e = _error(post("/v1/completions", json={**body, "memories": ["mem-nope"]}), 404)
    assert e["code"] == "memory_not_found"
    _error(post("/v1/completions", json={**body, "n": 2}), 400)
    _error(post("/v1/completions", json={"model": live.name}), 400)
    _error(post("/v1/embeddings", json={"model": live.name, "input": ""}), 400)
    _error(post("/v1/memories", json={"model": live.name}), 400)
    _error(live.http.get("/v1/memories/mem-nope"), 404)
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        live.client.completions.create(model=live.name, prompt="x", max_tokens=-5)
    assert live.http.get("/health").status_code == 200
    _leak_free(live)


def test_a_memory_from_another_model_is_refused(live, tmp_path):
    from grc_jax.infer.memory import LatentMemory

    base = live.on_engine(live.engine.compress, [DOCS[0]])[0][0]
    foreign = LatentMemory(k=base.k, v=base.v, model="0123456789abcdef",
                           num_latents=base.num_latents, memory_mode=base.memory_mode)  # fmt: skip
    foreign.save(tmp_path / "m.safetensors")
    data = base64.b64encode((tmp_path / "m.safetensors").read_bytes()).decode()
    e = _error(live.http.post("/v1/memories", json={"model": live.name, "data": data}), 400)
    assert e["code"] == "memory_model_mismatch" and "0123456789abcdef" in e["message"]
    base.save(tmp_path / "ok.safetensors")
    ok = base64.b64encode((tmp_path / "ok.safetensors").read_bytes()).decode()
    made = live.http.post("/v1/memories", json={"model": live.name, "data": ok}).json()
    assert made["object"] == "memory"
    live.http.delete(f"/v1/memories/{made['id']}")
    _error(live.http.post("/v1/memories", json={"model": live.name, "data": "!!"}), 400)


def test_past_the_queue_bound_requests_get_503_with_retry_after(run_dir):
    server = LiveServer(run_dir, "--max-queue", "1", "--max-batch", "1")
    try:

        def call(_):
            body = {"model": server.name, "prompt": "velora", "max_tokens": 40, "temperature": 0}
            return server.http.post("/v1/completions", json=body)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = [r.status_code for r in pool.map(call, range(6))]
        busy = [c for c in codes if c == 503]
        assert busy and set(codes) <= {200, 503}
        assert server.http.get("/health").status_code == 200
        assert call(0).status_code == 200
        _leak_free(server)
    finally:
        server.close()
