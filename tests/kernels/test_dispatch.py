"""The decode loop picks the kernel of its backend; forcing any implementation gives the same
tokens and logits as the reference (kernels run in their interpreters on CPU); a kernel that fails
to lower or compile at engine start-up leaves the engine on the reference, with one log line."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from grc_jax.core.config import Config, GRCConfig, ModelConfig
from grc_jax.infer import engine as engine_module
from grc_jax.infer.engine import Engine, EngineOptions
from grc_jax.model.params import init_grc_params
from pallas_kernels.hybrid_paged_attention import gpu, resolve_impl, tpu

LOGGER = "pallas_kernels.hybrid_paged_attention"
CFG = Config(
    model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=64),
    grc=GRCConfig(num_latents=8),
)  # fmt: skip
OPTS = EngineOptions(page_size=8, n_pages=16, max_batch=2, max_seq_len=32, max_memories=2,
                     prefill_chunk=8)  # fmt: skip
PROMPTS = ["what is it", "hi"]


def test_resolve_impl_by_backend_and_query_length():
    assert resolve_impl("auto", 1, "cpu") == "reference"
    assert resolve_impl("auto", 1, "tpu") == "tpu"
    assert resolve_impl("auto", 1, "gpu") == "gpu"
    assert resolve_impl("auto", 8, "gpu") == "reference"  # prefill chunk
    assert resolve_impl("gpu", 1, "cpu") == "gpu"  # forced: interpreter
    assert resolve_impl("tpu", 4, "cpu") == "reference"
    with pytest.raises(ValueError, match="expected one of"):
        resolve_impl("cuda", 1, "cpu")


class _Tok:
    bos_id, eos_id, pad_id, vocab_size = 2, 3, 0, 64

    def encode(self, s):
        return [4 + (ord(c) % 60) for c in s]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def reference_run():
    """Params, memories and the reference engine's generations (tokens and step logits)."""
    params = init_grc_params(CFG, jax.random.key(0))
    ref = Engine(CFG, params, _Tok(), OPTS)
    assert ref.attention_impl == "auto"  # auto on CPU: the reference, unchecked
    mems = [m for m, _ in ref.compress(["the cat sat down", "dogs run"])]
    return params, mems, _generate(ref, mems)


def _generate(engine, mems):
    return engine.generate(PROMPTS, [mems, mems[:1]], max_new_tokens=3, stop_tokens=(),
                           return_logits=True)  # fmt: skip


def _warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_forced_kernel_matches_reference_in_the_decode_loop(impl, reference_run, caplog):
    params, mems, want = reference_run
    kern = Engine(CFG, params, _Tok(), dataclasses.replace(OPTS, attention_impl=impl))
    assert kern.attention_impl == impl  # the start-up compile of the (interpreted) kernel passed
    got = _generate(kern, mems)
    for w, g in zip(want, got):
        assert g.tokens == w.tokens
        for a, b in zip(w.step_logits, g.step_logits):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
    assert not _warnings(caplog)


def _fail(*args, **kwargs):
    raise RuntimeError("Mosaic could not lower this kernel\nsecond line of the error")


@pytest.mark.parametrize(
    "impl, stage", [("tpu", "lowering"), ("gpu", "lowering"), ("tpu", "compile")]
)
def test_kernel_that_fails_at_start_up_leaves_the_engine_on_the_reference(
    impl, stage, reference_run, caplog, monkeypatch
):
    params, mems, want = reference_run
    with monkeypatch.context() as patch:
        if stage == "lowering":  # the kernel entry raises while it is traced
            patch.setattr(tpu, "hybrid_paged_attention_tpu", _fail)
            patch.setattr(gpu, "hybrid_paged_attention_gpu", _fail)
        else:  # lowering passes, the explicit compile of the start-up check raises
            patch.setattr(jax.stages.Lowered, "compile", _fail)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            kern = Engine(CFG, params, _Tok(), dataclasses.replace(OPTS, attention_impl=impl))
        assert kern.attention_impl == "reference"
        # The kernel stays broken while the engine serves: it is never called again.
        got = _generate(kern, mems)
    for w, g in zip(want, got):
        assert g.tokens == w.tokens
        for a, b in zip(w.step_logits, g.step_logits):
            np.testing.assert_array_equal(b, a)  # the same implementation: bit for bit
    (record,) = _warnings(caplog)  # one line for the engine's lifetime
    message = record.getMessage()
    assert "\n" not in message
    assert f"the {impl} kernel does not compile on backend cpu" in message
    assert "RuntimeError: Mosaic could not lower this kernel" in message
    assert "second line" not in message and "using the reference" in message


@pytest.mark.parametrize("impl", ["reference", "auto"])  # auto on CPU selects the reference
def test_reference_engine_compiles_no_kernel(impl, reference_run, monkeypatch):
    params, *_ = reference_run

    def unexpected(*args, **kwargs):
        raise AssertionError("the start-up kernel check ran for the reference")

    monkeypatch.setattr(engine_module, "decode_attention_args", unexpected)
    monkeypatch.setattr(engine_module, "usable_impl", unexpected)
    monkeypatch.setattr(jax.stages.Lowered, "compile", unexpected)
    engine = Engine(CFG, params, _Tok(), dataclasses.replace(OPTS, attention_impl=impl))
    assert engine.attention_impl == impl
