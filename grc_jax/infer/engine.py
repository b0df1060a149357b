"""The GRC inference engine: the LEGO modes of DESIGN.md section 5 over one set of weights.

- `generate(prompts)`: plain causal LM (no latents anywhere);
- `generate(prompts, memories=[[m0, m1], ...])`: a consumer block over latent memories;
- `embed(texts, self_reason=False)`: `[TEXT][LATENT x K]` -> vector (optionally after greedy
  self-reasoning);
- `compress(texts)`: -> (LatentMemory, embedding) per text, one pass each;
- `update(memory, chunk)` (`recurrent` mode): the chunk reads the old memory; new latents
  replace it.

Generation runs on a paged KV cache with a shared latent-memory pool: requests are batched (fixed
batch, padded), prompts are prefilled in fixed-size chunks and decoding is one jitted step per
token, so nothing recompiles per token or per request.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.batch import Rows
from grc_jax.core.config import Config
from grc_jax.core.errors import MemoryMismatchError
from grc_jax.core.roles import LATENT, TEXT
from grc_jax.data.layout import gen, latents, one_per_row, text
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.infer.cache import PagePool, block_table, empty_cache
from grc_jax.infer.memory import LatentMemory, model_fingerprint
from grc_jax.infer.paged import paged_forward
from grc_jax.infer.sampling import SamplingParams, sample
from grc_jax.model import forward, unstack_layers
from grc_jax.model.head import embed_from_pooled, pool_latents
from grc_jax.model.params import GRCParams
from grc_jax.model.rope import inverse_frequencies
from pallas_kernels.hybrid_paged_attention import IMPLEMENTATIONS, rotate

GREEDY = SamplingParams()


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Sizes of the engine's fixed shapes (each compiles once) and the attention implementation."""

    page_size: int = 16
    n_pages: int = 512
    max_batch: int = 8
    max_seq_len: int = 1024  # text tokens per request (prompt + generated)
    max_memories: int = 16
    prefill_chunk: int = 64
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("page_size", "n_pages", "max_batch", "max_seq_len", "max_memories",
                     "prefill_chunk"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"EngineOptions.{name}: expected a positive integer, got {value!r}"
                )
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"EngineOptions.attention_impl: expected one of {IMPLEMENTATIONS}, "
                f"got {self.attention_impl!r}"
            )


@dataclasses.dataclass
class Generation:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length"
    # Logits that chose each token, if requested; also those that chose a stop token that is
    # not kept in `tokens` (so it may be one longer than `tokens`).
    step_logits: list[np.ndarray] | None = None


