"""Constants and small rules that several layers share: the mask value and the memory modes."""

from __future__ import annotations

from typing import Literal

from grc_jax.core.errors import MemoryMismatchError

# Large finite negative for masked attention scores: a fully masked row (padding) gives a finite
# uniform softmax, never NaN. Every attention path (dense, paged reference, kernels) uses it.
MASK_VALUE = -0.7 * 3.4028234663852886e38  # -0.7 * float32 max

MemoryMode = Literal["independent", "recurrent"]
MEMORY_MODES: tuple[str, ...] = ("independent", "recurrent")


def check_memory_reads(memory_mode: str, n_memories: int, what: str) -> None:
    """The `recurrent` mode reads one running memory: refuse more (DESIGN.md section 5)."""
    if memory_mode == "recurrent" and n_memories > 1:
        raise MemoryMismatchError(
            f"{what} uses memory_mode='recurrent', whose generation reads one running memory "
            f"(fold chunks into it with `grc update`); got {n_memories}"
        )
