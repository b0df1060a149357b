"""The declarative HF <-> grc parameter map, one table per family, and the two conversions.

Each row of a map is `(HF tensor name, grc param path, transform)`; `{i}` stands for the layer
index in both names. A transform is a pair of exact inverse functions (reshapes and transposes
only) plus the HF shape it expects for a given grc shape, so a single row drives the import
(`hf_to_params`), the export (`params_to_hf`) and the shape checks.

HF `nn.Linear` weights are `[out, in]`; grc kernels are `[in, out]` with the attention head axis
split out: q/k/v `[d, heads, head_dim]`, o `[heads, head_dim, d]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.errors import ImportModelError
from grc_jax.model.transformer import abstract_params, stack_layers, unstack_layers

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    to_ours: Callable[[np.ndarray, Shape], np.ndarray]  # (HF array, grc shape) -> grc array
    to_hf: Callable[[np.ndarray], np.ndarray]  # grc array -> HF array
    hf_shape: Callable[[Shape], Shape]  # grc shape -> the HF shape it comes from


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a, s: a, lambda a: a, lambda s: s),
    # nn.Linear [out, in] <-> Dense kernel [in, out]
    "linear": Transform(lambda a, s: a.T, lambda a: a.T, lambda s: (s[1], s[0])),
    # q/k/v projection [heads*head_dim, d] <-> [d, heads, head_dim]
    "heads_in": Transform(
        lambda a, s: a.T.reshape(s),
        lambda a: a.reshape(a.shape[0], -1).T,
        lambda s: (s[1] * s[2], s[0]),
    ),
    # o projection [d, heads*head_dim] <-> [heads, head_dim, d]
    "heads_out": Transform(
        lambda a, s: a.T.reshape(s),
        lambda a: a.reshape(-1, a.shape[-1]).T,
        lambda s: (s[2], s[0] * s[1]),
    ),
    # q/k/v bias [heads*head_dim] <-> [heads, head_dim]
    "head_bias": Transform(
        lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],)
    ),
}


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    ours: str  # "/"-separated path, e.g. "layers_{i}/attn/q/kernel"
    transform: str
    untied_only: bool = False  # the row exists only when embeddings are not tied


@dataclasses.dataclass(frozen=True)
class ParamMap:
    global_rows: tuple[Row, ...]
    layer_rows: tuple[Row, ...]

    def extend(self, *layer_rows: Row) -> ParamMap:
        return ParamMap(self.global_rows, self.layer_rows + layer_rows)


_L = "model.layers.{i}."
LLAMA_MAP = ParamMap(
    global_rows=(
        Row("model.embed_tokens.weight", "embed", "identity"),
        Row("model.norm.weight", "final_norm/scale", "identity"),
        Row("lm_head.weight", "lm_head/kernel", "linear", untied_only=True),
    ),
    layer_rows=(
        Row(_L + "input_layernorm.weight", "layers_{i}/attn_norm/scale", "identity"),
        Row(_L + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale", "identity"),
        Row(_L + "self_attn.q_proj.weight", "layers_{i}/attn/q/kernel", "heads_in"),
        Row(_L + "self_attn.k_proj.weight", "layers_{i}/attn/k/kernel", "heads_in"),
        Row(_L + "self_attn.v_proj.weight", "layers_{i}/attn/v/kernel", "heads_in"),
        Row(_L + "self_attn.o_proj.weight", "layers_{i}/attn/o/kernel", "heads_out"),
        Row(_L + "mlp.gate_proj.weight", "layers_{i}/mlp/gate/kernel", "linear"),
        Row(_L + "mlp.up_proj.weight", "layers_{i}/mlp/up/kernel", "linear"),
        Row(_L + "mlp.down_proj.weight", "layers_{i}/mlp/down/kernel", "linear"),
    ),
)
QWEN2_MAP = LLAMA_MAP.extend(
    Row(_L + "self_attn.q_proj.bias", "layers_{i}/attn/q/bias", "head_bias"),
    Row(_L + "self_attn.k_proj.bias", "layers_{i}/attn/k/bias", "head_bias"),
    Row(_L + "self_attn.v_proj.bias", "layers_{i}/attn/v/bias", "head_bias"),
)
QWEN3_MAP = LLAMA_MAP.extend(
    Row(_L + "self_attn.q_norm.weight", "layers_{i}/attn/q_norm/scale", "identity"),
    Row(_L + "self_attn.k_norm.weight", "layers_{i}/attn/k_norm/scale", "identity"),
)
PARAM_MAPS: dict[str, ParamMap] = {"llama": LLAMA_MAP, "qwen2": QWEN2_MAP, "qwen3": QWEN3_MAP}

# HF tensors that carry no parameters (buffers some old checkpoints saved).
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def expand_rows(cfg: ModelConfig) -> list[Row]:
    """The family's map for `cfg` with `{i}` filled in for every layer (per-layer param paths)."""
    pmap = PARAM_MAPS[cfg.family]
    rows = [r for r in pmap.global_rows if not (r.untied_only and cfg.tie_embeddings)]
    for i in range(cfg.n_layers):
        rows += [Row(r.hf.format(i=i), r.ours.format(i=i), r.transform) for r in pmap.layer_rows]
    return rows


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out += _leaf_paths(v, path) if isinstance(v, Mapping) else [path]
    return out


