"""The transformer over a paged KV cache and latent memories: prefill chunks and decode steps.

The same parameters and the same projection / MLP modules as training (`Attention.project`,
`Attention.output`, `MLP`, `RMSNorm` applied to their parameter subtrees); only attention differs:
hybrid paged attention over the sequence's latent memories and its text pages (DESIGN.md section 6).
One function serves a prefill chunk (`C` tokens per sequence) and a decode step (`C = 1`); shapes
are fixed per engine, so each compiles once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.config import ModelConfig
from grc_jax.core.roles import LATENT
from grc_jax.model.layers import MLP, Attention, RMSNorm, compute_dtype
from grc_jax.model.rope import inverse_frequencies, rope_angles
from pallas_kernels.hybrid_paged_attention import hybrid_paged_attention


def layer_params(params: Any, cfg: ModelConfig) -> list[Any]:
    """Per-layer parameter subtrees, from either layout (scanned or `layers_i`)."""
    if "layers" in params:
        return [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.n_layers)]
    return [params[f"layers_{i}"] for i in range(cfg.n_layers)]


def write_pages(
    pages: Float[Array, "*l p s g d"],
    new: Float[Array, "b c g d"],
    block_tables: Int[Array, "b np"],
    text_index: Int[Array, "b c"],
    layer: int | None = None,
) -> Float[Array, "*l p s g d"]:
    """Scatter `new[b, i]` to text slot `text_index[b, i]` of sequence b (-1: not written).

    With `layer`, `pages` is the whole `[L, n_pages, page_size, G, D]` cache and only that layer is
    written: one scatter into the donated cache, updated in place rather than copied per step.
    """
    page_size = pages.shape[-3]
    n_pages = pages.shape[-4]
    page = jnp.take_along_axis(block_tables, jnp.maximum(text_index, 0) // page_size, axis=1)
    page = jnp.where(text_index >= 0, page, n_pages)  # out of range: dropped
    offset = jnp.maximum(text_index, 0) % page_size
    if layer is None:
        return pages.at[page, offset].set(new.astype(pages.dtype), mode="drop")
    return pages.at[layer, page, offset].set(new.astype(pages.dtype), mode="drop")


def paged_forward(
    params: Any,
    cfg: ModelConfig,
    num_latents: int,
    cache: dict[str, Array],
    memories: dict[str, Array],
    tokens: Int[Array, "b c"],
    roles: Int[Array, "b c"],
    positions: Int[Array, "b c"],
    text_index: Int[Array, "b c"],
    block_tables: Int[Array, "b np"],
    text_lengths: Int[Array, " b"],
    mem_tables: Int[Array, "b nm"],
    mem_counts: Int[Array, " b"],
    attention_impl: str = "auto",
) -> tuple[Float[Array, "b c v"], Float[Array, "b c dm"], dict[str, Array], tuple[Array, Array]]:
    """Run `C` new tokens per sequence; returns (logits, hidden, updated cache, the chunk's (k, v)).

    `cache` holds `k`, `v` `[L, n_pages, page_size, G, D]`; `memories` holds `k`, `v`
    `[L, n_mem, K, G, D]` (canonical keys). `text_index` is each token's slot in its sequence's
    text stream (-1: padding, neither written nor attended from); `text_lengths` counts the valid
    text tokens including this chunk. The chunk's (k, v) are `[L, b, c, G, D]`, keys rotated at
    `positions` (what a compression pass turns into a latent memory).
    """
    dtype = compute_dtype(cfg)
    is_latent = roles == LATENT
    tok = jnp.take(params["embed"], jnp.where(is_latent, 0, tokens), axis=0)
    lat = jnp.take(
        params["latents"], jnp.clip(jnp.where(is_latent, tokens, 0), 0, num_latents - 1), axis=0
    )
    x = jnp.where(is_latent[..., None], lat, tok).astype(dtype)
    inv_freq = inverse_frequencies(cfg)
    cos, sin = rope_angles(positions, inv_freq)
    attn_mod, mlp_mod = Attention(cfg), MLP(cfg)
    norm = RMSNorm(cfg.rms_norm_eps, dtype=dtype)
    k_cache, v_cache = cache["k"], cache["v"]
    ks, vs = [], []
    for i, lp in enumerate(layer_params(params, cfg)):
        h = norm.apply({"params": lp["attn_norm"]}, x)
        q, k, v = attn_mod.apply({"params": lp["attn"]}, h, cos, sin, method=Attention.project)
        k_cache = write_pages(k_cache, k, block_tables, text_index, layer=i)
        v_cache = write_pages(v_cache, v, block_tables, text_index, layer=i)
        attended = hybrid_paged_attention(
            q, text_index, k_cache[i], v_cache[i], block_tables, text_lengths,
            memories["k"][i], memories["v"][i], mem_tables, mem_counts,
            jnp.asarray(inv_freq), impl=attention_impl,
        )  # fmt: skip
        x = x + attn_mod.apply({"params": lp["attn"]}, attended, method=Attention.output)
        x = x + mlp_mod.apply({"params": lp["mlp"]}, norm.apply({"params": lp["mlp_norm"]}, x))
        ks.append(k)
        vs.append(v)
    hidden = norm.apply({"params": params["final_norm"]}, x)
    if cfg.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", hidden, params["embed"].astype(dtype))
    else:
        logits = jnp.einsum("btd,dv->btv", hidden, params["lm_head"]["kernel"].astype(dtype))
    cache = {"k": k_cache, "v": v_cache}
    return logits.astype(jnp.float32), hidden, cache, (jnp.stack(ks), jnp.stack(vs))
