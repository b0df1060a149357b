"""Shared inference fixtures: a tiny random GRC model in both memory modes, a toy tokenizer,
engines, and an independent (jitted, fixed-shape) training forward to compare them against."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.batch import Rows
from grc_jax.core.config import Config, GRCConfig, ModelConfig
from grc_jax.data.layout import layout_example
from grc_jax.infer.engine import Engine, EngineOptions
from grc_jax.model import forward
from grc_jax.model.params import init_grc_params

K = 4
# A larger init scale than the default 0.02 makes attention sharp (scores of order 1-10), so a
# token wrongly seen or hidden moves the logits far more than the 1e-5 tolerance.
MODEL = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    init_std=0.2,
)
OPTS = EngineOptions(
    page_size=4, n_pages=48, max_batch=3, max_seq_len=40, max_memories=3, prefill_chunk=8
)
DOCS = ["the cat sat", "dogs run fast today", "ok"]
TRAIN_T = 96  # every training-forward row is padded to this length: one compile per config
TRAIN_B = 4


class ToyTokenizer:
    """Characters -> ids 3..63 (a..z and a few symbols map one to one); 0 pad, 1 bos, 2 eos."""

    vocab_size = 64
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, s: str) -> list[int]:
        return [3 + (ord(c) % 61) for c in s]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + (int(i) - 3) % 26) for i in ids if int(i) > 2)


def make_config(memory_mode: str = "independent", num_latents: int = K) -> Config:
    return Config(model=MODEL, grc=GRCConfig(num_latents=num_latents, memory_mode=memory_mode))


@pytest.fixture(scope="session")
def tok() -> ToyTokenizer:
    return ToyTokenizer()


@pytest.fixture(scope="session")
def cfg_ind() -> Config:
    return make_config("independent")


@pytest.fixture(scope="session")
def cfg_rec() -> Config:
    return make_config("recurrent")


@pytest.fixture(scope="session")
def params(cfg_ind):
    """One set of weights, used by both modes (the mode changes only the mask and positions)."""
    return jax.jit(init_grc_params, static_argnums=0)(cfg_ind, jax.random.key(0))


@pytest.fixture(scope="session")
def engine(cfg_ind, params, tok) -> Engine:
    return Engine(cfg_ind, params, tok, OPTS)


@pytest.fixture(scope="session")
def engine_rec(cfg_rec, params, tok) -> Engine:
    return Engine(cfg_rec, params, tok, OPTS)


@pytest.fixture(scope="session")
def compressed(engine):
    """(memory, embedding) of each of DOCS, made by the independent-mode engine."""
    return engine.compress(DOCS)


class TrainForward:
    """The training forward pass of laid-out examples, one row each, padded to a fixed shape."""

    def __init__(self, cfg: Config, params):
        self.cfg, self.params = cfg, params.model
        self._fn = jax.jit(lambda p, b: forward(p, cfg.model, cfg.grc, b, return_kv=True))

    def rows(self, examples) -> Rows:
        assert len(examples) <= TRAIN_B
        rows = {
            k: np.zeros((TRAIN_B, TRAIN_T), np.int32)
            for k in ("tokens", "segment_ids", "block_ids", "roles", "positions")
        }
        for i, ex in enumerate(examples):
            laid = layout_example(ex, self.cfg.grc.num_latents, self.cfg.grc.memory_mode)
            n = len(laid["tokens"])
            assert n <= TRAIN_T
            for key in ("tokens", "block_ids", "roles", "positions"):
                rows[key][i, :n] = laid[key]
            rows["segment_ids"][i, :n] = 1
        return Rows(**rows)

    def __call__(self, examples):
        """(rows, output) with output fields as numpy arrays."""
        rows = self.rows(examples)
        out = self._fn(self.params, jax.tree.map(jnp.asarray, rows))
        kv = tuple(np.asarray(a) for a in out.kv)
        return rows, SimpleNamespace(
            logits=np.asarray(out.logits), hidden=np.asarray(out.hidden), kv=kv
        )


@pytest.fixture(scope="session")
def train_forward(cfg_ind, params) -> TrainForward:
    return TrainForward(cfg_ind, params)


@pytest.fixture(scope="session")
def train_forward_rec(cfg_rec, params) -> TrainForward:
    return TrainForward(cfg_rec, params)


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
