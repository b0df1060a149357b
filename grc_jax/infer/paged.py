"""The model over a paged KV cache and latent memories: prefill chunks and decode steps.

`paged_forward` runs `Transformer.decode` (the model's own embedding, layers and logits head) with
hybrid paged attention over each sequence's latent memories and its text pages (DESIGN.md
section 6). One function serves a prefill chunk (`C` tokens per sequence) and a decode step
(`C = 1`); shapes are fixed per engine, so each compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.model import ModelOutput
from grc_jax.model.rope import inverse_frequencies
from grc_jax.model.transformer import decode
from pallas_kernels.hybrid_paged_attention import hybrid_paged_attention


@flax.struct.dataclass
class StepInputs:
    """One prefill chunk or decode step of the engine's fixed batch (`c` tokens per sequence).

    `text_index` is each token's slot in its sequence's text stream (-1: padding, neither written
    nor attended from); `text_lengths` counts the valid text tokens including this chunk;
    `block_tables` / `mem_tables` index the page pool and the memory pool, `mem_counts` says how
    many memories each sequence reads.
    """

    # Fields are tracers inside the jitted step; the annotations are the contract.
    __no_type_check__ = True

    tokens: Int[Array, "b c"]
    roles: Int[Array, "b c"]
    positions: Int[Array, "b c"]
    text_index: Int[Array, "b c"]
    block_tables: Int[Array, "b np"]
    text_lengths: Int[Array, " b"]
    mem_tables: Int[Array, "b nm"]
    mem_counts: Int[Array, " b"]


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
    grc: GRCConfig,
    cache: dict[str, Array],
    memories: dict[str, Array],
    step: StepInputs,
    attention_impl: str = "auto",
    attention: Callable[..., Array] = hybrid_paged_attention,
    logits_index: Array | None = None,
) -> tuple[ModelOutput, dict[str, Array]]:
    """Run `step`'s tokens; returns (output with the chunk's (k, v), updated cache).

    `params` are per-layer transformer params; `cache` holds `k`, `v` `[L, n_pages, page_size, G,
    D]`; `memories` holds `k`, `v` `[L, n_mem, K, G, D]` (canonical keys). The output's `kv` is
    `[L, b, c, G, D]`, keys rotated at `positions` (what a compression pass turns into a latent
    memory). `attention` is `hybrid_paged_attention` or a function with its signature.
    `logits_index` (`[b]`): compute logits only at that chunk position of each sequence.
    """
    inv_freq = jnp.asarray(inverse_frequencies(cfg))

    def attend(layer, q, k, v, kv_cache):
        k_cache = write_pages(kv_cache["k"], k, step.block_tables, step.text_index, layer)
        v_cache = write_pages(kv_cache["v"], v, step.block_tables, step.text_index, layer)
        attended = attention(
            q, step.text_index, k_cache[layer], v_cache[layer], step.block_tables,
            step.text_lengths, memories["k"][layer], memories["v"][layer], step.mem_tables,
            step.mem_counts, inv_freq, impl=attention_impl,
        )  # fmt: skip
        return attended, {"k": k_cache, "v": v_cache}

    return decode(
        params, cfg, grc, step.tokens, step.roles, step.positions, attend, cache, logits_index
    )


def decode_attention_args(
    params: Any,
    cfg: ModelConfig,
    grc: GRCConfig,
    cache: dict[str, Array],
    memories: dict[str, Array],
    step: StepInputs,
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes and dtypes of the arguments `paged_forward` gives hybrid paged attention for `step`
    (every layer gives the same); traced abstractly, nothing is compiled or run."""
    seen: list[tuple[jax.ShapeDtypeStruct, ...]] = []

    def record(*args, impl):
        seen.append(tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
        return jnp.zeros_like(args[0])

    def run(p, c, m, s):
        paged_forward(p, cfg, grc, c, m, s, attention=record)  # only the trace is wanted

    jax.eval_shape(run, params, cache, memories, step)
    return seen[0]
