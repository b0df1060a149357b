"""The paged text KV cache of the inference engine: page pool, block tables, empty cache."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from grc_jax.core.config import ModelConfig
from grc_jax.core.errors import OutOfPagesError, UsageError


class PagePool:
    """Allocator over `n_pages` fixed-size pages. Page 0 is never handed out (a safe filler for
    unused block-table entries); freed pages go back to the free list and may hold stale data,
    which attention never reads (it masks by length)."""

    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 2:
            raise UsageError(f"n_pages: expected at least 2 (page 0 is reserved), got {n_pages}")
        self.n_pages, self.page_size = n_pages, page_size
        self._free = list(range(n_pages - 1, 0, -1))
        self.owner: dict[int, int] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.page_size))

    def alloc(self, request: int, tokens: int) -> list[int]:
        n = self.pages_for(tokens)
        if n > len(self._free):
            raise OutOfPagesError(
                f"request {request} needs {n} pages of {self.page_size} tokens, "
                f"{len(self._free)} free of {self.n_pages - 1}"
            )
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.owner[p] = request
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self.owner.pop(p, None) is None:
                raise ValueError(f"page {p} is not allocated")
            self._free.append(p)


def empty_cache(cfg: ModelConfig, n_pages: int, page_size: int, dtype=jnp.float32) -> dict:
    shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def block_table(pages: list[int], width: int) -> np.ndarray:
    if len(pages) > width:
        raise OutOfPagesError(f"a request needs {len(pages)} pages, the block table holds {width}")
    row = np.zeros(width, np.int32)
    row[: len(pages)] = pages
    return row
