"""Hybrid paged attention: latent memories + paged text KV, one softmax (DESIGN.md section 6).

`hybrid_paged_attention` is the entry point of the decode loop. `impl` chooses the implementation:

- "auto" (default): the Pallas kernel of the current backend for decode steps (`tpu.py` on TPU,
  `gpu.py` on GPU), the pure-JAX reference on CPU and for prefill chunks (more than one query
  token per sequence); on a GPU, shapes the kernel does not support also fall back to the reference;
- "reference", "tpu", "gpu": force one. A kernel forced on another backend runs in its Pallas
  interpreter (slow; for tests), and prefill chunks still use the reference.

`usable_impl` is the start-up check of a long-lived caller (the inference engine): it lowers and
compiles the kernel an `impl` selects once, on the caller's decode shapes, and answers "reference"
(with one log line) when that fails, so a kernel that does not compile cannot take the caller down.
"""

from __future__ import annotations

import functools
import logging

import jax

from pallas_kernels.hybrid_paged_attention.reference import (
    hybrid_paged_attention_reference,
    rotate,
)

IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")
_log = logging.getLogger(__name__)


def resolve_impl(impl: str, query_tokens: int, backend: str | None = None) -> str:
    """The implementation that `hybrid_paged_attention` will run for this call."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"hybrid attention impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        impl = backend if backend in ("tpu", "gpu") else "reference"
    if query_tokens != 1:
        return "reference"  # the kernels are decode kernels
    return impl


def hybrid_paged_attention(*args, impl: str = "auto", **kwargs):
    """Dispatch to an implementation; `hybrid_paged_attention_reference` defines the contract."""
    backend = jax.default_backend()
    chosen = resolve_impl(impl, args[0].shape[1], backend)
    if chosen == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.hybrid_paged_attention.tpu import hybrid_paged_attention_tpu

        interpret = None if backend == "tpu" else pltpu.InterpretParams()
        return hybrid_paged_attention_tpu(*args, interpret=interpret, **kwargs)
    if chosen == "gpu":
        from pallas_kernels.hybrid_paged_attention.gpu import hybrid_paged_attention_gpu

        try:
            return hybrid_paged_attention_gpu(*args, interpret=backend != "gpu", **kwargs)
        except ValueError as e:
            if impl != "auto":
                raise
            _log.warning("GPU hybrid attention kernel unavailable for these shapes (%s); "
                         "using the reference", e)  # fmt: skip
    return hybrid_paged_attention_reference(*args, **kwargs)


def usable_impl(impl: str, *args: jax.ShapeDtypeStruct) -> str:
    """`impl`, or "reference" when the decode kernel it selects here fails to lower or compile.

    `args` are the shapes and dtypes of one decode step's arguments (`hybrid_paged_attention`'s
    positional arguments). Nothing is compiled when `impl` selects the reference. A failure is
    logged once, as one WARNING line naming the kernel, the backend and the error's first line.
    """
    backend = jax.default_backend()
    chosen = resolve_impl(impl, args[0].shape[1], backend)
    if chosen == "reference":
        return impl
    try:
        jax.jit(functools.partial(hybrid_paged_attention, impl=chosen)).lower(*args).compile()
    except Exception as e:  # any failure of the kernel's lowering or compile: fall back
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        _log.warning(
            "hybrid paged attention: the %s kernel does not compile on backend %s (%s: %s); "
            "using the reference implementation instead",
            chosen, backend, type(e).__name__, first_line.strip(),
        )  # fmt: skip
        return "reference"
    return impl


__all__ = [
    "IMPLEMENTATIONS",
    "hybrid_paged_attention",
    "hybrid_paged_attention_reference",
    "resolve_impl",
    "rotate",
    "usable_impl",
]
