"""GRC modes in PyTorch for a `grc export` directory (the `trust_remote_code` file of an export).

`grc export` copies this file into the export as `modeling_grc.py` and registers it in
`config.json`'s `auto_map`, so that

    model = AutoModel.from_pretrained(export_dir, trust_remote_code=True)

returns the family's causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`)
with the GRC modes added:

- `model.embed(texts, tokenizer=tok, self_reason=False)` -> unit-norm embeddings `[n, dim]`;
- `model.compress(texts, tokenizer=tok)` -> `GRCMemory`s (canonical per-layer K/V of K latents,
  each with its `.embedding`);
- `model.generate(input_ids, memories=[...])`: generation in a consumer block over memories;
  without `memories`, `generate` is the base class's own, unchanged;
- `model.update(memory, chunk, tokenizer=tok)` (`recurrent` exports only).

Semantics (grc-jax DESIGN.md sections 2, 3 and 5), reproduced with an explicit boolean
attention mask, explicit RoPE positions and latent input embeddings:

- text never attends to latent tokens; latents see their whole block;
- `independent`: a compression block's latents sit at positions `0..K-1` and its text just before
  them (negative positions); memory `j` is read at positions `[j*K, (j+1)*K)` and the consumer
  block starts at `M*K`;
- `recurrent`: positions run on through the example; a block reads the one running memory at
  `0..K-1` and starts at `K`;
- a memory's keys are stored canonically (rotated as if at `0..K-1`); a reader rotates memory `j`'s
  keys on by `j*K` (RoPE rotations compose).

Every GRC input is `[bos] + text tokens`, as in grc-jax; `model.grc_encode(texts, tokenizer)` builds
that, and every method also takes token-id lists (or a `[B, T]` tensor plus `attention_mask`)
used as they are. Memory files are grc-jax's (`grc-latent-memory/1` safetensors), so memories
move between the JAX engine and this module when they come from the same weights.

This file depends on torch, transformers and safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
from transformers import LlamaForCausalLM

try:
    from transformers import Qwen2ForCausalLM
except ImportError:  # a transformers without Qwen2
    Qwen2ForCausalLM = None
try:
    from transformers import Qwen3ForCausalLM
except ImportError:  # transformers < 4.51
    Qwen3ForCausalLM = None

GRC_CONFIG_NAME = "grc_config.json"
GRC_TENSORS_NAME = "grc/latents.safetensors"
EXPORT_FORMAT = "grc-export/1"
MEMORY_FORMAT = "grc-latent-memory/1"
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "local_files_only",
    "subfolder",
)
_MASKED = torch.finfo(torch.float32).min  # finite: a fully masked (padding) row stays NaN-free


# ------------------------------------------------------------------------------------ memories


@dataclasses.dataclass
class GRCMemory:
    """A latent memory: `k`, `v` float32 `[n_layers, K, n_kv_heads, head_dim]`, keys canonical.

    The same content as grc-jax's `LatentMemory`; `save` / `load` use its file format.
    `embedding` (not stored in the file) is the memory's text embedding when `compress` made it.
    """

    k: torch.Tensor
    v: torch.Tensor
    model: str  # fingerprint of the weights that made it (grc_config.json `model_fingerprint`)
    num_latents: int
    memory_mode: str
    source_tokens: int = 0
    embedding: torch.Tensor | None = None

    def __post_init__(self):
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(
                f"latent memory: k {tuple(self.k.shape)} and v {tuple(self.v.shape)} must be "
                "equal 4-D tensors [n_layers, K, n_kv_heads, head_dim]"
            )
        if self.k.shape[1] != self.num_latents:
            raise ValueError(
                f"latent memory: {self.k.shape[1]} latent rows but num_latents={self.num_latents}"
            )

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {
            "format": MEMORY_FORMAT,
            "model": self.model,
            "num_latents": str(self.num_latents),
            "memory_mode": self.memory_mode,
            "source_tokens": str(self.source_tokens),
        }
        tensors = {
            "k": self.k.detach().float().cpu().contiguous(),
            "v": self.v.detach().float().cpu().contiguous(),
        }
        save_file(tensors, str(path), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GRCMemory:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"memory file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except Exception as e:  # safetensors raises several types for foreign files
            raise ValueError(f"{path}: not a grc latent memory file ({e})") from None
        if meta.get("format") != MEMORY_FORMAT:
            raise ValueError(
                f"{path}: not a grc latent memory file (format {meta.get('format')!r})"
            )
        missing = [key for key in ("model", "num_latents", "memory_mode") if key not in meta]
        if missing:
            raise ValueError(f"{path}: latent memory file lacks metadata {missing}")
        return cls(
            k=k.float(),
            v=v.float(),
            model=meta["model"],
            num_latents=int(meta["num_latents"]),
            memory_mode=meta["memory_mode"],
            source_tokens=int(meta.get("source_tokens", 0)),
        )


@dataclasses.dataclass
class GRCGenerateOutput:
    """`generate(..., memories=..., return_dict_in_generate=True)`: like transformers' output.

    `sequences` `[B, T + new]` (left-padded prompts, then the new tokens, `pad_token_id` after a
    row stopped); `scores` one `[B, vocab]` float32 tensor per step (the logits each token was
    chosen from), when `output_scores` or `output_logits` was set.
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None

    @property
    def logits(self) -> tuple[torch.Tensor, ...] | None:
        return self.scores


