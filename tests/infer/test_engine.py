"""The inference engine against the training forward pass of the same layout (DESIGN.md 3, 5, 6).

Every comparison builds the training-time example itself (`layout_example` + `forward`), so the
paged cache, chunked prefill, memory pool and counter-rotation are all checked end to end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.errors import MemoryMismatchError
from grc_jax.core.roles import LATENT
from grc_jax.data.layout import gen, latents, text
from grc_jax.infer.engine import Engine
from grc_jax.infer.sampling import SamplingParams
from grc_jax.infer.scheduler import programs, warm_up
from grc_jax.model.head import embed_from_pooled, pool_latents
from grc_jax.model.rope import inverse_frequencies
from pallas_kernels.hybrid_paged_attention import rotate
from tests.infer.conftest import DOCS, OPTS, K, ToyTokenizer, replace

ATOL = 1e-5
QUESTIONS = ["what?", "who ran fast in the rain", "a"]


def _ids(tok, s: str) -> list[int]:
    return [tok.bos_id, *tok.encode(s)]


def _assert_steps_match(g, full_logits, first: int):
    """Each step's logits equal the training logits at the token before it; greedy = argmax."""
    assert len(g.step_logits) == len(g.tokens) > 0
    for i, (lg, t) in enumerate(zip(g.step_logits, g.tokens)):
        want = full_logits[first + i]
        np.testing.assert_allclose(lg, want, atol=ATOL, rtol=0, err_msg=f"step {i}")
        assert t == int(np.argmax(want)), f"step {i}: token {t} is not the argmax"


def _canonical(k_lnhd: np.ndarray, first_position: int, cfg) -> np.ndarray:
    """Keys made at positions first.. rotated back to 0.. (via the rope of the training model)."""
    angles = jnp.float32(-first_position) * jnp.asarray(inverse_frequencies(cfg.model))
    return np.asarray(rotate(jnp.asarray(k_lnhd), angles))


# --------------------------------------------------------------------------- plain decode


def test_decode_matches_full_forward(engine, train_forward, tok):
    """Greedy decode over the paged cache == training forward of prompt + generated tokens, step by
    step: three prompts of different lengths in one batch, the longest spanning three prefill
    chunks (chunk 8), page size 4 dividing none of the final lengths."""
    rng = np.random.default_rng(0)
    prompts = [[tok.bos_id, *rng.integers(3, 64, n - 1).tolist()] for n in (3, 11, 19)]
    gens = engine.generate_ids(prompts, max_new_tokens=6, stop_tokens=(), return_logits=True)
    _, out = train_forward([[[text(p + g.tokens)]] for p, g in zip(prompts, gens)])
    for b, (p, g) in enumerate(zip(prompts, gens)):
        assert (len(p) + len(g.tokens)) % OPTS.page_size != 0
        assert g.finish_reason == "length" and len(g.tokens) == 6
        _assert_steps_match(g, out.logits[b], len(p) - 1)
    # Batch composition does not matter: each prompt alone gives the same tokens and logits.
    alone = engine.generate_ids(prompts[1:2], max_new_tokens=6, stop_tokens=(), return_logits=True)
    assert alone[0].tokens == gens[1].tokens
    np.testing.assert_allclose(
        np.stack(alone[0].step_logits), np.stack(gens[1].step_logits), atol=ATOL, rtol=0
    )


def test_more_prompts_than_max_batch(engine, tok):
    prompts = [_ids(tok, q) for q in QUESTIONS + ["one more question"]]
    assert len(prompts) > OPTS.max_batch
    gens = engine.generate_ids(prompts, max_new_tokens=3, stop_tokens=())
    alone = engine.generate_ids(prompts[-1:], max_new_tokens=3, stop_tokens=())
    assert len(gens) == len(prompts) and gens[-1].tokens == alone[0].tokens


def test_generate_text_api(engine, tok):
    (g,) = engine.generate(["hello there"], max_new_tokens=4, stop_tokens=())
    (h,) = engine.generate_ids([_ids(tok, "hello there")], max_new_tokens=4, stop_tokens=())
    assert g.tokens == h.tokens and g.text == tok.decode(g.tokens)


