"""LoRA on the attention and MLP projections, for cheap GRC-tuning of large imported models.

Each targeted kernel `W` gets factors `a [in, r]` (random) and `b [r, out]` (zeros, so training
starts exactly at the base model). With scanned layers the factors carry the same leading layer
axis. Two equivalent ways to run them:

- training passes the factors to the model unmerged (`lora_collection`, read by `add_lora` in
  every targeted projection): `y = x W + (x a) b`. Its gradient needs only rank-r products, where
  differentiating a merged `W + a b` would form the full `[in, out]` weight gradient `x^T dy` of
  every projection, as costly as training the base itself;
- inference and export merge them once (`merge_lora`): `W + a @ b` reshaped to `W`'s shape.
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


def lora_collection(lora: dict[str, Any]) -> dict[str, Any]:
    """The flat `{"layers_0/attn/q/kernel": {"a", "b"}}` factors as the model's `lora` variable
    collection, nested like the params: `{"layers_0": {"attn": {"q": {"a", "b"}}}}`."""
    nested: dict[str, Any] = {}
    for key, factors in lora.items():
        *scopes, _kernel = key.split("/")
        node = nested
        for name in scopes[:-1]:
            node = node.setdefault(name, {})
        node[scopes[-1]] = factors
    return nested


def add_lora(module: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y + (x a) b` when the `lora` collection holds factors for `module` (a targeted projection,
    whose `y` is `x`'s projection), else `y`. `x`'s trailing input dims are flattened to `a`'s
    `in`; the factors are cast to `y`'s (compute) dtype."""
    if not module.has_variable("lora", "a"):
        return y
    a = module.get_variable("lora", "a").astype(y.dtype)
    b = module.get_variable("lora", "b").astype(y.dtype)
    x_ti = x.astype(y.dtype).reshape(-1, a.shape[0])
    return y + lora_delta(x_ti, a, b).reshape(y.shape)


@jax.custom_vjp
def lora_delta(x_ti: jax.Array, a_ir: jax.Array, b_ro: jax.Array) -> jax.Array:
    """`(x a) b` over flattened tokens `[t, in]`, with a hand-written backward.

    Autodiff of the same product makes XLA on CPU copy the `[t, out]` output gradient into a
    transposed layout (fused with whatever produced it) for `db`, which cost more than the base
    projection's own backward; these einsums contract the token axis in place.
    """
    return (x_ti @ a_ir) @ b_ro


def _lora_delta_fwd(x_ti, a_ir, b_ro):
    xa_tr = x_ti @ a_ir
    return xa_tr @ b_ro, (x_ti, a_ir, b_ro, xa_tr)


def _lora_delta_bwd(res, dy_to):
    x_ti, a_ir, b_ro, xa_tr = res
    dxa_tr = dy_to @ b_ro.T
    dx_ti = dxa_tr @ a_ir.T
    da_ir = jnp.einsum("ti,tr->ir", x_ti, dxa_tr)
    db_ro = jnp.einsum("tr,to->ro", xa_tr, dy_to)
    return dx_ti, da_ir, db_ro


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


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
