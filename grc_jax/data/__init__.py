"""Data: example layout and row packing (DESIGN.md sections 1-3)."""

from grc_jax.data.layout import (
    Block,
    Example,
    LayoutError,
    RowPacker,
    Span,
    gen,
    latents,
    layout_example,
    pack_examples,
    stack_rows,
    text,
)

__all__ = [
    "Block",
    "Example",
    "LayoutError",
    "RowPacker",
    "Span",
    "gen",
    "latents",
    "layout_example",
    "pack_examples",
    "stack_rows",
    "text",
]
