"""Data: example layout and row packing (DESIGN.md sections 1-3)."""

from grc_jax.data.layout import (
    ROW_KEYS,
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
    "ROW_KEYS",
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