def our_shapes(cfg: ModelConfig, grc: GRCConfig) -> dict[str, Shape]:
    """grc param path -> shape in the per-layer layout, checked against the family's map."""
    shapes, _ = abstract_params(dataclasses.replace(cfg, scan_layers=False), grc)
    flat = {p: tuple(_get(shapes, p).shape) for p in _leaf_paths(shapes)}
    mapped = {r.ours for r in expand_rows(cfg)}
    unmapped = sorted(set(flat) - mapped - {"latents"})
    absent = sorted(mapped - set(flat))
    if unmapped or absent:  # cfg flags (qkv_bias, qk_norm) that the family's map does not describe
        raise ImportModelError(
            f"the {cfg.family} parameter map does not match this ModelConfig: "
            f"params without a row {unmapped}, rows without a param {absent}"
        )
    return flat


def expected_hf_shapes(cfg: ModelConfig, grc: GRCConfig | None = None) -> dict[str, Shape]:
    """HF tensor name -> the shape an importable checkpoint must have."""
    shapes = our_shapes(cfg, grc or GRCConfig())
    return {r.hf: TRANSFORMS[r.transform].hf_shape(shapes[r.ours]) for r in expand_rows(cfg)}


def _shape_error(name: str, got: Shape, want: Shape, ours: str) -> ImportModelError:
    return ImportModelError(
        f"tensor {name!r} has shape {tuple(got)}, expected {tuple(want)} (for grc param {ours!r})"
    )


def _names(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def init_latents(embed: np.ndarray, cfg: ModelConfig, grc: GRCConfig, seed: int) -> np.ndarray:
    """The latent table `[K, d]`, initialised as `grc.latent_init` says (seeded, deterministic)."""
    rng = np.random.default_rng(seed)
    shape = (grc.num_latents, cfg.d_model)
    if grc.latent_init == "mean_embedding":
        mean = embed.astype(np.float64).mean(axis=0)
        return (mean + rng.normal(0.0, grc.latent_init_noise, shape)).astype(np.float32)
    return rng.normal(0.0, cfg.init_std, shape).astype(np.float32)


def hf_to_params(
    tensors: Mapping[str, Any], cfg: ModelConfig, grc: GRCConfig, seed: int = 0
) -> dict[str, Any]:
    """grc float32 params from HF-named tensors (numpy-convertible arrays of any float dtype).

    Every param is filled; a missing tensor, a tensor of the wrong shape or an unexpected extra
    tensor raises an `ImportModelError` (a `ValueError`) naming it. Latents are initialised per
    `grc.latent_init`; the result is in the scanned layout when `cfg.scan_layers`.
    """
    shapes = our_shapes(cfg, grc)
    rows = expand_rows(cfg)
    missing = [r.hf for r in rows if r.hf not in tensors]
    if missing:
        raise ImportModelError(f"checkpoint is missing {len(missing)} tensor(s): {_names(missing)}")
    params: dict[str, Any] = {}
    for r in rows:
        arr = np.asarray(tensors[r.hf])
        want = TRANSFORMS[r.transform].hf_shape(shapes[r.ours])
        if arr.shape != want:
            raise _shape_error(r.hf, arr.shape, want, r.ours)
        value = TRANSFORMS[r.transform].to_ours(arr.astype(np.float32), shapes[r.ours])
        _set(params, r.ours, np.ascontiguousarray(value))

    used = {r.hf for r in rows}
    extra = sorted(n for n in tensors if n not in used and not IGNORED_HF_TENSORS.search(n))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        head = np.asarray(tensors["lm_head.weight"])
        if head.shape != params["embed"].shape:
            raise _shape_error("lm_head.weight", head.shape, params["embed"].shape, "embed (tied)")
        if not np.array_equal(head.astype(np.float32), params["embed"]):
            raise ImportModelError(
                "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the config "
                "ties embeddings (tie_word_embeddings=true)"
            )
        extra.remove("lm_head.weight")
    if extra:
        raise ImportModelError(f"checkpoint has {len(extra)} unexpected tensor(s): {_names(extra)}")

    params["latents"] = init_latents(params["embed"], cfg, grc, seed)
    params = jax.tree.map(jnp.asarray, params)
    if cfg.scan_layers:
        params = stack_layers(params, cfg.n_layers)
    return params


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params` (latents dropped): HF tensor name -> float32 numpy array."""
    if "layers" in params:
        params = unstack_layers(params, cfg.n_layers)
    out = {}
    for r in expand_rows(cfg):
        value = np.asarray(_get(params, r.ours), dtype=np.float32)
        out[r.hf] = np.ascontiguousarray(TRANSFORMS[r.transform].to_hf(value))
    return out
