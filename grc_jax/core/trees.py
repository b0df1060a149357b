"""Pytree path helpers shared by the optimizer, LoRA and sharding code."""

from __future__ import annotations

from typing import Any

import jax


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Names along a pytree key path: dict keys, dataclass fields and sequence indices."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        else:
            names.append(str(k))
    return tuple(names)
