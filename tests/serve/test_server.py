"""`grc serve` live on 127.0.0.1, called with the official `openai` client (and httpx for what the
client does not send): completions, chat, streaming, embeddings, memories, 32 concurrent requests,
disconnects, bad requests. The model is a tiny run trained for two steps."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest

from grc_jax.core.config import load_config
from grc_jax.data.synth import synthesize
from grc_jax.infer.scheduler import programs
from grc_jax.serve import live as live_server
from grc_jax.train.loop import train
from tests.infer.test_cli import SMALL

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    "velora is a city . its population is 42 thousand .",
    "the river arun flows north into the lake of tarn .",
    "marek painted the old bridge blue in the spring .",
]


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


SIZES = dict(max_batch=8, max_seq_len=96, page_size=8, prefill_chunk=16, memory_slots=6,
             max_memories=3)  # fmt: skip


@pytest.fixture(scope="module")
def index_dir(run_dir, tmp_path_factory) -> str:
    """`grc index` of DOCS by the tiny run."""
    from grc_jax.cli import main

    root = tmp_path_factory.mktemp("index")
    (root / "corpus.txt").write_text("\n".join(DOCS) + "\n")
    assert main(["index", run_dir, "--corpus", str(root / "corpus.txt"), "--out",
                 str(root / "index")]) == 0  # fmt: skip
    return str(root / "index")


@pytest.fixture(scope="module")
def live(run_dir, index_dir):
    server = live_server.LiveServer(run_dir, poison_freed_pages=True, index=index_dir, **SIZES)
    yield server
    server.close()


def _leak_free(live: live_server.LiveServer) -> None:
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


def test_rag_reads_the_retrieved_memories_shared_in_the_pool(live):
    from grc_jax.infer.index import search

    q = "which city has a population of forty two thousand ?"
    body = {"model": live.name, "question": q, "k": 2, "max_tokens": 8}
    out = live.http.post("/v1/rag", json=body).json()
    index = live.app.state.server.index
    emb = live.on_engine(live.engine.embed, [q])[0]
    _, ids = search(index, emb, 2)
    assert [h["id"] for h in out["hits"]] == [int(i) for i in ids]
    assert [h["text"] for h in out["hits"]] == [DOCS[int(i)] for i in ids]
    (want,) = live.on_engine(live.engine.generate, [q], [index.memories([int(i) for i in ids])],
                             max_new_tokens=8)  # fmt: skip
    assert out["choices"][0]["text"] == want.text
    again = live.http.post("/v1/rag", json=body).json()
    assert again["choices"][0]["text"] == want.text
    assert all(f"index:{int(i)}" in live.engine.memories for i in ids)  # held once, kept
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
    # nothing compiled per request or token: the programs compiled at start-up
    assert live.engine._gen_step._cache_size() == len(programs(live.engine))
    _leak_free(live)
    assert all(m in live.engine.memories for m in ids)
    held = live.engine.memories.held
    for m in ids:
        live.http.delete(f"/v1/memories/{m}")
    assert live.engine.memories.held == held - 3


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


def test_past_the_queue_bound_requests_get_503_with_retry_after(live):
    """With the engine's thread held up, three requests arrive; under a queue bound of one the
    first waits and runs, the other two get 503 with Retry-After, and the server goes on."""
    import time

    sched = live.worker.scheduler
    bound, sched.max_queue = sched.max_queue, 1
    try:
        held = live.worker.call(time.sleep, 1.5)  # everything sent now lands in one drain

        def call(_):
            body = {"model": live.name, "prompt": "velora", "max_tokens": 4, "temperature": 0}
            return live.http.post("/v1/completions", json=body)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(call, range(3)))
        held.result()
    finally:
        sched.max_queue = bound
    assert sorted(r.status_code for r in answers) == [200, 503, 503]
    busy = [r for r in answers if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" for r in busy)
    assert _error(busy[0], 503)["type"] == "server_overloaded"
    assert call(0).status_code == 200
    _leak_free(live)


# --------------------------------------------------------------------------- docs/serving.md


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "docs/serving.md").read_text()
    return [b.split("```", 1)[0] for b in text.split(f"```{lang}\n")[1:]]


def test_the_examples_of_docs_serving_work_as_written(live, capfd):
    """The Python example runs against the live server of the run `runs/.../tiny` (only the
    port differs), and every `curl` call answers 200 with JSON or server-sent events."""
    import shutil
    import subprocess

    srv = live
    assert srv.name == "tiny"  # the run directory's name, as in the docs
    code = _blocks("python")[0].replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    exec(compile(code, "docs/serving.md", "exec"), {})
    out = capfd.readouterr().out
    assert "'deleted': True" in out, out
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = _blocks("bash")[1].replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    made = srv.http.post("/v1/memories", json={"model": "tiny", "input": DOCS[0]}).json()
    script = script.replace("mem-PASTE-THE-ID", made["id"])
    commands = [c.strip() for c in script.replace("\\\n", " ").split("\ncurl")]
    for c in commands:
        c = c if c.startswith("curl") else "curl " + c
        c = "\n".join(line for line in c.splitlines() if not line.lstrip().startswith("#"))
        r = subprocess.run(["bash", "-c", c.replace("curl -s", "curl -sf", 1)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip(), (c, r.stderr)
    srv.http.delete(f"/v1/memories/{made['id']}")
    _leak_free(srv)


def test_grc_serve_command_starts_answers_and_stops(run_dir):
    """`grc serve RUN` as a real process: ready line, a completion, clean exit on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = live_server.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "grc_jax.cli", "serve", run_dir, "--port", str(port),
         "--max-batch", "2", "--max-seq-len", "64", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"on http://127.0.0.1:{port}/v1" in line, line + proc.stdout.read()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                out = client.completions.create(model="tiny", prompt="velora", max_tokens=3)
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not open its port"
                time.sleep(0.1)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
