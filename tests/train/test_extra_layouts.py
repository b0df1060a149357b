"""Training on the extra layouts: a few steps with RAG examples (independent mode) and with
recurrent chains (recurrent mode) run and give finite losses."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from grc_jax.core.config import load_config
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.sources import JsonlSource
from grc_jax.data.synth import synthesize
from grc_jax.data.tokenizer import load_tokenizer
from grc_jax.train.loop import train
from tests.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, queries_per_doc=1)
    return out


@pytest.mark.parametrize(
    "extra",
    [
        ["data.rag_fraction=0.5"],
        ["grc.memory_mode=recurrent", "data.recurrent_fraction=0.5", "data.chunk_tokens=6"],
    ],
    ids=["rag", "recurrent-chain"],
)
def test_a_few_steps_on_extra_layouts_give_finite_losses(data_dir, tmp_path, extra):
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            *TINY_MODEL,
            f"data.train_path={data_dir}/train.jsonl",
            f"data.eval_path={data_dir}/validation.jsonl",
            f"train.output_dir={tmp_path}",
            "train.run_name=extras", "train.steps=3", "train.log_every=1",
            "train.eval_every=1000", "train.warmup_steps=1",
            *extra,
        ],
    )  # fmt: skip
    train(cfg, quiet=True)
    # The batches it trained on hold extra examples (EMPTY slots with tokens).
    tok = load_tokenizer(tmp_path / "extras/tokenizer.model")
    batch = next(iter(train_dataset(cfg, tok, JsonlSource(data_dir / "train.jsonl"))[0]))
    empty = np.argwhere(batch.seg_kind == 0)
    assert any((batch.segment_ids[r] == s + 1).any() for r, s in empty)
    metrics = (tmp_path / "extras/metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in metrics]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss/total", "loss/gen", "loss/rep", "loss/comp"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
