"""Read a llama.cpp GGUF file as a HF-style checkpoint: config dict, HF-named tensors, tokenizer.

Three declarative tables drive it: GGUF metadata keys -> HF config keys, GGUF tensor names -> HF
tensor names, and the architectures whose q/k rows llama.cpp permuted. Quantized tensors (Q4_1,
Q8_0, F16, ...) are dequantized to float32 with `gguf.quants.dequantize`.

Shapes: GGUF lists dims fastest-first (`[in, out]` for a linear weight) while numpy lists them
slowest-first, so a tensor's numpy shape is its GGUF shape reversed, which is the HF `[out, in]`.

The q/k permutation: for the `llama` architecture llama.cpp's converter rewrites the rows of
`q_proj` / `k_proj` so that its interleaved ("GPT-J") RoPE, which rotates the pairs (0,1), (2,3),
..., matches HF's rotate-half RoPE, which rotates (j, j + head_dim/2). Per head it reshapes the
rows `[head_dim]` to `[2, head_dim/2]` and transposes to `[head_dim/2, 2]`, i.e. GGUF row 2j is
HF row j and GGUF row 2j+1 is HF row j + head_dim/2. `unpermute_qk` applies the inverse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from grc_jax.core.errors import ImportModelError, MissingPathError

# GGUF `general.architecture` -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose q/k weights llama.cpp stores permuted for its interleaved RoPE.
PERMUTED_QK_ARCHITECTURES = {"llama"}

# "{arch}." + GGUF metadata key -> HF config key.
GGUF_CONFIG_KEYS = (
    ("vocab_size", "vocab_size"),
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", "rope_theta"),
    ("context_length", "max_position_embeddings"),
)
# "tokenizer.ggml." + key -> HF config key.
GGUF_TOKEN_ID_KEYS = (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("padding_token_id", "pad_token_id"),
)

# GGUF tensor name -> HF tensor name ({i}: layer index).
GGUF_TENSOR_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_NAME_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), h)
    for g, h in GGUF_TENSOR_NAMES
]
# HF tensor name -> how many heads its rows hold, for the permuted q/k projections.
_PERMUTED = re.compile(r"\.self_attn\.(q|k)_proj\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """The HF name of a GGUF tensor; an unknown name is returned unchanged (and later reported)."""
    for pattern, hf in _NAME_PATTERNS:
        m = pattern.match(name)
        if m:
            return hf.format(**m.groupdict())
    return name


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rows -> llama.cpp rows, as llama.cpp's converter does: per head [2, D/2] -> [D/2, 2]."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp rows -> HF rows: the exact inverse of `permute_qk`."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise MissingPathError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a truncated or foreign file
        raise ImportModelError(f"cannot read GGUF file {str(path)!r}: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_to_hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A HF `config.json` dict (transformers-5 style) from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ImportModelError(
            f"GGUF key 'general.architecture' = {arch!r}: supported: {supported}"
        )
    hf: dict[str, Any] = {"model_type": GGUF_ARCHITECTURES[arch], "hidden_act": "silu"}
    for key, hf_key in GGUF_CONFIG_KEYS:
        if f"{arch}.{key}" in meta:
            value = meta[f"{arch}.{key}"]
            if isinstance(value, float):
                # GGUF stores float32: write its shortest decimal (1e-05, not 9.99999974e-06),
                # the value the HF config.json has and that converts to the same float32.
                value = float(str(np.float32(value)))
            hf[hf_key] = value
    for key, hf_key in GGUF_TOKEN_ID_KEYS:
        if f"tokenizer.ggml.{key}" in meta:
            hf[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in meta:
        hf["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    if "hidden_size" in hf and "num_attention_heads" in hf:
        hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and rope_dims != hf.get("head_dim"):
        raise ImportModelError(
            f"GGUF key '{arch}.rope.dimension_count' = {rope_dims}: partial rotary embeddings "
            f"(head_dim {hf.get('head_dim')}) are not supported"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ImportModelError(
            f"GGUF key '{arch}.rope.scaling.type' = {scaling!r}: supported: none"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ImportModelError(
            "GGUF tensor 'rope_freqs.weight' (llama.cpp's precomputed Llama-3.1 RoPE scaling) "
            "is not supported; import the HF checkpoint instead"
        )
    hf["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": float(hf.pop("rope_theta", 10000.0)),
    }
    hf["tie_word_embeddings"] = "output.weight" not in tensor_names
    if hf["model_type"] == "qwen3":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return hf


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF dims are fastest-first
    try:
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except NotImplementedError as e:
        raise ImportModelError(
            f"GGUF tensor {tensor.name!r}: cannot dequantize type {tensor.tensor_type.name} ({e})"
        ) from e
    return np.asarray(data, dtype=np.float32).reshape(shape)


def load_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(HF config dict, HF-named float32 tensors, GGUF metadata) of a GGUF file."""
    path = Path(path)
    reader = _open(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    hf = gguf_to_hf_config(meta, names)
    permuted = meta["general.architecture"] in PERMUTED_QK_ARCHITECTURES
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        arr = _dequantize(tensor)
        m = _PERMUTED.search(name)
        if permuted and m:
            heads = hf["num_attention_heads"] if m.group(1) == "q" else hf["num_key_value_heads"]
            arr = unpermute_qk(arr, heads)
        tensors[name] = arr
    return hf, tensors, meta


# ---------------------------------------------------------------------------------------------
# Tokenizer: GGUF vocabulary -> tokenizers.Tokenizer (byte-level BPE, `tokenizer.ggml.model` gpt2).

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# `tokenizer.ggml.pre` -> the split regex the vocabulary was trained with (None: GPT-2's own).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
DIGIT_SPLITTING_PRE_TOKENIZERS = {"smollm"}  # digits one by one, then GPT-2's regex


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer(meta: dict[str, Any]):
    """(tokenizers.Tokenizer, tokenizer_config dict) from GGUF tokenizer metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ImportModelError(
            f"GGUF key 'tokenizer.ggml.model' = {kind!r}: supported: 'gpt2' (byte-level BPE)"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ImportModelError(
            f"GGUF key 'tokenizer.ggml.token_type': {len(types)} entries for {len(tokens)} tokens"
        )
    alphabet = byte_alphabet()
    chars = set(alphabet.values())

    def spell(token: str) -> str:  # a token stored as raw text -> its byte-level spelling
        return token if set(token) <= chars else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(spell(token), i)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=pre not in PRE_TOKENIZER_SPLITS
    )
    if pre in PRE_TOKENIZER_SPLITS:
        split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in DIGIT_SPLITTING_PRE_TOKENIZERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    # Control tokens are special; user-defined ones are matched whole but not special. A token
    # that is not spelled in the byte alphabet was respelled above, so it cannot be matched as is.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL and t in vocab
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED and t in vocab
        ]
    )

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
        specials = [(t, vocab[t]) for t in {bos, eos} if t and t in single]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    arch = meta.get("general.architecture", "")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


def save_tokenizer(meta: dict[str, Any], out: str | Path) -> list[str]:
    """Write `tokenizer.json` and `tokenizer_config.json` built from GGUF metadata into `out`."""
    tok, config = build_tokenizer(meta)
    out = Path(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
    return ["tokenizer.json", "tokenizer_config.json"]
