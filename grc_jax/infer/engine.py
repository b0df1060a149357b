"""The GRC inference engine: the LEGO modes of DESIGN.md section 5 over one set of weights.

- `generate(prompts)`: plain causal LM (no latents anywhere);
- `generate(prompts, memories=[[m0, m1], ...])`: a consumer block over latent memories;
- `embed(texts, self_reason=False)`: `[TEXT][LATENT x K]` -> vector (optionally after greedy
  self-reasoning);
- `compress(texts)`: -> (LatentMemory, embedding) per text, one pass each;
- `update(memory, chunk)` (`recurrent` mode): the chunk reads the old memory; new latents
  replace it.

Positions: a pass is refused (`UsageError`, before any compute) when the RoPE positions it uses
span more than `model.max_position_embeddings`, the range the model was configured for. Only
differences of positions reach attention, so what counts is the span of one sequence, first to
last position: `compress` / `embed` lay out `[bos text][reasoning][LATENT x K]` (n + r + K
positions; `independent` mode puts the text at negative positions, `recurrent` at 0..), with
`self_reason` counted at its `max_reasoning` budget; generation over m memories runs from 0 (the
memories at [j*K, (j+1)*K)) through m*K + prompt + `max_new_tokens`; `update` places the old memory
at 0..K-1, the chunk after it and the new latents after the chunk (2K + chunk).

Generation runs on a paged KV cache with a shared latent-memory pool: requests are batched (fixed
batch, padded), prompts are prefilled in fixed-size chunks and decoding is one jitted step per
token, so nothing recompiles per token or per request.

Attention: when `EngineOptions.attention_impl` selects a Pallas kernel (`auto` on a TPU or GPU, or
forced), the engine lowers and compiles that kernel once at start-up on its real decode shapes;
if that fails it logs one WARNING line and uses the pure-JAX reference for its whole lifetime
(`Engine.attention_impl` says which was chosen).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.config import Config
from grc_jax.core.constants import check_memory_reads
from grc_jax.core.errors import MemoryMismatchError, UsageError
from grc_jax.core.roles import LATENT, TEXT
from grc_jax.data.layout import gen, latents, text
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.infer.cache import PagePool, block_table, empty_cache
from grc_jax.infer.encode_batches import gather_slots, packed_batches, row_batches
from grc_jax.infer.memory import LatentMemory, model_fingerprint
from grc_jax.infer.memory_pool import MemoryPool
from grc_jax.infer.paged import StepInputs, decode_attention_args, paged_forward
from grc_jax.infer.sampling import SamplingParams, sample_rows
from grc_jax.infer.scheduler import Job, Scheduler
from grc_jax.model import forward, unstack_layers
from grc_jax.model.head import embed_from_pooled, pool_latents
from grc_jax.model.params import GRCParams
from grc_jax.model.rope import inverse_frequencies, rotate
from pallas_kernels.hybrid_paged_attention import IMPLEMENTATIONS, resolve_impl, usable_impl

GREEDY = SamplingParams()


def _preview(s: str, n: int = 24) -> str:
    """The start of a text, to name it in an error."""
    return repr(s if len(s) <= n else s[:n] + "...")


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence of the engine's batch: its prompt tokens and roles, the memories its
    consumer block reads (in order), and the RoPE position of its first token."""

    tokens: list[int]
    roles: list[int]
    memories: list[LatentMemory]
    start: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a batch of requests lives: block tables of its text pages, memory-pool tables and
    counts, first positions and prompt lengths; `[max_batch, ...]`, padded."""

    block_tables: np.ndarray
    mem_tables: np.ndarray
    mem_counts: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


@dataclasses.dataclass(frozen=True)
class PromptOutput:
    """Per prompt token of one request: logits `[n, V]`, hidden `[n, d]`, k / v `[L, n, G, D]`."""

    logits: np.ndarray
    hidden: np.ndarray
    k: np.ndarray
    v: np.ndarray


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
    memory_slots: int = 0  # memories held on the device at once (0: max_batch * max_memories)
    # Debugging aid: overwrite every page freed by a finished request with NaN (outputs must not
    # change: no request may read another's stale pages).
    poison_freed_pages: bool = False

    def __post_init__(self):
        if not isinstance(self.memory_slots, int) or self.memory_slots < 0:
            raise UsageError(
                f"EngineOptions.memory_slots: expected an integer >= 0 (0: max_batch * "
                f"max_memories), got {self.memory_slots!r}"
            )
        for name in ("page_size", "n_pages", "max_batch", "max_seq_len", "max_memories",
                     "prefill_chunk"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(
                    f"EngineOptions.{name}: expected a positive integer, got {value!r}"
                )
        if self.attention_impl not in IMPLEMENTATIONS:
            raise UsageError(
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
        # Decoding (`Transformer.decode`) runs layer by layer on per-layer weights: unstack a
        # scanned checkpoint once here (slicing stacked weights inside the step would copy them
        # every step); the engine's training-layout forward then runs unscanned too (same math,
        # bit for bit under jit).
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
        self.memories = MemoryPool(
            opts.memory_slots or opts.max_batch * opts.max_memories,
            m.n_layers, self.K, m.n_kv_heads, m.head_dim,
        )  # fmt: skip
        # Committed to the weights' device from the start, as every step's outputs are: a program
        # compiled for an uncommitted cache would be compiled a second time for a committed one.
        device = next(iter(jax.tree.leaves(model_params)[0].devices()))
        self.cache = jax.device_put(self.cache, device)
        self.memories.arrays = jax.device_put(self.memories.arrays, device)
        self._inv_freq = jnp.asarray(inverse_frequencies(m))
        self.attention_impl = self._checked_attention_impl()
        # The weights are an argument, not a closure: closed-over arrays would be baked into the
        # compiled program as constants (a second copy of the model, and a slow compile).
        impl = self.attention_impl
        step = lambda params, cache, mem, s: paged_forward(  # noqa: E731
            params, m, cfg.grc, cache, mem, s, attention_impl=impl
        )
        self._step = jax.jit(step, donate_argnums=(1,))

        def generation_step(params, cache, mem, s, last):
            out, cache = paged_forward(
                params, m, cfg.grc, cache, mem, s, attention_impl=impl, logits_index=last
            )
            return out.logits[:, 0], cache

        # Generation (`Scheduler`): logits only at each sequence's last token of the chunk.
        self._gen_step = jax.jit(generation_step, donate_argnums=(1,))
        self._sample = jax.jit(sample_rows)

        # On a CPU the head-major attention layout is the faster one for these passes (the same
        # math, to float rounding: `dot_product_attention`); elsewhere the configured one.
        on_cpu = device.platform == "cpu"
        enc_model = dataclasses.replace(m, attention_layout="head_major") if on_cpu else m

        def encode(p, rows, return_kv, slots):
            """Embedding / compression pass: no LM head; the pooled latents of each example
            `[b, slots, d]` (segment s + 1 of a row is slot s) (+ k / v)."""
            out = forward(p, enc_model, cfg.grc, rows, return_kv=return_kv, with_logits=False)
            pooled = pool_latents(
                out.hidden, rows.segment_ids, rows.block_ids, rows.roles, slots, cfg.grc.pooling
            )
            return out.kv, pooled

        self._encode = jax.jit(encode, static_argnums=(2, 3))

    def _checked_attention_impl(self) -> str:
        """`opts.attention_impl`, or "reference" if the decode kernel it selects on this backend
        does not lower and compile on this engine's decode shapes (logged once, by `usable_impl`).
        Nothing is traced or compiled when the reference is selected (e.g. `auto` on CPU)."""
        impl = self.opts.attention_impl
        if resolve_impl(impl, 1) == "reference":
            return impl
        args = decode_attention_args(
            self.model_params, self.cfg.model, self.cfg.grc, self.cache, self.mem_pool,
            self._decode_step_shapes(),
        )  # fmt: skip
        return usable_impl(impl, *args)

    def _decode_step_shapes(self) -> StepInputs:
        """Shapes of one decode step's inputs (one token per sequence of the fixed batch)."""
        B = self.opts.max_batch

        def i32(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32)

        return StepInputs(
            tokens=i32(B, 1), roles=i32(B, 1), positions=i32(B, 1), text_index=i32(B, 1),
            block_tables=i32(B, self.table_width), text_lengths=i32(B),
            mem_tables=i32(B, self.opts.max_memories), mem_counts=i32(B),
        )  # fmt: skip

    @property
    def table_width(self) -> int:
        """Block-table entries per request: pages of `max_seq_len` text tokens."""
        return -(-self.opts.max_seq_len // self.opts.page_size)

    # ------------------------------------------------------------------ memories and embeddings

    def _embedding_dim(self) -> int:
        return self.head.dim or self.cfg.model.d_model

    def _encode_text(self, s: str, what: str) -> list[int]:
        if not isinstance(s, str) or not s.strip():
            raise UsageError(f"{what}: expected non-empty text, got {s!r}")
        return self.tok.encode(s)

    def _check_span(self, n_positions: int, what: str, parts: str) -> None:
        """Refuse a sequence whose positions span more than `model.max_position_embeddings`
        (see the module docstring); `what` names the input, `parts` says what adds up."""
        limit = self.cfg.model.max_position_embeddings
        if n_positions > limit:
            raise UsageError(
                f"{what} has {parts} = {n_positions} positions, more than "
                f"model.max_position_embeddings={limit}"
            )

    def _check_compression(self, kind: str, docs: list[list[int]], texts: list[str],
                           reasoning: int = 0) -> None:  # fmt: skip
        """`[bos text][reasoning <= reasoning][LATENT x K]` of each text fits the positions."""
        extra = f" + up to {reasoning} reasoning tokens" if reasoning else ""
        for i, (d, t) in enumerate(zip(docs, texts)):
            self._check_span(
                len(d) + reasoning + self.K,
                f"{kind}: text {i} ({_preview(t)})",
                f"{len(d)} tokens (with bos){extra} + {self.K} latents",
            )

    def embed(
        self, texts: list[str], self_reason: bool = False, max_reasoning: int = 32
    ) -> np.ndarray:
        """Unit-norm embeddings `[n, dim]`: `[TEXT bos text][(GEN reasoning)][LATENT x K]`."""
        if isinstance(texts, str):
            raise TypeError("embed: expected a list of texts, got one string")
        if not texts:
            return np.zeros((0, self._embedding_dim()), np.float32)
        prompts = [[self.tok.bos_id, *self._encode_text(t, "embed")] for t in texts]
        self._check_compression("embed", prompts, texts, max_reasoning if self_reason else 0)
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
        out = np.zeros((len(texts), self._embedding_dim()), np.float32)
        for idx, at, rows, slots in packed_batches(examples, self.K, self.cfg.grc.memory_mode):
            _, pooled = self._encode(self.model_params, rows, False, slots)
            out[idx] = gather_slots(embed_from_pooled(self.head, pooled), at)
        return out

    def compress(self, texts: list[str]) -> list[tuple[LatentMemory, np.ndarray]]:
        """One pass per text: its latent memory (canonical K/V) and its embedding."""
        if isinstance(texts, str):
            raise TypeError("compress: expected a list of texts, got one string")
        all_docs = [[self.tok.bos_id, *self._encode_text(t, "compress")] for t in texts]
        self._check_compression("compress", all_docs, texts)
        results: list[Any] = [None] * len(texts)
        examples = [[[text(d), latents(self.K)]] for d in all_docs]
        mode = self.cfg.grc.memory_mode
        for idx, rows in row_batches(examples, range(len(examples)), self.K, mode):
            kv, pooled = self._encode(self.model_params, rows, True, 1)
            emb = np.asarray(embed_from_pooled(self.head, pooled[:, 0]))
            k_all, v_all = (np.asarray(a) for a in kv)  # [L, b, t, G, D]
            for j, i in enumerate(idx):
                lat = np.where(rows.roles[j] == LATENT)[0]
                first = int(rows.positions[j, lat[0]])
                k = self._canonical(k_all[:, j, lat], first)
                results[i] = (self._memory(k, v_all[:, j, lat], len(all_docs[i])), emb[j])
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
        self._check_span(
            2 * self.K + len(ids), f"update: chunk ({_preview(chunk)})",
            f"{self.K} memory latents + {len(ids)} tokens + {self.K} new latents",
        )  # fmt: skip
        tokens = ids + list(range(self.K))
        roles = [TEXT] * len(ids) + [LATENT] * self.K
        request = Request(tokens, roles, [memory], start=self.K)
        with self._placed([request], 0) as place:
            (out,) = self._prefill([request], place)
        lat = np.arange(len(ids), len(tokens))
        k = self._canonical(out.k[:, lat], self.K + len(ids))
        hidden = out.hidden
        pooled = hidden[lat].mean(0) if self.cfg.grc.pooling == "mean" else hidden[lat[-1]]
        emb = np.asarray(embed_from_pooled(self.head, jnp.asarray(pooled, jnp.float32)))
        return self._memory(k, out.v[:, lat], memory.source_tokens + len(ids)), emb

    # ------------------------------------------------------------------ paged execution

    @property
    def mem_pool(self) -> dict[str, jax.Array]:
        """The memory pool's arrays, `k` / `v` `[L, slots + 1, K, G, D]` (what decoding reads)."""
        return self.memories.arrays

    @mem_pool.setter
    def mem_pool(self, arrays: dict[str, jax.Array]) -> None:
        self.memories.arrays = arrays

    def free_pages(self, pages: list[int]) -> None:
        """Give `pages` back to the pool (NaN-filled first with `opts.poison_freed_pages`)."""
        if self.opts.poison_freed_pages and pages:
            at = np.asarray(pages)
            self.cache = {k: c.at[:, at].set(jnp.nan) for k, c in self.cache.items()}
        self.pool.free(pages)

    def generation_step(self, tokens, roles, text_index, text_lengths, last_index, *,
                        block_tables, mem_tables, mem_counts, starts) -> jax.Array:  # fmt: skip
        """One jitted step of the fixed batch (`Scheduler`): writes the tokens' k / v into the
        cache and returns the logits `[max_batch, V]` (on the device) at `last_index` of each
        sequence's chunk."""
        step = StepInputs(
            tokens=tokens, roles=roles, positions=starts[:, None] + np.maximum(text_index, 0),
            text_index=text_index, block_tables=block_tables, text_lengths=text_lengths,
            mem_tables=mem_tables, mem_counts=mem_counts,
        )  # fmt: skip
        logits, self.cache = self._gen_step(
            self.model_params, self.cache, self.mem_pool, step, last_index
        )
        return logits

    def sample_rows(self, logits, seeds, counts, temperature, top_k, top_p) -> np.ndarray:
        """Each row's next token (`sampling.sample_rows`), on the host."""
        return np.asarray(self._sample(logits, seeds, counts, temperature, top_k, top_p))

    @contextlib.contextmanager
    def _placed(self, requests: list[Request], max_new_tokens: int) -> Iterator[Placement]:
        """Text pages for each request (prompt + `max_new_tokens`) and its memories in the pool;
        both are released on exit."""
        opts, n = self.opts, len(requests)
        if n > opts.max_batch:
            raise UsageError(f"{n} requests in one batch, the engine holds {opts.max_batch}")
        width = self.table_width
        pages, tables = [], np.zeros((opts.max_batch, width), np.int32)
        keys: list[str] = []
        try:
            for b, r in enumerate(requests):
                total = len(r.tokens) + max_new_tokens
                if total > opts.max_seq_len:
                    raise UsageError(
                        f"request {b}: {len(r.tokens)} prompt + {max_new_tokens} new tokens "
                        f"exceed max_seq_len={opts.max_seq_len}"
                    )
                pages.append(self.pool.alloc(b, total))
                tables[b] = block_table(pages[-1], width)
            mem_tables = np.zeros((opts.max_batch, opts.max_memories), np.int32)
            mem_counts = np.zeros(opts.max_batch, np.int32)
            for b, r in enumerate(requests):
                reads = self._memory_keys(r.memories, f"request {b}", keys)
                mem_tables[b, : len(reads)] = [self.memories.slot(k) for k in reads]
                mem_counts[b] = len(reads)
            pad = opts.max_batch - n
            yield Placement(
                block_tables=tables, mem_tables=mem_tables, mem_counts=mem_counts,
                starts=np.asarray([r.start for r in requests] + [0] * pad),
                lengths=np.asarray([len(r.tokens) for r in requests] + [0] * pad),
            )  # fmt: skip
        finally:
            self.memories.release(keys)
            for p in pages:
                self.free_pages(p)

    def _memory_keys(self, mems: list[LatentMemory], what: str, held: list[str]) -> list[str]:
        """Store `mems` in the memory pool (each distinct object once) after checking they fit
        this engine and model, and hold a read of each (its key appended to `held`, for the
        caller to `memories.release`) so that none is evicted while the request is set up."""
        if len(mems) > self.opts.max_memories:
            raise UsageError(
                f"{what}: {len(mems)} memories, the engine holds {self.opts.max_memories}"
            )
        check_memory_reads(self.cfg.grc.memory_mode, len(mems), what)
        keys = []
        for j, m in enumerate(mems):
            self.check_memory(m, f"{what} memory {j}")
            key = f"object:{id(m)}"
            self.memories.put(key, m, named=False)
            self.memories.acquire([key])
            held.append(key)
            keys.append(key)
        return keys

    def _run_step(self, place: Placement, tokens, roles, text_index, text_lengths):
        """One jitted step over the whole (padded) batch; updates the cache in place."""
        step = StepInputs(
            tokens=tokens, roles=roles,
            positions=place.starts[:, None] + np.maximum(text_index, 0),
            text_index=text_index, block_tables=place.block_tables,
            text_lengths=text_lengths.astype(np.int32), mem_tables=place.mem_tables,
            mem_counts=place.mem_counts,
        )  # fmt: skip
        out, self.cache = self._step(self.model_params, self.cache, self.mem_pool, step)
        return out

    def _prefill(self, requests: list[Request], place: Placement) -> list[PromptOutput]:
        """Every prompt token in fixed chunks (`update`'s pass); each request's per-token logits,
        hidden states and (k, v). Generation runs on the `Scheduler` instead."""
        B, c = self.opts.max_batch, self.opts.prefill_chunk
        lens = place.lengths
        parts: list[list[tuple]] = [[] for _ in requests]
        for c0 in range(0, int(max(lens)), c):
            tok = np.zeros((B, c), np.int32)
            rol = np.zeros((B, c), np.int32)
            idx = np.full((B, c), -1, np.int32)
            for b, r in enumerate(requests):
                seg = r.tokens[c0 : c0 + c]
                tok[b, : len(seg)] = seg
                rol[b, : len(seg)] = r.roles[c0 : c0 + c]
                idx[b, : len(seg)] = np.arange(c0, c0 + len(seg))
            out = self._run_step(place, tok, rol, idx, np.minimum(lens, c0 + c))
            logits, hidden = np.asarray(out.logits), np.asarray(out.hidden)
            k, v = (np.asarray(a) for a in out.kv)
            for b in range(len(requests)):
                m = idx[b] >= 0
                parts[b].append((logits[b, m], hidden[b, m], k[:, b, m], v[:, b, m]))
        return [
            PromptOutput(
                logits=np.concatenate([p[0] for p in ps]),
                hidden=np.concatenate([p[1] for p in ps]),
                k=np.concatenate([p[2] for p in ps], 1),
                v=np.concatenate([p[3] for p in ps], 1),
            )
            for ps in parts
        ]

    # ------------------------------------------------------------------ generation

    def generate_ids(self, prompts: list[list[int]],
                     memories: list[list[LatentMemory]] | None = None,
                     max_new_tokens: int = 64, sampling: SamplingParams = GREEDY,
                     stop_tokens: tuple[int, ...] | None = None, keep_stop: bool = False,
                     return_logits: bool = False) -> list[Generation]:  # fmt: skip
        """Generate from token-id prompts (a consumer block over `memories[b]` when given), in
        turns of `max_batch` (`Scheduler` with `policy="static"`)."""
        memories = memories or [[] for _ in prompts]
        if len(memories) != len(prompts):
            raise UsageError(f"{len(prompts)} prompts but {len(memories)} memory lists")
        stop = tuple(stop_tokens) if stop_tokens is not None else (self.tok.eos_id,)
        scheduler = Scheduler(self, policy="static", max_queue=max(1, len(prompts)))
        held: list[str] = []
        jobs = []
        try:
            for b, (p, m) in enumerate(zip(prompts, memories)):
                keys = self._memory_keys(list(m), f"request {b}", held)
                jobs.append(scheduler.submit(Job(
                    list(p), max_new_tokens, sampling, stop, tuple(keys), keep_stop,
                    return_logits,
                ), what=f"generate: prompt {b}"))  # fmt: skip
            self.memories.release(held)
            held = []
            while not all(j.done for j in jobs):
                if not scheduler.step():
                    raise RuntimeError("generate: jobs left that the scheduler cannot run")
        finally:
            self.memories.release(held)
            for j in jobs:
                if not j.done:  # an error stopped the loop: free what the job holds
                    scheduler.cancel(j)
            scheduler.finish_cancelled()
        return [
            Generation(j.tokens, self.tok.decode([t for t in j.tokens if t not in stop]),
                       j.finish_reason, j.step_logits if return_logits else None)
            for j in jobs
        ]  # fmt: skip

    def generate(self, prompts: list[str], memories: list[list[LatentMemory]] | None = None,
                 **kwargs) -> list[Generation]:  # fmt: skip
        if isinstance(prompts, str):
            raise TypeError("generate: expected a list of prompts, got one string")
        ids = [[self.tok.bos_id, *self._encode_text(p, "generate")] for p in prompts]
        return self.generate_ids(ids, memories, **kwargs)
