"""Latent memory files and the checks that keep a memory with the model that made it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from grc_jax.core.errors import MemoryMismatchError
from grc_jax.infer.engine import Engine
from grc_jax.infer.memory import LatentMemory, model_fingerprint
from tests.infer.conftest import MODEL, OPTS, K, make_config


def _random_memory(fingerprint: str, mode: str = "independent", num_latents: int = K, seed=0):
    rng = np.random.default_rng(seed)
    shape = (MODEL.n_layers, num_latents, MODEL.n_kv_heads, MODEL.head_dim)
    return LatentMemory(
        k=rng.normal(size=shape).astype(np.float32),
        v=rng.normal(size=shape).astype(np.float32),
        model=fingerprint,
        num_latents=num_latents,
        memory_mode=mode,
        source_tokens=17,
    )


def test_save_load_round_trip_is_exact(tmp_path, engine):
    mem = _random_memory(engine.fingerprint)
    path = tmp_path / "doc.mem.safetensors"
    mem.save(path)
    back = LatentMemory.load(path)
    np.testing.assert_array_equal(back.k, mem.k)
    np.testing.assert_array_equal(back.v, mem.v)
    assert back.k.dtype == np.float32
    assert (back.model, back.num_latents, back.memory_mode, back.source_tokens) == (
        mem.model,
        mem.num_latents,
        mem.memory_mode,
        mem.source_tokens,
    )
    engine.check_memory(back)  # still this model's


def test_loaded_memory_generates_like_the_original(tmp_path, engine, tok, compressed):
    mem = compressed[1][0]
    mem.save(tmp_path / "m.safetensors")
    back = LatentMemory.load(tmp_path / "m.safetensors")
    prompt = [tok.bos_id, *tok.encode("q?")]
    kw = dict(max_new_tokens=3, stop_tokens=(), return_logits=True)
    a, b = engine.generate_ids([prompt, prompt], memories=[[mem], [back]], **kw)
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(np.stack(a.step_logits), np.stack(b.step_logits))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentMemory.load(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(other), {"format": "pt"})
    with pytest.raises(ValueError, match="not a grc latent memory"):
        LatentMemory.load(other)
    kv_no_meta = tmp_path / "kv.safetensors"
    save_file(
        {"k": np.ones((1, 2, 1, 2), np.float32), "v": np.ones((1, 2, 1, 2), np.float32)},
        str(kv_no_meta),
    )
    with pytest.raises(ValueError, match="not a grc latent memory"):
        LatentMemory.load(kv_no_meta)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a grc latent memory"):
        LatentMemory.load(garbage)


def test_malformed_memory_is_rejected():
    a = np.zeros((2, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="must be equal"):
        LatentMemory(k=a, v=a[:, :3], model="x", num_latents=4, memory_mode="independent")
    with pytest.raises(ValueError, match="num_latents"):
        LatentMemory(k=a, v=a, model="x", num_latents=3, memory_mode="independent")


def test_memory_from_another_model_is_refused(engine, cfg_ind, params, tok):
    other_params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) * 1.5), params)
    other = Engine(cfg_ind, other_params, tok, OPTS)
    assert other.fingerprint != engine.fingerprint
    mem = _random_memory(engine.fingerprint)
    with pytest.raises(MemoryMismatchError, match="made by model"):
        other.check_memory(mem)
    # Generation checks before running anything, and gives the pages back.
    with pytest.raises(MemoryMismatchError, match=r"request 0 memory 0.*made by model"):
        other.generate_ids([[tok.bos_id]], memories=[[mem]], max_new_tokens=1)
    assert other.pool.free_pages == OPTS.n_pages - 1


def test_memory_with_another_k_is_refused(engine, params, tok):
    cfg2 = make_config(num_latents=2)
    params2 = params.replace(model=dict(params.model, latents=params.model["latents"][:2]))
    other = Engine(cfg2, params2, tok, OPTS)
    with pytest.raises(MemoryMismatchError, match=r"K"):
        other.check_memory(_random_memory(engine.fingerprint))
    with pytest.raises(MemoryMismatchError, match=r"K"):
        engine.check_memory(_random_memory(engine.fingerprint, num_latents=2))


def test_memory_from_the_other_mode_is_refused(engine, engine_rec):
    with pytest.raises(MemoryMismatchError, match="memory_mode='independent'.*'recurrent'"):
        engine_rec.check_memory(_random_memory(engine.fingerprint, mode="independent"))
    with pytest.raises(MemoryMismatchError, match="memory_mode='recurrent'.*'independent'"):
        engine.check_memory(_random_memory(engine_rec.fingerprint, mode="recurrent"))
    with pytest.raises(MemoryMismatchError, match="memory_mode"):
        engine_rec.update(_random_memory(engine.fingerprint), "a chunk")


def test_fingerprint_is_stable_and_tracks_the_model(cfg_ind, params):
    assert model_fingerprint(cfg_ind, params) == model_fingerprint(cfg_ind, params)
    assert model_fingerprint(cfg_ind, params) != model_fingerprint(make_config("recurrent"), params)
    bumped = jax.tree.map(lambda a: a, params)
    bumped = bumped.replace(model=dict(bumped.model, latents=bumped.model["latents"] * 1.01))
    assert model_fingerprint(cfg_ind, bumped) != model_fingerprint(cfg_ind, params)


def test_load_with_incomplete_metadata_names_the_file(tmp_path):
    path = tmp_path / "partial.safetensors"
    a = np.ones((1, 2, 1, 2), np.float32)
    save_file({"k": a, "v": a}, str(path), {"format": "grc-latent-memory/1"})
    with pytest.raises(ValueError, match="partial.safetensors"):
        LatentMemory.load(path)


def test_fingerprint_ignores_execution_options(params):
    """The same weights, scanned or not, in another compute dtype: the same model."""
    import dataclasses

    from grc_jax.model import stack_layers

    cfg = make_config("independent")
    scanned = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, scan_layers=True, dtype="bfloat16")
    )
    stacked = params.replace(model=stack_layers(params.model, cfg.model.n_layers))
    assert model_fingerprint(scanned, stacked) == model_fingerprint(cfg, params)
