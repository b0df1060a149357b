"""Hybrid paged attention: latent memories + paged text KV, one softmax (DESIGN.md section 6).

`hybrid_paged_attention` is the entry point the decode loop calls; `impl` picks the
implementation ("reference" today; the Pallas TPU/GPU kernels plug in behind the same signature).
"""

from pallas_kernels.hybrid_paged_attention.reference import (
    hybrid_paged_attention_reference,
    rotate,
)

IMPLEMENTATIONS = ("auto", "reference")


def hybrid_paged_attention(*args, impl: str = "auto", **kwargs):
    """Dispatch to an implementation; see `hybrid_paged_attention_reference` for the contract."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"hybrid attention impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    return hybrid_paged_attention_reference(*args, **kwargs)


__all__ = ["hybrid_paged_attention", "hybrid_paged_attention_reference", "rotate"]
