"""LoRA on the attention and MLP projections, for cheap GRC-tuning of large imported models.

Each targeted kernel `W` gets factors `a [in, r]` (random) and `b [r, out]` (zeros, so training
starts exactly at the base model); the forward pass uses `W + a @ b` reshaped to `W`'s shape.
With scanned layers the factors carry the same leading layer axis.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# projection name -> number of leading input dims of its kernel (after any layer axis)
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def _targets(model_params: Any, scanned: bool):
    """Yield (path tuple, kernel, n_lead, n_in) for every LoRA-targeted kernel."""
    flat = jax.tree_util.tree_flatten_with_path(model_params)[0]
    for path, leaf in flat:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        if len(names) >= 2 and names[-1] == "kernel" and names[-2] in TARGETS:
            yield names, leaf, int(scanned), TARGETS[names[-2]]


def init_lora(model_params: Any, rank: int, scanned: bool, rng: jax.Array) -> dict[str, Any]:
    lora = {}
    for i, (names, w, n_lead, n_in) in enumerate(_targets(model_params, scanned)):
        lead = w.shape[:n_lead]
        d_in = math.prod(w.shape[n_lead : n_lead + n_in])
        d_out = math.prod(w.shape[n_lead + n_in :])
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, d_in, rank)) * d_in**-0.5
        lora["/".join(names)] = {"a": a, "b": jnp.zeros((*lead, rank, d_out))}
    return lora


def merge_lora(model_params: Any, lora: dict[str, Any], scanned: bool) -> Any:
    """Model params with every targeted kernel replaced by `W + a @ b`."""
    merged = jax.tree.map(lambda x: x, model_params)  # a shallow structural copy
    for names, w, _n_lead, _n_in in _targets(model_params, scanned):
        f = lora["/".join(names)]
        delta = jnp.einsum("...ir,...ro->...io", f["a"], f["b"]).reshape(w.shape)
        node = merged
        for key in names[:-1]:
            node = node[key]
        node[names[-1]] = w + delta.astype(w.dtype)
    return merged