# --------------------------------------------------------------------------- memories


def test_generation_over_memories_matches_training_layout(engine, train_forward, tok, compressed):
    """A consumer block over memories (compressed one document at a time) == the training forward
    of [doc_0 + latents] ... [doc_m + latents] [consumer], for several memories in several orders,
    batched together (the pool shares a memory between requests)."""
    mems = [m for m, _ in compressed]
    for orders in ([[0, 1], [1, 0], [2, 0, 1]], [[0], [], [2]]):
        prompts = [_ids(tok, q) for q in QUESTIONS]
        gens = engine.generate_ids(
            prompts,
            memories=[[mems[j] for j in o] for o in orders],
            max_new_tokens=4,
            stop_tokens=(),
            return_logits=True,
        )
        examples = [
            [[text(_ids(tok, DOCS[j])), latents(K)] for j in o] + [[text(p + g.tokens)]]
            for o, p, g in zip(orders, prompts, gens)
        ]
        rows, out = train_forward(examples)
        for b, (p, g) in enumerate(zip(prompts, gens)):
            start = int(np.flatnonzero(rows.block_ids[b] == len(orders[b]))[0])
            assert rows.positions[b, start] == len(orders[b]) * K
            _assert_steps_match(g, out.logits[b], start + len(p) - 1)


def test_memories_change_generation(engine, tok, compressed):
    """The test above is not vacuous: reading memories (and their order) changes the logits."""
    m0, m1 = compressed[0][0], compressed[1][0]
    p = _ids(tok, "what?")
    kw = dict(max_new_tokens=1, stop_tokens=(), return_logits=True)
    gens = engine.generate_ids([p, p, p], memories=[[], [m0, m1], [m1, m0]], **kw)
    lg = [g.step_logits[0] for g in gens]
    assert np.abs(lg[0] - lg[1]).max() > 1e-2 and np.abs(lg[1] - lg[2]).max() > 1e-2


def _pooled_embedding(head, hidden, rows, pooling="mean"):
    pooled = pool_latents(
        jnp.asarray(hidden),
        jnp.asarray(rows.segment_ids),
        jnp.asarray(rows.block_ids),
        jnp.asarray(rows.roles),
        1,
        pooling,
    )
    return np.asarray(embed_from_pooled(head, pooled[:, 0]))


def test_embed_and_compress_match_training_forward(
    engine, train_forward, params, tok, cfg_ind, compressed
):
    """`embed` == the training embedding of [TEXT bos doc][LATENT x K]; `compress` gives the same
    embedding and the canonical (rotated back to 0..K-1) K/V of the training latents."""
    rows, out = train_forward([[[text(_ids(tok, d)), latents(K)]] for d in DOCS])
    want = _pooled_embedding(params.head, out.hidden, rows)[: len(DOCS)]
    got = engine.embed(DOCS)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=ATOL)
    np.testing.assert_allclose(np.stack([e for _, e in compressed]), got, atol=ATOL, rtol=0)
    k_all, v_all = out.kv  # [L, b, t, G, D]
    for b, (mem, _) in enumerate(compressed):
        lat = np.flatnonzero(rows.roles[b] == LATENT)
        first = int(rows.positions[b, lat[0]])
        np.testing.assert_allclose(mem.k, _canonical(k_all[:, b, lat], first, cfg_ind), atol=ATOL)
        np.testing.assert_allclose(mem.v, v_all[:, b, lat], atol=ATOL)
        assert mem.source_tokens == len(_ids(tok, DOCS[b]))
        assert mem.num_latents == K and mem.memory_mode == "independent"