# ------------------------------------------------------------------------------------ numerics


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """`[head_dim // 2]` float32 inverse frequencies (default or llama3-scaled), as HF computes."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv = 1.0 / (torch.tensor(float(theta), dtype=torch.float32) ** exponents)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"grc_config.json: unsupported rope_scaling type {kind!r}")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled).to(torch.float32)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE ("rotate half") on `x [B, T, heads, D]` with `cos`/`sin` `[B, T, D]`, in float32."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention with grouped KV heads; scores and softmax in float32.

    q `[B, T, H, D]`, k and v `[B, S, G, D]`, mask bool `[B, T, S]` -> `[B, T, H, D]`.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    qg = q.float().reshape(b, t, g, h // g, d)
    scores = torch.einsum("btgqd,bsgd->bgqts", qg, k.float()) * (d**-0.5)
    scores = scores.masked_fill(~mask[:, None, None, :, :], _MASKED)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bgqts,bsgd->btgqd", probs, v)
    return out.reshape(b, t, h, d)


def _pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `[B, T]` ids and the bool mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[b, width - len(r) :] = True
    return ids, valid


def _sample(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Next token per row: argmax, or a draw after temperature / top-k / top-p filtering."""
    if not do_sample or temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ------------------------------------------------------------------------------------ the mixin


