"""Latent memories: the canonical per-layer K/V of one block's K latent tokens (DESIGN.md 3, 5).

Keys are stored rotated as if the latents sat at positions 0..K-1, so a memory is independent of
where it was made and can be shared by any request (which then reads memory j at positions
`[j*K, (j+1)*K)` by counter-rotating its query). A memory records which model made it; reading a
memory from another model (or another K / memory mode) is refused with an error naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grc_jax.core.config import EXECUTION_FIELDS, Config
from grc_jax.core.errors import MemoryMismatchError, MissingPathError, UserError
from grc_jax.model import unstack_layers
from grc_jax.model.params import GRCParams


class MemoryFormatError(UserError, ValueError):
    """A file or array is not a well-formed grc latent memory."""


def model_fingerprint(cfg: Config, params: Any) -> str:
    """Identifies the model that makes/reads memories: architecture plus a digest of the params.

    Execution options (`EXECUTION_FIELDS`: compute dtype, remat, scanned layers, attention layout)
    do not change which model it is: the architecture digest leaves them out, and scanned
    (stacked) layers are digested per layer.
    """
    arch = dataclasses.asdict(cfg.model)
    for key in EXECUTION_FIELDS:
        arch.pop(key)
    if isinstance(params, GRCParams) and "layers" in params.model:
        params = params.replace(model=unstack_layers(params.model, cfg.model.n_layers))
    digest = hashlib.sha256()
    digest.update(json.dumps(arch, sort_keys=True).encode())
    digest.update(f"K={cfg.grc.num_latents};mode={cfg.grc.memory_mode}".encode())
    for leaf in jax.tree.leaves(params):
        # A sparse sample taken on the device: cheap and stable, no host copy of the weights.
        flat = jax.numpy.ravel(leaf)
        sample = np.asarray(flat[:: max(1, flat.size // 64)], np.float32)
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class LatentMemory:
    """k, v: `[n_layers, K, n_kv_heads, head_dim]` float32 (keys canonical)."""

    k: np.ndarray
    v: np.ndarray
    model: str  # model_fingerprint of the model that made it
    num_latents: int
    memory_mode: str
    source_tokens: int = 0  # how many text tokens this memory stands for

    def __post_init__(self):
        if self.k.shape != self.v.shape or self.k.ndim != 4:
            raise MemoryFormatError(
                f"latent memory: k {self.k.shape} and v {self.v.shape} must be equal 4-D"
            )
        if self.k.shape[1] != self.num_latents:
            raise MemoryFormatError(
                f"latent memory: {self.k.shape[1]} latent rows but num_latents={self.num_latents}"
            )

    def check_compatible(self, fingerprint: str, cfg: Config, what: str = "memory") -> None:
        m = cfg.model
        want = (m.n_layers, cfg.grc.num_latents, m.n_kv_heads, m.head_dim)
        if self.k.shape != want:
            raise MemoryMismatchError(
                f"{what}: shape {self.k.shape} (layers, K, kv heads, head dim) does not fit this "
                f"model's {want}"
            )
        if self.memory_mode != cfg.grc.memory_mode:
            raise MemoryMismatchError(
                f"{what}: made in memory_mode={self.memory_mode!r}, this model uses "
                f"{cfg.grc.memory_mode!r}"
            )
        if self.model != fingerprint:
            raise MemoryMismatchError(
                f"{what}: made by model {self.model}, but this model is {fingerprint}; "
                "memories are only meaningful to the model that made them"
            )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {
            "format": "grc-latent-memory/1",
            "model": self.model,
            "num_latents": str(self.num_latents),
            "memory_mode": self.memory_mode,
            "source_tokens": str(self.source_tokens),
        }
        save_file(
            {"k": np.ascontiguousarray(self.k), "v": np.ascontiguousarray(self.v)}, str(path), meta
        )

    @classmethod
    def load(cls, path: str | Path) -> LatentMemory:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"memory file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except Exception as e:  # safetensors raises several types for foreign files
            raise MemoryFormatError(f"{path}: not a grc latent memory file ({e})") from None
        missing = [k for k in ("model", "num_latents", "memory_mode") if k not in meta]
        if meta.get("format") == "grc-latent-memory/1" and missing:
            raise MemoryFormatError(f"{path}: latent memory file lacks metadata {missing}")
        if meta.get("format") != "grc-latent-memory/1":
            raise MemoryFormatError(
                f"{path}: not a grc latent memory file (format {meta.get('format')!r})"
            )
        return cls(
            k=k, v=v, model=meta["model"], num_latents=int(meta["num_latents"]),
            memory_mode=meta["memory_mode"], source_tokens=int(meta.get("source_tokens", 0)),
        )  # fmt: skip
