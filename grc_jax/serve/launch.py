"""Build a server: load the model, size the engine, start its thread, compile, make the app."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from grc_jax.convert.adapter import load_any
from grc_jax.core.errors import UsageError
from grc_jax.infer.engine import Engine, EngineOptions
from grc_jax.infer.index import check_index, load_index
from grc_jax.infer.scheduler import warm_up
from grc_jax.serve.app import create_app
from grc_jax.serve.worker import EngineWorker


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What `grc serve` takes (each field is the flag of the same name)."""

    model: str
    step: int | None = None
    served_model_name: str | None = None
    index: str | None = None
    max_batch: int = 16
    max_seq_len: int = 1024
    page_size: int = 16
    n_pages: int = 0  # 0: enough for every slot at max_seq_len
    prefill_chunk: int = 64
    max_memories: int = 8
    memory_slots: int = 256
    max_queue: int = 256
    policy: str = "continuous"
    attention_impl: str = "auto"
    poison_freed_pages: bool = False

    def __post_init__(self):
        for name in ("max_batch", "max_seq_len", "page_size", "prefill_chunk", "max_memories",
                     "memory_slots", "max_queue"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')}: expected at least 1, got {value!r}")
        if self.n_pages < 0:
            raise UsageError(f"--n-pages: expected >= 0 (0: automatic), got {self.n_pages}")


def build_server(opts: ServeOptions) -> tuple[Any, EngineWorker, str]:
    """(ASGI app, engine worker, served model name): the model loaded, every generation program
    compiled (not on the first request), the engine's thread started."""
    index = load_index(opts.index) if opts.index else None
    cfg, params, tok = load_any(opts.model, opts.step)
    pages = opts.n_pages or opts.max_batch * -(-opts.max_seq_len // opts.page_size) + 1
    engine = Engine(cfg, params, tok, EngineOptions(
        page_size=opts.page_size, n_pages=pages, max_batch=opts.max_batch,
        max_seq_len=opts.max_seq_len, max_memories=opts.max_memories,
        prefill_chunk=opts.prefill_chunk, attention_impl=opts.attention_impl,
        memory_slots=opts.memory_slots, poison_freed_pages=opts.poison_freed_pages,
    ))  # fmt: skip
    if index is not None:
        check_index(engine, index)
    warm_up(engine)
    worker = EngineWorker(engine, policy=opts.policy, max_queue=opts.max_queue).start()
    name = opts.served_model_name or Path(opts.model).resolve().name
    return create_app(worker, name, index), worker, name