def test_self_reason_embed_matches_training_layout(engine, train_forward, params, tok):
    """embed(self_reason=True) == [TEXT bos text][GEN greedy reasoning][LATENT x K]."""
    prompts = [_ids(tok, d) for d in DOCS]
    reasoning = [g.tokens for g in engine.generate_ids(prompts, max_new_tokens=5, keep_stop=True)]
    examples = [
        [[text(p), gen(r), latents(K)] if r else [text(p), latents(K)]]
        for p, r in zip(prompts, reasoning)
    ]
    rows, out = train_forward(examples)
    want = _pooled_embedding(params.head, out.hidden, rows)[: len(DOCS)]
    got = engine.embed(DOCS, self_reason=True, max_reasoning=5)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- recurrent memory


def test_recurrent_update_matches_training_layout(
    engine_rec, train_forward_rec, params, tok, cfg_rec
):
    """compress(doc) -> update(chunk) -> update(chunk2) -> generate == the training forward of
    [doc + latents][chunk + latents][chunk2 + latents][consumer] in recurrent mode (continuous
    positions, each block reading only the latents of the block before it)."""
    doc, chunks, question = "the cat sat", ["on a mat", "then slept"], "where?"
    ((mem, emb0),) = engine_rec.compress([doc])
    mems, embs = [mem], [emb0]
    for c in chunks:
        m, e = engine_rec.update(mems[-1], c)
        mems.append(m)
        embs.append(e)
    assert mems[-1].source_tokens == len(_ids(tok, doc)) + sum(len(tok.encode(c)) for c in chunks)
    prompt = _ids(tok, question)
    (g,) = engine_rec.generate_ids(
        [prompt], memories=[[mems[-1]]], max_new_tokens=4, stop_tokens=(), return_logits=True
    )
    blocks = [[text(_ids(tok, doc)), latents(K)]]
    blocks += [[text(tok.encode(c)), latents(K)] for c in chunks]
    blocks += [[text(prompt + g.tokens)]]
    rows, out = train_forward_rec([blocks])
    assert (np.diff(rows.positions[0, rows.segment_ids[0] > 0]) == 1).all()
    consumer = int(np.flatnonzero(rows.block_ids[0] == len(chunks) + 1)[0])
    _assert_steps_match(g, out.logits[0], consumer + len(prompt) - 1)
    k_all, v_all = out.kv
    for blk, (m, e) in enumerate(zip(mems, embs)):
        lat = np.flatnonzero((rows.block_ids[0] == blk) & (rows.roles[0] == LATENT))
        first = int(rows.positions[0, lat[0]])
        np.testing.assert_allclose(
            m.k,
            _canonical(k_all[:, 0, lat], first, cfg_rec),
            atol=ATOL,
            err_msg=f"memory after block {blk}",
        )
        np.testing.assert_allclose(m.v, v_all[:, 0, lat], atol=ATOL)
        want = np.asarray(
            embed_from_pooled(params.head, jnp.asarray(out.hidden[0, lat].mean(0)))
        )
        np.testing.assert_allclose(e, want, atol=ATOL, rtol=0, err_msg=f"embedding of block {blk}")
        assert m.memory_mode == "recurrent"


def test_update_refuses_independent_mode(engine, compressed):
    with pytest.raises(MemoryMismatchError, match="recurrent"):
        engine.update(compressed[0][0], "more text")


def test_recurrent_generation_reads_one_memory(engine_rec):
    ((m0, _),) = engine_rec.compress(["first doc"])
    ((m1, _),) = engine_rec.compress(["second doc"])
    with pytest.raises(MemoryMismatchError, match="one running memory"):
        engine_rec.generate(["q"], memories=[[m0, m1]], max_new_tokens=1)
    assert engine_rec.pool.free_pages == OPTS.n_pages - 1


# --------------------------------------------------------------------------- cache hygiene


