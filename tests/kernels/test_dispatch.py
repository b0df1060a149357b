"""The decode loop picks the kernel of its backend; forcing any implementation gives the same
tokens and logits as the reference (kernels run in their interpreters on CPU)."""

import dataclasses

import jax
import numpy as np
import pytest

from grc_jax.core.config import Config, GRCConfig, ModelConfig
from grc_jax.infer.engine import Engine, EngineOptions
from grc_jax.model.params import init_grc_params
from pallas_kernels.hybrid_paged_attention import resolve_impl


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


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_forced_kernel_matches_reference_in_the_decode_loop(impl):
    cfg = Config(
        model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, d_ff=64),
        grc=GRCConfig(num_latents=8),
    )  # fmt: skip
    params = init_grc_params(cfg, jax.random.key(0))
    opts = EngineOptions(page_size=8, n_pages=16, max_batch=2, max_seq_len=32, max_memories=2,
                         prefill_chunk=8)  # fmt: skip
    ref = Engine(cfg, params, _Tok(), opts)
    mems = [m for m, _ in ref.compress(["the cat sat down", "dogs run"])]
    prompts = ["what is it", "hi"]
    want = ref.generate(prompts, [mems, mems[:1]], max_new_tokens=3, stop_tokens=(),
                        return_logits=True)  # fmt: skip
    kern = Engine(cfg, params, _Tok(), dataclasses.replace(opts, attention_impl=impl))
    got = kern.generate(prompts, [mems, mems[:1]], max_new_tokens=3, stop_tokens=(),
                        return_logits=True)  # fmt: skip
    for w, g in zip(want, got):
        assert g.tokens == w.tokens
        for a, b in zip(w.step_logits, g.step_logits):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
