"""Teacher-forced scores and plain-text embeddings from the model's own training forward.

Examples are laid out by `grc_jax.data.layout.one_per_row` exactly as training lays them out, and
run through `grc_jax.model.forward` with the engine's weights; only reductions are added here, and
they run on the device (a `[b, t, vocab]` logits array never comes back to the host).

Rows are grouped by length (sorted) into batches of `batch_size`, each padded to a power-of-two
bucket of at least 32 tokens, and a short last batch is filled with copies of its first example
(whose results are dropped): few distinct shapes, so few compiles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.roles import GEN
from grc_jax.data.layout import Example, one_per_row, text
from grc_jax.model import forward


def bucket(n: int, smallest: int = 32) -> int:
    """The power of two >= max(n, smallest)."""
    return max(smallest, 1 << max(0, int(n) - 1).bit_length())


def _length(example: Example) -> int:
    return sum(len(span.tokens) for block in example for span in block)


class ForwardScorer:
    """Teacher-forced statistics and mean-pooled text embeddings over an engine's weights.

    Args:
      engine: a `grc_jax.infer.engine.Engine` (its `cfg`, `model_params`, `K`).
      batch_size: examples per forward pass.
    """

    def __init__(self, engine: Any, batch_size: int = 8):
        self.engine, self.batch_size = engine, batch_size
        m, g = engine.cfg.model, engine.cfg.grc

        def stats(params, rows, target_block):
            logits = forward(params, m, g, rows).logits[:, :-1]  # position t predicts t + 1
            targets = rows.tokens[:, 1:]
            picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            nll = jax.nn.logsumexp(logits, -1) - picked
            hit = jnp.argmax(logits, -1) == targets
            # Targets are the GEN tokens of the example's target block, predicted from inside
            # that block (as the training losses count them).
            w = (
                (rows.roles[:, 1:] == GEN)
                & (rows.block_ids[:, 1:] == target_block[:, None])
                & (rows.block_ids[:, :-1] == rows.block_ids[:, 1:])
                & (rows.segment_ids[:, 1:] > 0)
            )
            return jnp.sum(hit & w, 1), jnp.sum(w, 1), jnp.sum(jnp.where(w, nll, 0.0), 1)

        def pooled(params, rows):
            hidden = forward(params, m, g, rows).hidden
            # The first token (bos) is left out of the mean: LLMs park large activations there.
            keep = (rows.segment_ids > 0) & (jnp.arange(rows.tokens.shape[1]) > 0)[None]
            total = jnp.sum(jnp.where(keep[..., None], hidden, 0.0), 1)
            return total / jnp.maximum(jnp.sum(keep, 1), 1)[:, None]

        self._stats = jax.jit(stats)
        self._pooled = jax.jit(pooled)

    def _batches(
        self,
        examples: Sequence[Example],
        run: Callable[[Any, list[int]], list],
        progress: Callable[[int, int], None] | None = None,
    ) -> list:
        """`run(rows, indices)` per batch (sorted by length); results back in input order."""
        k, mode, bs = self.engine.K, self.engine.cfg.grc.memory_mode, self.batch_size
        order = sorted(range(len(examples)), key=lambda i: _length(examples[i]))
        out: list = [None] * len(examples)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            chunk = [examples[i] for i in idx]
            chunk += [chunk[0]] * (bs - len(chunk))
            rows = one_per_row(chunk, k, mode, bucket(max(_length(e) for e in chunk)))
            for i, value in zip(idx, run(rows, idx)):
                out[i] = value
            if progress:
                progress(min(start + bs, len(order)), len(order))
        return out

    def teacher_forced(
        self,
        examples: Sequence[Example],
        target_blocks: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Per example `[hits, targets, summed nll]` (float64 `[n, 3]`) over the `GEN` tokens of
        block `target_blocks[i]`: greedy next-token hits and negative log-likelihood."""
        if not examples:
            return np.zeros((0, 3))
        blocks = list(target_blocks)

        def run(rows, idx):
            tb = np.asarray(
                [blocks[i] for i in idx] + [blocks[idx[0]]] * (len(rows.tokens) - len(idx))
            )
            hits, n, nll = self._stats(self.engine.model_params, rows, jnp.asarray(tb, jnp.int32))
            return [
                (float(h), float(c), float(s))
                for h, c, s in zip(np.asarray(hits), np.asarray(n), np.asarray(nll))
            ][: len(idx)]

        return np.asarray(self._batches(examples, run, progress), np.float64)

    def mean_pooled(
        self, docs: Sequence[Sequence[int]], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """L2-normalised mean of the final-norm hidden states of `[TEXT bos doc]` (no latents,
        bos left out): the plain causal LM's text embedding, `[n, d_model]` float32."""
        if not docs:
            return np.zeros((0, self.engine.cfg.model.d_model), np.float32)
        bos = self.engine.tok.bos_id
        examples = [[[text([bos, *d])]] for d in docs]

        def run(rows, idx):
            return list(np.asarray(self._pooled(self.engine.model_params, rows))[: len(idx)])

        emb = np.stack(self._batches(examples, run, progress)).astype(np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
