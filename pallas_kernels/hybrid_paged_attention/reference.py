"""Pure-JAX reference of hybrid paged attention (DESIGN.md section 6): the semantics every kernel
must reproduce.

Each sequence b attends, with ONE softmax, over

- its latent memories: `mem_counts[b]` entries of `mem_tables[b]`, each an index into the shared
  pool `mem_k/mem_v [n_mem, K, H_kv, D]` whose keys are canonical (rotated as if at positions
  0..K-1). The j-th memory of a sequence sits at logical positions `[j*K, (j+1)*K)`: instead of
  re-rotating its K keys, the query is rotated by `-j*K` (RoPE rotations compose), O(D) per memory;
- its text: `text_lengths[b]` tokens in pages `block_tables[b]` of the paged cache
  `k_pages/v_pages [n_pages, page_size, H_kv, D]`; query token i sees text tokens with index
  `<= q_text_index[b, i]` (causal; a decode step has one query, the newest token).

Grouped-query attention: `H_q = g * H_kv`, query head h reads KV head `h // g`. Nothing outside the
valid lengths is read into the result: unused pages, unused memory slots and stale freed pages may
hold anything, NaN included.

A query that sees no key at all (no memory and no visible text, e.g. a padding token with
`q_text_index = -1` in a sequence without memories, or an idle batch slot) returns exactly 0, in
every implementation (the training attention's convention too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Masked score, shared by the kernels: finite, so an all-masked running max never gives inf - inf.
MASK_VALUE = -1e30


# This package must not import grc_jax, so it keeps its own rotate-half (grc_jax.model.rope's twin).
def rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """HF's rotate-half: `[x1, x2] -> [-x2, x1]` on the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate(x: Float[Array, "... d"], angles: Float[Array, "... half"]) -> Float[Array, "... d"]:
    """RoPE rotation (HF rotate-half layout) of `x` by `angles` (one per frequency pair)."""
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)
    return x * cos + rotate_half(x) * sin


def hybrid_paged_attention_reference(
    q: Float[Array, "b t hq d"],
    q_text_index: Int[Array, "b t"],
    k_pages: Float[Array, "p s hk d"],
    v_pages: Float[Array, "p s hk d"],
    block_tables: Int[Array, "b np"],
    text_lengths: Int[Array, " b"],
    mem_k: Float[Array, "m k hk d"],
    mem_v: Float[Array, "m k hk d"],
    mem_tables: Int[Array, "b nm"],
    mem_counts: Int[Array, " b"],
    inv_freq: Float[Array, " half"],
) -> Float[Array, "b t hq d"]:
    """Attention of `q` (RoPE-rotated at its own positions) over memories + paged text."""
    b, t, hq, d = q.shape
    hk = k_pages.shape[2]
    g = hq // hk
    n_slots, num_latents = mem_tables.shape[1], mem_k.shape[1]
    page_size = k_pages.shape[1]
    scale = d**-0.5
    q32 = q.astype(jnp.float32).reshape(b, t, hk, g, d)

    # Memories: per slot j, the query rotated by -j*K against canonical keys.
    slot = jnp.arange(n_slots)
    angles = (-(slot * num_latents)).astype(jnp.float32)[:, None] * inv_freq  # [nm, half]
    q_rot = rotate(q32[:, :, None], angles[None, None, :, None, None, :])  # [b,t,nm,hk,g,d]
    mk = mem_k[mem_tables].astype(jnp.float32)  # [b, nm, K, hk, d]
    mv = mem_v[mem_tables].astype(jnp.float32)
    mem_valid = slot[None, :] < mem_counts[:, None]  # [b, nm]
    mk = jnp.where(mem_valid[:, :, None, None, None], mk, 0.0)
    mv = jnp.where(mem_valid[:, :, None, None, None], mv, 0.0)
    s_mem = jnp.einsum("btjhgd,bjkhd->bthgjk", q_rot, mk) * scale
    s_mem = jnp.where(mem_valid[:, None, None, None, :, None], s_mem, MASK_VALUE)
    s_mem = s_mem.reshape(b, t, hk, g, n_slots * num_latents)

    # Text: gather the sequence's pages into one contiguous stream.
    tk = k_pages[block_tables].astype(jnp.float32).reshape(b, -1, hk, d)  # [b, np*s, hk, d]
    tv = v_pages[block_tables].astype(jnp.float32).reshape(b, -1, hk, d)
    idx = jnp.arange(block_tables.shape[1] * page_size)
    in_len = idx[None, :] < text_lengths[:, None]  # [b, n]
    tk = jnp.where(in_len[:, :, None, None], tk, 0.0)
    tv = jnp.where(in_len[:, :, None, None], tv, 0.0)
    text_valid = in_len[:, None, :] & (idx[None, None, :] <= q_text_index[:, :, None])  # [b,t,n]
    s_text = jnp.einsum("bthgd,bnhd->bthgn", q32, tk) * scale
    s_text = jnp.where(text_valid[:, :, None, None, :], s_text, MASK_VALUE)

    scores = jnp.concatenate([s_mem, s_text], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    p_mem = probs[..., : n_slots * num_latents].reshape(b, t, hk, g, n_slots, num_latents)
    p_text = probs[..., n_slots * num_latents :]
    out = jnp.einsum("bthgjk,bjkhd->bthgd", p_mem, mv) + jnp.einsum("bthgn,bnhd->bthgd", p_text, tv)
    # No visible key: the softmax above is uniform over masked scores; the contract says 0.
    seen = mem_valid.any(axis=1)[:, None] | text_valid.any(axis=2)  # [b, t]
    out = jnp.where(seen[:, :, None, None, None], out, 0.0)
    return out.reshape(b, t, hq, d).astype(q.dtype)