def test_freed_pages_are_never_read(engine, params, cfg_ind, tok, compressed):
    """Run A, free, fill every free page (and page 0, and the whole memory pool) with NaN, run B:
    B is finite and equal to B on a fresh engine."""
    mems = [m for m, _ in compressed]
    rng = np.random.default_rng(5)
    a_prompts = [[tok.bos_id, *rng.integers(3, 64, 30).tolist()] for _ in range(3)]
    engine.generate_ids(
        a_prompts, memories=[[mems[0]], [], mems[:3]], max_new_tokens=8, stop_tokens=()
    )
    assert engine.pool.free_pages == OPTS.n_pages - 1, "pages leaked"
    free = np.asarray([0, *engine.pool._free])
    assert len(free) == OPTS.n_pages
    engine.cache = {k: v.at[:, free].set(jnp.nan) for k, v in engine.cache.items()}
    engine.mem_pool = {k: jnp.full_like(v, jnp.nan) for k, v in engine.mem_pool.items()}

    b_prompts = [_ids(tok, q) for q in QUESTIONS]
    b_mems = [[mems[1]], [], [mems[2], mems[0]]]
    kw = dict(max_new_tokens=6, stop_tokens=(), return_logits=True)
    got = engine.generate_ids(b_prompts, memories=b_mems, **kw)
    fresh = Engine(cfg_ind, params, tok, OPTS).generate_ids(b_prompts, memories=b_mems, **kw)
    for g, f in zip(got, fresh):
        assert np.isfinite(np.stack(g.step_logits)).all()
        assert g.tokens == f.tokens
        np.testing.assert_allclose(
            np.stack(g.step_logits), np.stack(f.step_logits), atol=ATOL, rtol=0
        )


def test_no_recompilation_per_token_or_request(engine, tok, compressed):
    """After `warm_up`, generations of other lengths, batch sizes and sampling settings trace
    and compile nothing; the generation step holds exactly its fixed programs (a prefill chunk per
    row count, one decode step)."""
    warm_up(engine)
    n_programs = engine._gen_step._cache_size()
    assert n_programs == len(programs(engine))
    # jit(sample) shares its cache with every engine's jit(sample): compare, do not count.
    n_sample = engine._sample._cache_size()
    events: list[str] = []

    def listener(event: str, duration: float, **kw):
        if event in (
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/backend_compile_duration",
        ):
            events.append(f"{event} {kw.get('fun_name')}")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        for n_req, plen, new, temp in [(1, 1, 7, 0.0), (2, 9, 1, 0.8), (3, 17, 4, 0.0)]:
            prompts = [[tok.bos_id, *rng.integers(3, 64, plen + i).tolist()] for i in range(n_req)]
            engine.generate_ids(
                prompts,
                max_new_tokens=new,
                stop_tokens=(),
                sampling=SamplingParams(temperature=temp, top_k=5, seed=n_req),
            )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == [], f"recompiled while generating: {events}"
    # With memories (a different memory table each call) the step still has its programs.
    mems = [m for m, _ in compressed]
    engine.generate_ids([_ids(tok, "q")] * 2, memories=[mems[:2], mems[2:]], max_new_tokens=3)
    assert engine._gen_step._cache_size() == n_programs
    assert engine._sample._cache_size() == n_sample


# --------------------------------------------------------------------------- stopping and errors


def test_stop_tokens_and_length(engine, tok):
    prompts = [_ids(tok, q) for q in QUESTIONS[:2]]
    free = engine.generate_ids(prompts, max_new_tokens=8, stop_tokens=())
    assert [g.finish_reason for g in free] == ["length", "length"]
    assert [len(g.tokens) for g in free] == [8, 8]
    seq = free[0].tokens
    j = next((i for i in range(1, 8) if seq[i] not in seq[:i]), None)  # first seen at step j
    assert j is not None, f"greedy output {seq} repeats one token: pick another prompt"
    stopped = engine.generate_ids(prompts, max_new_tokens=8, stop_tokens=(seq[j],))
    assert stopped[0].finish_reason == "stop" and stopped[0].tokens == seq[:j]
    other = stopped[1]  # the other request is unaffected by its neighbour stopping
    if seq[j] in free[1].tokens:
        k = free[1].tokens.index(seq[j])
        assert other.finish_reason == "stop" and other.tokens == free[1].tokens[:k]
    else:
        assert other.finish_reason == "length" and other.tokens == free[1].tokens
    kept = engine.generate_ids(prompts[:1], max_new_tokens=8, stop_tokens=(seq[j],), keep_stop=True)
    assert kept[0].tokens == seq[: j + 1] and kept[0].text == tok.decode(seq[:j])
    first = engine.generate_ids(prompts[:1], max_new_tokens=8, stop_tokens=(seq[0],))
    assert first[0].tokens == [] and first[0].finish_reason == "stop"
    none = engine.generate_ids(prompts[:1], max_new_tokens=0)
    assert none[0].tokens == [] and none[0].finish_reason == "length"