class GRCMixin:
    """The GRC modes, mixed into a Llama / Qwen2 / Qwen3 causal LM (see the module docstring)."""

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        model.load_grc(pretrained_model_name_or_path, **hub)
        return model

    def load_grc(self, path: str | os.PathLike, **hub_kwargs) -> None:
        """Read `grc_config.json` and the latent table (and projection) of an export."""
        from safetensors.torch import load_file

        with open(_resolve(path, GRC_CONFIG_NAME, hub_kwargs)) as f:
            grc = json.load(f)
        if grc.get("format") != EXPORT_FORMAT:
            raise ValueError(
                f"{path}: {GRC_CONFIG_NAME} has format {grc.get('format')!r}, "
                f"expected {EXPORT_FORMAT!r}"
            )
        tensors = load_file(_resolve(path, GRC_TENSORS_NAME, hub_kwargs))
        latents = tensors["latents"]
        want = (grc["num_latents"], self.config.hidden_size)
        if tuple(latents.shape) != want:
            raise ValueError(
                f"{path}: latent table has shape {tuple(latents.shape)}, expected {want} "
                "(num_latents, hidden_size)"
            )
        self.grc_config = grc
        embed = self.get_input_embeddings().weight
        self.register_buffer(
            "grc_latents", latents.to(device=embed.device, dtype=embed.dtype), persistent=False
        )
        projection = tensors.get("projection")
        if projection is not None:
            projection = projection.to(device=embed.device, dtype=torch.float32)
        self.register_buffer("grc_projection", projection, persistent=False)
        rope = grc["rope"]
        self._grc_inv_freq = rope_inverse_frequencies(
            self._grc_head_dim(), rope["theta"], rope.get("scaling")
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus the GRC files (config, latents) when this model has them."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        grc = getattr(self, "grc_config", None)
        if grc is not None:
            from safetensors.torch import save_file

            with open(os.path.join(save_directory, GRC_CONFIG_NAME), "w") as f:
                f.write(json.dumps(grc, indent=2) + "\n")
            tensors = {"latents": self.grc_latents.detach().cpu().contiguous()}
            if self.grc_projection is not None:
                tensors["projection"] = self.grc_projection.detach().cpu().contiguous()
            os.makedirs(
                os.path.join(save_directory, os.path.dirname(GRC_TENSORS_NAME)), exist_ok=True
            )
            save_file(tensors, os.path.join(save_directory, GRC_TENSORS_NAME), {"format": "pt"})
        return out

    # ----------------------------------------------------------------- settings

    def _grc(self) -> dict:
        grc = getattr(self, "grc_config", None)
        if grc is None:
            raise RuntimeError(
                "GRC tensors are not loaded: use from_pretrained(export_dir, "
                "trust_remote_code=True) or call load_grc(export_dir)"
            )
        return grc

    def _grc_head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def num_latents(self) -> int:
        return int(self._grc()["num_latents"])

    @property
    def memory_mode(self) -> str:
        return self._grc()["memory_mode"]

    @property
    def model_fingerprint(self) -> str:
        return self._grc()["model_fingerprint"]

    def _grc_special(self, name: str) -> int:
        return int(self._grc()[name])

    # ----------------------------------------------------------------- inputs

    def grc_encode(self, texts: list[str], tokenizer) -> list[list[int]]:
        """`[bos] + tokens` per text (no other special tokens): what grc-jax feeds its model."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i}: expected non-empty text, got {t!r}")
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[self._grc_special("bos_token_id"), *map(int, row)] for row in ids]

    def _grc_id_lists(self, inputs, tokenizer=None, attention_mask=None, what="inputs"):
        """Token-id lists from texts (with `tokenizer`), id lists, or a `[B, T]` tensor + mask."""
        if isinstance(inputs, str):
            raise TypeError(f"{what}: expected a list of texts, got one string")
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs[None]
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
            mask = mask.reshape(ids.shape).to(torch.bool)
            rows = [row[m].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        else:
            inputs = list(inputs)
            if inputs and all(isinstance(t, str) for t in inputs):
                if tokenizer is None:
                    raise ValueError(f"{what}: texts need `tokenizer=` (or pass token ids)")
                rows = self.grc_encode(inputs, tokenizer)
            else:
                rows = [[int(t) for t in row] for row in inputs]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"{what}: row {i} is empty")
        return rows

    def _grc_memory_lists(self, memories, batch: int) -> list[list[GRCMemory]]:
        """One list of memories per row from a memory, a shared list, or a list per row."""
        if isinstance(memories, GRCMemory):
            lists = [[memories]] * batch
        else:
            memories = list(memories)
            if all(isinstance(m, GRCMemory) for m in memories):  # shared (or no memory at all)
                lists = [memories] * batch
            else:
                lists = [list(row) for row in memories]
        if len(lists) != batch:
            raise ValueError(f"{batch} prompts but {len(lists)} memory lists")
        for b, row in enumerate(lists):
            if self.memory_mode == "recurrent" and len(row) > 1:
                raise ValueError(
                    f"request {b}: recurrent mode reads one running memory, got {len(row)}"
                )
            for j, m in enumerate(row):
                self.check_memory(m, f"request {b} memory {j}")
        return lists

    def check_memory(self, memory: GRCMemory, what: str = "memory") -> None:
        """Refuse a memory of another shape, K, memory mode or model (by fingerprint)."""
        if not isinstance(memory, GRCMemory):
            raise TypeError(f"{what}: expected a GRCMemory, got {type(memory).__name__}")
        c = self.config
        want = (c.num_hidden_layers, self.num_latents, c.num_key_value_heads, self._grc_head_dim())
        if tuple(memory.k.shape) != want:
            raise ValueError(
                f"{what}: shape {tuple(memory.k.shape)} (layers, K, kv heads, head dim) does not "
                f"fit this model's {want}"
            )
        if memory.memory_mode != self.memory_mode:
            raise ValueError(
                f"{what}: made in memory_mode={memory.memory_mode!r}, this model uses "
                f"{self.memory_mode!r}"
            )
        if memory.model != self.model_fingerprint:
            raise ValueError(
                f"{what}: made by model {memory.model}, but this model is "
                f"{self.model_fingerprint}; a memory only suits the model that made it"
            )

    # ----------------------------------------------------------------- the GRC forward pass

    def _grc_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._grc_inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * inv
        angles = torch.cat([angles, angles], dim=-1)
        return torch.cos(angles), torch.sin(angles)

    def _grc_inputs_embeds(self, ids: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Vocabulary embeddings, and latent-table rows at latent slots (`ids` = latent index)."""
        tok = self.get_input_embeddings()(torch.where(latent, torch.zeros_like(ids), ids))
        lat = self.grc_latents[torch.where(latent, ids, torch.zeros_like(ids))]
        return torch.where(latent[..., None], lat.to(tok.dtype), tok)

    def _grc_forward(self, ids, latent, valid, positions, past=None, past_valid=None):
        """Run the decoder layers with GRC visibility; returns (final-norm hidden, per-layer kv).

        ids/latent/valid/positions `[B, T]`; `past` per layer `(k, v)` `[B, S, G, D]` of keys
        rotated at their positions (memories, earlier tokens) and `past_valid` `[B, S]`: every
        real query sees every valid past key. Within the new tokens: causal by index, and text
        never sees latents. The per-layer kv returned is `(k before RoPE, k rotated, v)`.
        """
        base = self.model
        b, t = ids.shape
        d = self._grc_head_dim()
        x = self._grc_inputs_embeds(ids, latent)
        cos, sin = self._grc_angles(positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        mask = causal[None] & valid[:, None, :] & ~(latent[:, None, :] & ~latent[:, :, None])
        if past is not None:
            mask = torch.cat([past_valid[:, None, :].expand(b, t, -1), mask], dim=-1)
        kvs = []
        for i, layer in enumerate(base.layers[: self.config.num_hidden_layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, -1, d)
            k = attn.k_proj(h).view(b, t, -1, d)
            v = attn.v_proj(h).view(b, t, -1, d)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = k_rot, v
            if past is not None:
                keys = torch.cat([past[i][0].to(k_rot.dtype), k_rot], dim=1)
                values = torch.cat([past[i][1].to(v.dtype), v], dim=1)
            out = _attend(q_rot, keys, values, mask)
            x = x + attn.o_proj(out.reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            kvs.append((k, k_rot, v))
        return base.norm(x), kvs

    def _grc_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.get_output_embeddings()(hidden).float()

    def _grc_memory_prefix(self, lists: list[list[GRCMemory]]):
        """Per layer `(k, v)` `[B, S, G, D]` of each row's memories at `[j*K, (j+1)*K)`."""
        device, c = self.device, self.config
        K = self.num_latents
        width = max(len(row) for row in lists) * K
        n_layers, g, d = c.num_hidden_layers, c.num_key_value_heads, self._grc_head_dim()
        k = torch.zeros(n_layers, len(lists), width, g, d, device=device)
        v = torch.zeros_like(k)
        valid = torch.zeros(len(lists), width, dtype=torch.bool, device=device)
        for b, row in enumerate(lists):
            for j, m in enumerate(row):
                # Canonical keys sit at 0..K-1; rotating them on by j*K puts them at j*K + k.
                offset = torch.full((n_layers, K), j * K, device=device)
                cos, sin = self._grc_angles(offset)
                k[:, b, j * K : (j + 1) * K] = _rotate(m.k.to(device).float(), cos, sin)
                v[:, b, j * K : (j + 1) * K] = m.v.to(device).float()
                valid[b, j * K : (j + 1) * K] = True
        return [(k[i], v[i]) for i in range(n_layers)], valid

    # ----------------------------------------------------------------- compression passes

    def _grc_compression_pass(self, rows, text_starts, past=None, past_valid=None):
        """`[text][LATENT x K]` per row (left-padded); text of row b starts at `text_starts[b]`.

        Returns (latents' final-norm hidden `[B, K, d]`, per-layer (canonical k, v) of the latents
        `[B, K, G, D]`).
        """
        K, device = self.num_latents, self.device
        full = [r + list(range(K)) for r in rows]
        ids, valid = _pad_left(full, self._grc_special("pad_token_id"))
        width = ids.shape[1]
        latent = torch.zeros_like(valid)
        latent[:, width - K :] = True
        positions = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            n = len(r)
            positions[b, width - n - K :] = torch.arange(n + K) + text_starts[b]
        ids, valid, latent, positions = (a.to(device) for a in (ids, valid, latent, positions))
        hidden, kvs = self._grc_forward(ids, latent, valid, positions, past, past_valid)
        canon = torch.arange(K, device=device).expand(len(rows), K)
        cos, sin = self._grc_angles(canon)
        layer_kv = [(_rotate(k[:, -K:], cos, sin), v[:, -K:]) for k, _, v in kvs]
        return hidden[:, -K:], layer_kv

    def _grc_embedding(self, latent_hidden: torch.Tensor) -> torch.Tensor:
        h = latent_hidden.float()
        pooled = h.mean(dim=1) if self._grc()["pooling"] == "mean" else h[:, -1]
        if self.grc_projection is not None:
            pooled = pooled @ self.grc_projection.float()
        return pooled * torch.rsqrt((pooled * pooled).sum(-1, keepdim=True) + 1e-12)

    def _grc_text_starts(self, rows: list[list[int]]) -> list[int]:
        """Where block 0's text starts: latents at 0..K-1 (independent) or right after the text."""
        if self.memory_mode == "independent":
            return [-len(r) for r in rows]
        return [0] * len(rows)

    @torch.no_grad()
    def embed(
        self,
        inputs,
        tokenizer=None,
        *,
        self_reason: bool = False,
        max_reasoning: int = 32,
        attention_mask=None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Unit-norm float32 embeddings `[n, dim]` of `[bos text][(reasoning)][LATENT x K]`.

        `inputs`: texts (with `tokenizer`), token-id lists or a `[B, T]` tensor (+ mask), used as
        given (texts get `[bos]` first). `self_reason`: generate up to `max_reasoning` tokens
        greedily first (kept with their stop token), and let the latents read them too.
        """
        rows = self._grc_id_lists(inputs, tokenizer, attention_mask, "embed")
        if self_reason:
            reasoning = self._grc_decode(rows, [[] for _ in rows], max_reasoning, keep_stop=True)[0]
            rows = [r + g for r, g in zip(rows, reasoning)]
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            hidden, _ = self._grc_compression_pass(chunk, self._grc_text_starts(chunk))
            out.append(self._grc_embedding(hidden))
        return torch.cat(out)

    @torch.no_grad()
    def compress(
        self, inputs, tokenizer=None, *, attention_mask=None, batch_size: int = 64
    ) -> list[GRCMemory]:
        """One pass per text: its latent memory (canonical K/V), with `.embedding` set."""
        rows = self._grc_id_lists(inputs, tokenizer, attention_mask, "compress")
        memories = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            hidden, kv = self._grc_compression_pass(chunk, self._grc_text_starts(chunk))
            emb = self._grc_embedding(hidden)
            for j, r in enumerate(chunk):
                memories.append(self._grc_make_memory(kv, j, len(r), emb[j]))
        return memories

    def _grc_make_memory(self, kv, row: int, source_tokens: int, embedding) -> GRCMemory:
        return GRCMemory(
            k=torch.stack([k[row] for k, _ in kv]).float(),
            v=torch.stack([v[row] for _, v in kv]).float(),
            model=self.model_fingerprint,
            num_latents=self.num_latents,
            memory_mode=self.memory_mode,
            source_tokens=source_tokens,
            embedding=embedding,
        )

    @torch.no_grad()
    def update(self, memory: GRCMemory, chunk, tokenizer=None) -> GRCMemory:
        """`recurrent` mode: compress `chunk` (no bos) reading `memory`; the result replaces it."""
        if self.memory_mode != "recurrent":
            raise ValueError(
                "update needs a model trained with grc.memory_mode=recurrent (this one uses "
                f"{self.memory_mode!r}: its compression blocks read no earlier memory)"
            )
        self.check_memory(memory, "update: memory")
        if isinstance(chunk, str):
            if tokenizer is None:
                raise ValueError("update: a text chunk needs `tokenizer=` (or pass token ids)")
            if not chunk.strip():
                raise ValueError(f"update: expected non-empty text, got {chunk!r}")
            ids = [int(t) for t in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
        else:
            ids = [int(t) for t in chunk]
        if not ids:
            raise ValueError("update: empty chunk")
        past, past_valid = self._grc_memory_prefix([[memory]])
        K = self.num_latents
        hidden, kv = self._grc_compression_pass([ids], [K], past, past_valid)
        emb = self._grc_embedding(hidden)
        return self._grc_make_memory(kv, 0, memory.source_tokens + len(ids), emb[0])

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def logits_with_memories(
        self, inputs, memories, tokenizer=None, *, attention_mask=None
    ) -> torch.Tensor:
        """Float32 logits `[B, T, vocab]` of a consumer block (left-padded rows) over memories."""
        rows = self._grc_id_lists(inputs, tokenizer, attention_mask, "logits_with_memories")
        lists = self._grc_memory_lists(memories, len(rows))
        return self._grc_prefill(rows, lists)[0]

    def _grc_prefill(self, rows, lists):
        device = self.device
        ids, valid = _pad_left(rows, self._grc_special("pad_token_id"))
        starts = torch.tensor([len(m) * self.num_latents for m in lists])
        positions = (starts[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)
        ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)
        past, past_valid = None, None
        if any(lists):
            past, past_valid = self._grc_memory_prefix(lists)
        latent = torch.zeros_like(valid)
        hidden, kvs = self._grc_forward(ids, latent, valid, positions, past, past_valid)
        cache = [(k_rot, v) for _, k_rot, v in kvs]
        key_valid = valid
        if past is not None:
            cache = [
                (torch.cat([pk.to(k.dtype), k], 1), torch.cat([pv.to(v.dtype), v], 1))
                for (pk, pv), (k, v) in zip(past, cache)
            ]
            key_valid = torch.cat([past_valid, valid], dim=1)
        return self._grc_logits(hidden), cache, key_valid, positions[:, -1]

    def _grc_decode(
        self,
        rows,
        lists,
        max_new_tokens,
        *,
        keep_stop=False,
        stop_ids=None,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        generator=None,
        want_scores=False,
    ):
        """Prefill, then up to `max_new_tokens` steps; returns (tokens per row, scores)."""
        stop = set(stop_ids if stop_ids is not None else [self._grc_special("eos_token_id")])
        logits, cache, key_valid, last_pos = self._grc_prefill(rows, lists)
        logits = logits[:, -1]
        n, device = len(rows), self.device
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        scores = []
        for step in range(max_new_tokens):
            if want_scores:
                scores.append(logits)
            nxt = _sample(logits, do_sample, temperature, top_k, top_p, generator)
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if tok in stop:
                    done[b] = True
                    if keep_stop:
                        out[b].append(tok)
                    continue
                out[b].append(tok)
            if all(done) or step == max_new_tokens - 1:
                break
            last_pos = last_pos + 1
            one = torch.ones(n, 1, dtype=torch.bool, device=device)
            hidden, kvs = self._grc_forward(
                nxt[:, None].to(device),
                torch.zeros_like(one),
                one,
                last_pos[:, None],
                cache,
                key_valid,
            )
            cache = [
                (torch.cat([ck, k_rot], 1), torch.cat([cv, v], 1))
                for (ck, cv), (_, k_rot, v) in zip(cache, kvs)
            ]
            key_valid = torch.cat([key_valid, one], dim=1)
            logits = self._grc_logits(hidden)[:, -1]
        return out, scores, done

    @torch.no_grad()
    def generate(self, inputs=None, memories=None, **kwargs):
        """Without `memories`: the base class's `generate`, unchanged (plain causal LM).

        With `memories` (a `GRCMemory`, a list shared by every prompt, or one list per prompt):
        a consumer block `[memory 1] ... [memory M][prompt]`. `inputs` (or `input_ids`) are texts
        (with `tokenizer=`), token-id lists or a `[B, T]` tensor with `attention_mask`; texts get
        `[bos]` first, ids are used as given. Options: `max_new_tokens` (64), `do_sample`,
        `temperature`, `top_k`, `top_p`, `generator` (a `torch.Generator`), `eos_token_id` (int or
        list; default the export's EOS), `pad_token_id`, `return_dict_in_generate`,
        `output_scores` / `output_logits`. Returns `sequences` `[B, T + new]` like transformers.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if memories is None:
            if inputs is not None:
                return super().generate(inputs, **kwargs)
            return super().generate(**kwargs)
        known = {
            "attention_mask",
            "tokenizer",
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "generator",
            "eos_token_id",
            "pad_token_id",
            "return_dict_in_generate",
            "output_scores",
            "output_logits",
        }
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"generate with memories: unsupported option(s) {unknown}; supported: "
                f"{sorted(known)}"
            )
        if inputs is None:
            raise ValueError("generate with memories: give the prompt (e.g. [[bos_id]])")
        rows = self._grc_id_lists(
            inputs, kwargs.get("tokenizer"), kwargs.get("attention_mask"), "generate"
        )
        lists = self._grc_memory_lists(memories, len(rows))
        eos = kwargs.get("eos_token_id")
        stop = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        want_scores = bool(kwargs.get("output_scores") or kwargs.get("output_logits"))
        max_new = 64 if kwargs.get("max_new_tokens") is None else int(kwargs["max_new_tokens"])
        temperature = kwargs.get("temperature")
        tokens, scores, done = self._grc_decode(
            rows,
            lists,
            max_new,
            keep_stop=True,
            stop_ids=stop,
            do_sample=bool(kwargs.get("do_sample", False)),
            temperature=1.0 if temperature is None else float(temperature),
            top_k=kwargs.get("top_k") or 0,
            top_p=kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0,
            generator=kwargs.get("generator"),
            want_scores=want_scores,
        )
        pad = kwargs.get("pad_token_id")
        pad = self._grc_special("pad_token_id") if pad is None else int(pad)
        prompt, _ = _pad_left(rows, pad)
        width = max(len(t) for t in tokens)
        new = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, t in enumerate(tokens):
            new[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        sequences = torch.cat([prompt, new], dim=1).to(self.device)
        if kwargs.get("return_dict_in_generate"):
            return GRCGenerateOutput(sequences, tuple(scores) if want_scores else None)
        return sequences


def _resolve(path, name: str, hub_kwargs: dict[str, Any]) -> str:
    """A file of an export: in a local directory, or through transformers' hub cache."""
    if os.path.isdir(path):
        full = os.path.join(path, hub_kwargs.get("subfolder") or "", name)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{full!r} does not exist (not a grc export?)")
        return full
    from transformers.utils import cached_file

    return cached_file(str(path), name, **hub_kwargs)


class GRCLlamaForCausalLM(GRCMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` with the GRC modes."""


if Qwen2ForCausalLM is not None:

    class GRCQwen2ForCausalLM(GRCMixin, Qwen2ForCausalLM):
        """`Qwen2ForCausalLM` with the GRC modes."""


if Qwen3ForCausalLM is not None:

    class GRCQwen3ForCausalLM(GRCMixin, Qwen3ForCausalLM):
        """`Qwen3ForCausalLM` with the GRC modes."""
