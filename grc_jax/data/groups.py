"""A record's group of training examples (DESIGN.md section 4): the layouts every inference mode
needs, written as blocks of spans for `grc_jax.data.layout`.

Every record gives a query and its documents (the InfoNCE slots):

    query:    block 0 [TEXT bos+query] [GEN reasoning + "answer : ..." + eos] [LATENT x K]
              block 1 [TEXT bos] [GEN query + eos]                  (reconstruct from the memory)
    document: block 0 [TEXT bos+doc] [LATENT x K]
              block 1 [TEXT bos] [GEN compress_target or doc + eos]

A chosen fraction of records also gives one extra example (slot kind EMPTY: no InfoNCE):

    RAG (independent): blocks 0..M-1 [TEXT bos+doc_m] [LATENT x K]  (the positive among M-1 hard
                       negatives, shuffled), block M [TEXT bos+query] [GEN target + eos]
    chain (recurrent): block 0 [TEXT bos+chunk_0] [LATENT x K], block b [TEXT chunk_b] [LATENT x K]
                       (reads block b-1's latents), last block [TEXT bos] [GEN last chunk + eos]

Each lays out exactly as inference runs it: a RAG memory is what `compress` makes of a document
(`[bos doc][LATENT x K]`) and its consumer what `generate(question, memories)` reads
(`[bos question]` after M*K memory positions); a chain's first chunk is a `compress`, every later
one an `update` (the chunk with no bos, right after the old memory's K positions), and its
consumer a `generate` over the last memory.

A consumer block opens with a TEXT `bos` so that its first target is predicted from inside the
block (a latent memory holds K/V, not the hidden state of the previous block's last latent).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from grc_jax.core.config import DataConfig
from grc_jax.core.roles import DOC, QUERY, SlotKind
from grc_jax.data.layout import Example, gen, latents, layout_example, text
from grc_jax.data.schema import GRCRecord
from grc_jax.data.tokenizer import Tokenizer

EMPTY = SlotKind.EMPTY


def doc_hash(text_: str) -> int:
    return zlib.crc32(text_.encode()) & 0x7FFFFFFF


def _crc(salt: str, seed: int, index: int) -> int:
    return zlib.crc32(f"{salt}{seed}:{index}".encode())


def chosen(fraction: float, salt: str, seed: int, index: int) -> bool:
    """Whether record number `index` of the data stream is among `fraction` of the records:
    decided by a hash of `salt`, `seed` and `index` alone, so the same data order (a resumed run
    included) chooses the same records, and nothing is drawn from a random state."""
    return _crc(salt, seed, index) % 10_000 < fraction * 10_000


@dataclasses.dataclass
class Group:
    """Laid-out examples of one record plus their slot metadata (kind, is-positive, doc hash)."""

    examples: list[dict[str, np.ndarray]]
    kinds: list[int]
    positive: list[int]
    docs: list[int]

    def with_extra(self, laid: list[dict[str, np.ndarray]]) -> Group:
        """This group plus laid-out examples in EMPTY slots (no InfoNCE role)."""
        n = len(laid)
        return Group(
            self.examples + laid, self.kinds + [EMPTY] * n, self.positive + [0] * n,
            self.docs + [0] * n,
        )  # fmt: skip


def query_example(tok: Tokenizer, record: GRCRecord, k: int, with_reasoning: bool) -> Example:
    block0 = [text([tok.bos_id, *tok.encode(record.query)])]
    if with_reasoning and (record.reasoning or record.answer):
        parts = [record.reasoning] if record.reasoning else []
        if record.answer:
            parts.append(f"answer : {record.answer}")
        block0.append(gen([*tok.encode(" ".join(parts)), tok.eos_id]))
    block0.append(latents(k))
    block1 = [text([tok.bos_id]), gen([*tok.encode(record.query), tok.eos_id])]
    return [block0, block1]


def document_example(tok: Tokenizer, doc: str, target: str | None, k: int) -> Example:
    block0 = [text([tok.bos_id, *tok.encode(doc)]), latents(k)]
    block1 = [text([tok.bos_id]), gen([*tok.encode(target or doc), tok.eos_id])]
    return [block0, block1]


def make_group(
    tok: Tokenizer, record: GRCRecord, k: int, memory_mode: str, with_reasoning: bool
) -> Group:
    """The query and document examples of `record` (its InfoNCE slots), laid out."""
    examples = [query_example(tok, record, k, with_reasoning)]
    examples.append(document_example(tok, record.positive, record.compress_target, k))
    examples += [document_example(tok, n, None, k) for n in record.negatives]
    laid = [layout_example(e, k, memory_mode) for e in examples]
    n_docs = 1 + len(record.negatives)
    return Group(
        examples=laid,
        kinds=[QUERY] + [DOC] * n_docs,
        positive=[0, 1] + [0] * len(record.negatives),
        docs=[doc_hash(record.positive)] * 2 + [doc_hash(n) for n in record.negatives],
    )


def rag_example(
    tok: Tokenizer, record: GRCRecord, k: int, memories: int, target_tokens: int,
    rng: np.random.Generator,
) -> Example | None:  # fmt: skip
    """M = min(`memories`, 1 + negatives) compression blocks, the positive among hard negatives
    (chosen and ordered by `rng`), then a consumer `[TEXT bos+query] [GEN target + eos]`, target =
    the first `target_tokens` tokens of `compress_target` or else of the positive: only the right
    memory holds it. None for a record without negatives (nothing to choose among)."""
    if not record.negatives:
        return None
    n = min(memories - 1, len(record.negatives))
    picked = rng.choice(len(record.negatives), size=n, replace=False)
    docs = [record.positive, *(record.negatives[int(i)] for i in picked)]
    order = rng.permutation(len(docs))
    blocks = [[text([tok.bos_id, *tok.encode(docs[int(i)])]), latents(k)] for i in order]
    target = tok.encode(record.compress_target or record.positive)[:target_tokens]
    consumer = [text([tok.bos_id, *tok.encode(record.query)]), gen([*target, tok.eos_id])]
    return [*blocks, consumer]


def chain_example(
    tok: Tokenizer, doc: str, k: int, chunk_tokens: int, max_chunks: int
) -> Example | None:
    """`doc` cut into chunks of `chunk_tokens` tokens (the first `max_chunks`), each compressed
    reading the previous chunk's memory (`recurrent` mode), then a consumer `[TEXT bos] [GEN last
    chunk + eos]` that reads only the last memory. The first chunk opens with bos (a `compress`),
    the others do not (an `update`). None when `doc` is one chunk (no chain)."""
    ids = tok.encode(doc)
    chunks = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)][:max_chunks]
    if len(chunks) < 2:
        return None
    blocks = [[text([tok.bos_id, *chunks[0]]), latents(k)]]
    blocks += [[text(c), latents(k)] for c in chunks[1:]]
    return [*blocks, [text([tok.bos_id]), gen([*chunks[-1], tok.eos_id])]]


def extra_examples(
    tok: Tokenizer, record: GRCRecord, index: int, k: int, data: DataConfig
) -> list[Example]:
    """The RAG example and / or recurrent chain that record number `index` of the data stream
    adds to its group: each with probability `data.rag_fraction` / `data.recurrent_fraction`,
    drawn from `data.shuffle_seed` and `index` (so a resumed run adds the same ones). With both
    fractions 0 nothing is drawn or built."""
    out: list[Example | None] = []
    seed = data.shuffle_seed
    if data.rag_fraction > 0 and chosen(data.rag_fraction, "rag:", seed, index):
        rng = np.random.default_rng(_crc("rag-order:", seed, index))
        out.append(rag_example(tok, record, k, data.rag_memories, data.rag_target_tokens, rng))
    if data.recurrent_fraction > 0 and chosen(data.recurrent_fraction, "chain:", seed, index):
        out.append(chain_example(tok, record.positive, k, data.chunk_tokens, data.max_chunks))
    return [ex for ex in out if ex is not None]