class Engine:
    def __init__(self, cfg: Config, params: GRCParams, tok: Tokenizer, opts=EngineOptions()):
        self.cfg, self.tok, self.opts = cfg, tok, opts
        self.K = cfg.grc.num_latents
        # Decoding slices each layer's weights every step: keep them per layer (unstacked once)
        # rather than stacked, which XLA would copy per step; the engine's training-layout
        # forward then runs unscanned too (same math, bit for bit under jit).
        model_params = params.merged(cfg.model.scan_layers)
        if cfg.model.scan_layers:
            model_params = unstack_layers(model_params, cfg.model.n_layers)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
            self.cfg = cfg
        self.model_params = model_params
        self.head = params.head
        self.fingerprint = model_fingerprint(cfg, params)
        self.pool = PagePool(opts.n_pages, opts.page_size)
        self.cache = empty_cache(cfg.model, opts.n_pages, opts.page_size)
        m = cfg.model
        mem_shape = (
            m.n_layers,
            opts.max_batch * opts.max_memories + 1,
            self.K,
            m.n_kv_heads,
            m.head_dim,
        )
        self.mem_pool = {"k": jnp.zeros(mem_shape), "v": jnp.zeros(mem_shape)}
        self._inv_freq = jnp.asarray(inverse_frequencies(m))
        # The weights are an argument, not a closure: closed-over arrays would be baked into the
        # compiled program as constants (a second copy of the model, and a slow compile).
        step = lambda params, cache, mem, *a: paged_forward(  # noqa: E731
            params, m, self.K, cache, mem, *a, attention_impl=opts.attention_impl
        )
        self._step = jax.jit(step, donate_argnums=(1,))
        self._sample = jax.jit(sample)

        def train_forward(p, batch):
            return forward(p, m, cfg.grc, batch, return_kv=True)

        self._forward = jax.jit(train_forward)

    # ------------------------------------------------------------------ memories and embeddings

    def _rows(self, examples) -> Rows:
        return one_per_row(examples, self.K, self.cfg.grc.memory_mode)

    def _embedding_dim(self) -> int:
        return self.head.dim or self.cfg.model.d_model

    def _encode_text(self, s: str, what: str) -> list[int]:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{what}: expected non-empty text, got {s!r}")
        return self.tok.encode(s)

    def _embed_rows(self, rows) -> tuple[Any, np.ndarray]:
        out = self._forward(self.model_params, rows)
        pooled = pool_latents(
            out.hidden, jnp.asarray(rows.segment_ids), jnp.asarray(rows.block_ids),
            jnp.asarray(rows.roles), 1, self.cfg.grc.pooling,
        )  # fmt: skip
        return out, np.asarray(embed_from_pooled(self.head, pooled[:, 0]))

    def embed(
        self, texts: list[str], self_reason: bool = False, max_reasoning: int = 32
    ) -> np.ndarray:
        """Unit-norm embeddings `[n, dim]`: `[TEXT bos text][(GEN reasoning)][LATENT x K]`."""
        if isinstance(texts, str):
            raise TypeError("embed: expected a list of texts, got one string")
        if not texts:
            return np.zeros((0, self._embedding_dim()), np.float32)
        prompts = [[self.tok.bos_id, *self._encode_text(t, "embed")] for t in texts]
        reasoning = [[] for _ in prompts]
        if self_reason:
            reasoning = [
                g.tokens
                for g in self.generate_ids(prompts, max_new_tokens=max_reasoning, keep_stop=True)
            ]
        examples = [
            [[text(p), gen(r), latents(self.K)] if r else [text(p), latents(self.K)]]
            for p, r in zip(prompts, reasoning)
        ]
        return np.concatenate(
            [
                self._embed_rows(self._rows(examples[i : i + 64]))[1]
                for i in range(0, len(examples), 64)
            ]
        )

    def compress(self, texts: list[str]) -> list[tuple[LatentMemory, np.ndarray]]:
        """One pass per text: its latent memory (canonical K/V) and its embedding."""
        results = []
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            docs = [[self.tok.bos_id, *self._encode_text(t, "compress")] for t in chunk]
            rows = self._rows([[[text(d), latents(self.K)]] for d in docs])
            out, emb = self._embed_rows(rows)
            k_all, v_all = (np.asarray(a) for a in out.kv)  # [L, b, t, G, D]
            for j, d in enumerate(docs):
                lat = np.where(rows.roles[j] == LATENT)[0]
                first = int(rows.positions[j, lat[0]])
                k = self._canonical(k_all[:, j, lat], first)
                results.append((self._memory(k, v_all[:, j, lat], len(d)), emb[j]))
        return results

    def _canonical(self, k: np.ndarray, first_position: int) -> np.ndarray:
        """Rotate keys made at positions first..first+K-1 back to 0..K-1."""
        if first_position == 0:
            return k
        angles = jnp.float32(-first_position) * self._inv_freq
        return np.asarray(rotate(jnp.asarray(k, jnp.float32), angles))

    def _memory(self, k, v, n_tokens) -> LatentMemory:
        return LatentMemory(
            k=np.asarray(k, np.float32), v=np.asarray(v, np.float32), model=self.fingerprint,
            num_latents=self.K, memory_mode=self.cfg.grc.memory_mode, source_tokens=n_tokens,
        )  # fmt: skip

    def check_memory(self, memory: LatentMemory, what: str = "memory") -> None:
        memory.check_compatible(self.fingerprint, self.cfg, what)

    def update(self, memory: LatentMemory, chunk: str) -> tuple[LatentMemory, np.ndarray]:
        """`recurrent` mode: compress `chunk` reading `memory`; the new memory replaces it."""
        if self.cfg.grc.memory_mode != "recurrent":
            raise MemoryMismatchError(
                "update needs grc.memory_mode=recurrent (this model uses 'independent': its "
                "compression blocks read no earlier memory)"
            )
        self.check_memory(memory, "update: memory")
        ids = self._encode_text(chunk, "update")
        tokens = ids + list(range(self.K))
        roles = [TEXT] * len(ids) + [LATENT] * self.K
        out = self._run_paged(
            [tokens], [roles], [[memory]], start_positions=[self.K], collect="all"
        )
        (logits, hidden, kv) = out[0]
        lat = np.arange(len(ids), len(tokens))
        k = self._canonical(kv[0][:, lat], self.K + len(ids))
        pooled = hidden[lat].mean(0) if self.cfg.grc.pooling == "mean" else hidden[lat[-1]]
        emb = np.asarray(embed_from_pooled(self.head, jnp.asarray(pooled, jnp.float32)))
        return self._memory(k, kv[1][:, lat], memory.source_tokens + len(ids)), emb

    # ------------------------------------------------------------------ paged execution

    def _load_memories(
        self, per_request: list[list[LatentMemory]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Place memories in the shared pool (once per distinct memory); tables and counts."""
        opts = self.opts
        tables = np.zeros((opts.max_batch, opts.max_memories), np.int32)
        counts = np.zeros(opts.max_batch, np.int32)
        slots: dict[int, int] = {}
        ks, vs, idx = [], [], []
        for b, mems in enumerate(per_request):
            if len(mems) > opts.max_memories:
                raise ValueError(
                    f"request {b}: {len(mems)} memories, the engine holds {opts.max_memories}"
                )
            if mems and self.cfg.grc.memory_mode == "recurrent" and len(mems) > 1:
                raise MemoryMismatchError(
                    f"request {b}: recurrent mode reads one running memory, got {len(mems)}"
                )
            for j, m in enumerate(mems):
                self.check_memory(m, f"request {b} memory {j}")
                if id(m) not in slots:
                    slots[id(m)] = len(slots) + 1  # slot 0 stays empty
                    ks.append(m.k)
                    vs.append(m.v)
                    idx.append(slots[id(m)])
                tables[b, j] = slots[id(m)]
            counts[b] = len(mems)
        if idx:
            at = jnp.asarray(idx)
            self.mem_pool = {
                "k": self.mem_pool["k"].at[:, at].set(jnp.asarray(np.stack(ks, 1))),
                "v": self.mem_pool["v"].at[:, at].set(jnp.asarray(np.stack(vs, 1))),
            }
        return tables, counts

    def _run_paged(self, token_lists, role_lists, memories, start_positions, collect="last",
                   max_new_tokens=0, sampling=GREEDY, stop_tokens=(), keep_stop=False,
                   return_logits=False):  # fmt: skip
        """Prefill every request (chunked), then decode up to `max_new_tokens`.

        collect="all": return per request (logits, hidden, (k, v)) of every prompt token.
        collect="last": return `Generation`s.
        """
        opts, n = self.opts, len(token_lists)
        if n > opts.max_batch:
            raise ValueError(f"{n} requests in one batch, the engine holds {opts.max_batch}")
        width = -(-opts.max_seq_len // opts.page_size)
        pages, tables = [], np.zeros((opts.max_batch, width), np.int32)
        lengths = [len(t) for t in token_lists]
        try:
            for b, t in enumerate(token_lists):
                total = len(t) + max_new_tokens
                if total > opts.max_seq_len:
                    raise ValueError(
                        f"request {b}: {len(t)} prompt + {max_new_tokens} new tokens exceed "
                        f"max_seq_len={opts.max_seq_len}"
                    )
                pages.append(self.pool.alloc(b, total))
                tables[b] = block_table(pages[-1], width)
            mem_tables, mem_counts = self._load_memories(memories + [[]] * (opts.max_batch - n))
            return self._prefill_and_decode(
                token_lists, role_lists, start_positions, lengths, tables, mem_tables, mem_counts,
                collect, max_new_tokens, sampling, stop_tokens, keep_stop, return_logits,
            )  # fmt: skip
        finally:
            for p in pages:
                self.pool.free(p)

    def _prefill_and_decode(self, token_lists, role_lists, starts, lengths, tables, mem_tables,
                            mem_counts, collect, max_new, sampling, stop_tokens, keep_stop,
                            return_logits):  # fmt: skip
        opts, n, c = self.opts, len(token_lists), self.opts.prefill_chunk
        B = opts.max_batch
        starts = np.asarray(list(starts) + [0] * (B - n))
        lens = np.asarray(lengths + [0] * (B - n))
        collected = [([], [], [], []) for _ in range(n)]
        last_logits = np.zeros((B, self.cfg.model.vocab_size), np.float32)
        for c0 in range(0, max(lens), c):
            tok = np.zeros((B, c), np.int32)
            rol = np.zeros((B, c), np.int32)
            idx = np.full((B, c), -1, np.int32)
            for b in range(n):
                seg = token_lists[b][c0 : c0 + c]
                tok[b, : len(seg)] = seg
                rol[b, : len(seg)] = role_lists[b][c0 : c0 + c]
                idx[b, : len(seg)] = np.arange(c0, c0 + len(seg))
            text_lengths = np.minimum(lens, c0 + c)
            logits, hidden, self.cache, (k, v) = self._step(
                self.model_params,
                self.cache, self.mem_pool, tok, rol, starts[:, None] + np.maximum(idx, 0), idx,
                tables, text_lengths, mem_tables, mem_counts,
            )  # fmt: skip
            logits = np.asarray(logits)
            for b in range(n):
                m = idx[b] >= 0
                if collect == "all":
                    collected[b][0].append(logits[b, m])
                    collected[b][1].append(np.asarray(hidden)[b, m])
                    collected[b][2].append(np.asarray(k)[:, b, m])
                    collected[b][3].append(np.asarray(v)[:, b, m])
                if lens[b] - 1 in idx[b]:
                    last_logits[b] = logits[b, list(idx[b]).index(lens[b] - 1)]
        if collect == "all":
            return [
                (
                    np.concatenate(lg),
                    np.concatenate(h),
                    (np.concatenate(kk, 1), np.concatenate(vv, 1)),
                )
                for lg, h, kk, vv in collected
            ]
        return self._decode(last_logits, n, starts, lens, tables, mem_tables, mem_counts, max_new,
                            sampling, stop_tokens, keep_stop, return_logits)  # fmt: skip

    def _decode(self, logits, n, starts, lens, tables, mem_tables, mem_counts, max_new, sampling,
                stop_tokens, keep_stop, return_logits):  # fmt: skip
        B = self.opts.max_batch
        key = jax.random.key(sampling.seed)
        out = [[] for _ in range(n)]
        step_logits = [[] for _ in range(n)]
        done = np.array([False] * n + [True] * (B - n))
        reason = ["length"] * n
        cur = lens.copy()
        s = (
            jnp.float32(sampling.temperature),
            jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p),
        )
        for _ in range(max_new):
            key, sub = jax.random.split(key)
            nxt = np.asarray(self._sample(jnp.asarray(logits), sub, *s))
            for b in range(n):
                if done[b]:
                    continue
                if return_logits:
                    step_logits[b].append(logits[b].copy())
                if int(nxt[b]) in stop_tokens:
                    done[b], reason[b] = True, "stop"
                    if keep_stop:
                        out[b].append(int(nxt[b]))
                    continue
                out[b].append(int(nxt[b]))
            if done.all() or len(max(out, key=len)) >= max_new:
                break
            active = ~done
            idx = np.where(active, cur, -1)[:, None].astype(np.int32)
            tok = np.where(active, nxt, 0)[:, None].astype(np.int32)
            rol = np.where(active, TEXT, 0)[:, None].astype(np.int32)
            cur = np.where(active, cur + 1, cur)
            lg, _, self.cache, _ = self._step(
                self.model_params,
                self.cache, self.mem_pool, tok, rol, (starts + np.maximum(idx[:, 0], 0))[:, None],
                idx, tables, cur.astype(np.int32), mem_tables, mem_counts,
            )  # fmt: skip
            logits = np.asarray(lg)[:, 0]
        return [
            Generation(out[b], self.tok.decode([t for t in out[b] if t not in stop_tokens]),
                       reason[b], step_logits[b] if return_logits else None)
            for b in range(n)
        ]  # fmt: skip

    # ------------------------------------------------------------------ generation

    def generate_ids(self, prompts: list[list[int]],
                     memories: list[list[LatentMemory]] | None = None,
                     max_new_tokens: int = 64, sampling: SamplingParams = GREEDY,
                     stop_tokens: tuple[int, ...] | None = None, keep_stop: bool = False,
                     return_logits: bool = False) -> list[Generation]:  # fmt: skip
        """Generate from token-id prompts (a consumer block over `memories[b]` when given)."""
        memories = memories or [[] for _ in prompts]
        if len(memories) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(memories)} memory lists")
        stop = tuple(stop_tokens) if stop_tokens is not None else (self.tok.eos_id,)
        results = []
        B = self.opts.max_batch
        for i in range(0, len(prompts), B):
            ps, ms = prompts[i : i + B], memories[i : i + B]
            if any(len(p) == 0 for p in ps):
                raise ValueError("generate: empty prompt")
            starts = [len(m) * self.K for m in ms]
            results += self._run_paged(
                ps, [[TEXT] * len(p) for p in ps], ms, starts, "last", max_new_tokens, sampling,
                stop, keep_stop, return_logits,
            )  # fmt: skip
        return results

    def generate(self, prompts: list[str], memories: list[list[LatentMemory]] | None = None,
                 **kwargs) -> list[Generation]:  # fmt: skip
        if isinstance(prompts, str):
            raise TypeError("generate: expected a list of prompts, got one string")
        ids = [[self.tok.bos_id, *self._encode_text(p, "generate")] for p in prompts]
        return self.generate_ids(ids, memories, **kwargs)