def test_default_stop_token_is_eos(engine, tok, monkeypatch):
    prompt = [_ids(tok, QUESTIONS[0])]
    seq = engine.generate_ids(prompt, max_new_tokens=4, stop_tokens=())[0].tokens
    eos_tok = ToyTokenizer()
    eos_tok.eos_id = seq[2] if seq[2] not in seq[:2] else seq[0]
    monkeypatch.setattr(engine, "tok", eos_tok)
    (g,) = engine.generate_ids(prompt, max_new_tokens=4)
    assert g.finish_reason == "stop" and g.tokens == seq[: seq.index(eos_tok.eos_id)]


def test_empty_text_is_rejected(engine, engine_rec, compressed):
    for call in (
        lambda: engine.embed(["hello", ""]),
        lambda: engine.compress(["  "]),
        lambda: engine.generate([""]),
        lambda: engine.generate_ids([[]]),
        lambda: engine_rec.update(engine_rec.compress(["doc"])[0][0], ""),
    ):
        with pytest.raises(ValueError, match="empty"):
            call()
    assert engine.pool.free_pages == OPTS.n_pages - 1


def test_request_limits_raise_clear_errors(engine, tok, compressed):
    mem = compressed[0][0]
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate_ids([[tok.bos_id] * 30], max_new_tokens=OPTS.max_seq_len)
    with pytest.raises(ValueError, match="memories"):
        engine.generate_ids(
            [[tok.bos_id]], memories=[[mem] * (OPTS.max_memories + 1)], max_new_tokens=1
        )
    with pytest.raises(ValueError, match="memory lists"):
        engine.generate_ids([[tok.bos_id]] * 2, memories=[[mem]], max_new_tokens=1)
    assert engine.pool.free_pages == OPTS.n_pages - 1, "a failed request leaked pages"


def test_request_of_max_seq_len_fits_when_page_size_does_not_divide_it(cfg_ind, params, tok):
    eng = Engine(cfg_ind, params, tok, replace(OPTS, max_seq_len=10, page_size=4, max_batch=1))
    (g,) = eng.generate_ids([[tok.bos_id] * 9], max_new_tokens=1, stop_tokens=())
    assert len(g.tokens) == 1


def test_embed_of_no_texts_is_empty(engine):
    assert engine.compress([]) == [] and engine.generate([]) == []
    assert engine.embed([]).shape[0] == 0


def test_scanned_checkpoint_serves_like_unscanned(cfg_ind, params, tok, engine, compressed):
    """A scan_layers model (stacked weights) decodes exactly as its per-layer twin, and reads the
    same memories (the engine unstacks once instead of slicing weights every step)."""
    import dataclasses

    from grc_jax.model import stack_layers

    cfg_scan = dataclasses.replace(
        cfg_ind, model=dataclasses.replace(cfg_ind.model, scan_layers=True)
    )
    stacked = params.replace(model=stack_layers(params.model, cfg_ind.model.n_layers))
    scan_engine = Engine(cfg_scan, stacked, tok, OPTS)
    mems = [[m for m, _ in compressed[:2]]]
    want = engine.generate(["where"], mems, max_new_tokens=4, stop_tokens=(), return_logits=True)
    got = scan_engine.generate(
        ["where"], mems, max_new_tokens=4, stop_tokens=(), return_logits=True
    )
    assert got[0].tokens == want[0].tokens
    for a, b in zip(want[0].step_logits, got[0].step_logits):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- position limits

MAX_POS = 24  # K = 4: e.g. 20 tokens (bos included) + 4 latents fit exactly


def _short_engine(cfg, params, tok) -> Engine:
    """An engine whose model is configured for MAX_POS positions (same weights)."""
    cfg = replace(cfg, model=replace(cfg.model, max_position_embeddings=MAX_POS))
    return Engine(cfg, params, tok, OPTS)  # OPTS.max_seq_len = 40: not the binding limit


def _no_compute(eng, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a refused input reached the model")

    for compute in ("_encode", "_step", "_gen_step"):
        monkeypatch.setattr(eng, compute, boom)


def test_inputs_past_max_position_embeddings_are_refused(cfg_ind, cfg_rec, params, tok,
                                                          monkeypatch):  # fmt: skip
    """Each mode's span of positions, first to last, may be at most max_position_embeddings:
    exactly at the limit runs, one past it is refused (naming the input) before any compute."""
    from grc_jax.core.errors import UsageError

    eng, rec = _short_engine(cfg_ind, params, tok), _short_engine(cfg_rec, params, tok)
    fits, over = "a" * (MAX_POS - K - 1), "a" * (MAX_POS - K)  # + bos: 20 and 21 tokens
    (mem, _), _ = eng.compress([fits, "ok"])
    assert mem.source_tokens == MAX_POS - K
    (rec_mem, _), = rec.compress([fits])  # fmt: skip
    assert eng.embed([fits]).shape[0] == 1
    q = "a" * (MAX_POS - K - 3)  # 18 tokens + 2 reasoning + 4 latents = 24
    assert eng.embed([q], self_reason=True, max_reasoning=2).shape[0] == 1
    # Generation over m memories runs from 0 to m*K + prompt + new tokens.
    (g,) = eng.generate_ids([[tok.bos_id] * 12], [[mem, mem]], max_new_tokens=4, stop_tokens=())
    assert len(g.tokens) == 4
    (g,) = eng.generate_ids([[tok.bos_id] * 20], max_new_tokens=4, stop_tokens=())
    assert len(g.tokens) == 4
    # update: old memory K + chunk + new latents K.
    new, _ = rec.update(rec_mem, "a" * (MAX_POS - 2 * K))
    assert new.source_tokens == rec_mem.source_tokens + MAX_POS - 2 * K

    _no_compute(eng, monkeypatch)
    _no_compute(rec, monkeypatch)
    limit = f"more than model.max_position_embeddings={MAX_POS}"
    cases = [
        (lambda: eng.compress(["ok", over]),
         r"compress: text 1 \('a+'\) has 21 tokens \(with bos\) \+ 4 latents = 25 positions"),
        (lambda: rec.compress([over]), r"compress: text 0 .* = 25 positions"),
        (lambda: eng.embed(["ok", "b", over]), r"embed: text 2 .* = 25 positions"),
        (lambda: eng.embed([q], self_reason=True, max_reasoning=3),
         r"embed: text 0 .*18 tokens \(with bos\) \+ up to 3 reasoning tokens \+ 4 latents"),
        (lambda: eng.generate_ids([[1], [tok.bos_id] * 13], [[], [mem, mem]], max_new_tokens=4),
         r"generate: prompt 1 has 2 memories x 4 latents \+ 13 tokens \+ 4 new tokens = 25"),
        (lambda: eng.generate(["a" * 20], max_new_tokens=4), r"generate: prompt 0 .* = 25"),
        (lambda: rec.update(rec_mem, "a" * (MAX_POS - 2 * K + 1)),
         r"update: chunk \('a+'\) has 4 memory latents \+ 17 tokens \+ 4 new latents = 25"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            call()
        assert limit in str(e.value)
    assert eng.pool.free_pages == OPTS.n_pages - 1


def test_long_text_is_named_by_its_start(cfg_ind, params, tok, monkeypatch):
    eng = _short_engine(cfg_ind, params, tok)
    _no_compute(eng, monkeypatch)
    with pytest.raises(ValueError, match=r"compress: text 0 \('the quick brown fox jump\.\.\.'\)"):
        eng.compress(["the quick brown fox jumps over the lazy dog"])
