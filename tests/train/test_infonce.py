"""InfoNCE over the query and document slots, scored shard-wise in tiles, against the dense
`[n, n]` version it replaced: loss sums, counts and gradients (embeddings and temperature), on
hand-made slot metadata and on batches of the real data pipeline, on one device and on meshes
of the 8 CPU devices; then the whole GRC loss (pooling + InfoNCE) against the old pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.config import GRCConfig, MeshConfig, load_config
from grc_jax.core.roles import DOC, QUERY
from grc_jax.core.sharding import activation_sharding, make_mesh
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.sources import JsonlSource
from grc_jax.data.synth import synthesize
from grc_jax.model import init_params
from grc_jax.model.head import init_head
from grc_jax.model.params import GRCParams
from grc_jax.train import losses
from grc_jax.train.grad import loss_and_grads
from grc_jax.train.infonce import info_nce
from grc_jax.train.step import batch_shardings
from tests.data.conftest import TINY_CONFIG
from tests.data.test_pipeline import HashTok
from tests.model.test_head import _pool_latents_einsum
from tests.train.test_losses import MODEL, K, _batch

_NEG = -1e30
MESHES = {"dp4_tp2": (2, 2, 2), "dp8": (8, 1, 1)}


def _info_nce_dense(emb, kind, group, positive, doc, temp):
    """`info_nce` as first written: every slot scored against every slot, `[n, n]`."""
    is_q = kind == QUERY
    is_d = kind == DOC
    scores = (emb @ emb.T) / temp  # [query slot, doc slot]
    pos = is_d[None, :] & (positive[None, :] == 1) & (group[None, :] == group[:, None])
    duplicate = is_d[None, :] & (doc[None, :] == doc[:, None]) & ~pos
    allowed = is_d[None, :] & ~duplicate
    scores = jnp.where(allowed, scores, _NEG)
    logz = jax.nn.logsumexp(scores, axis=-1)
    has_pos = is_q & jnp.any(pos, axis=-1)
    pos_score = jnp.max(jnp.where(pos, scores, _NEG), axis=-1)
    per_query = jnp.where(has_pos, logz - pos_score, 0.0)
    return jnp.sum(per_query), jnp.sum(has_pos.astype(jnp.float32))


def _hand_made(seed=0, n=45, p=8):
    """Slots covering every rule: empty slots, groups with a positive and negatives, a query
    whose positive is not in the batch, copies of a positive elsewhere (same `seg_doc`, another
    group, not flagged), a group of documents without a query; `n` no multiple of 8."""
    E, Q, D = 0, QUERY, DOC
    kind = [Q, D, D, D, E, Q, D, D, E, E, Q, D, E, Q, D, D, D, E, D, D, Q, E, D, D]
    group = [1, 1, 1, 1, 0, 2, 2, 2, 0, 0, 3, 3, 0, 4, 4, 4, 1, 0, 5, 5, 6, 0, 6, 2]
    positive = [0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0]
    # Query 1's positive (doc 11) is copied at slot 16 and slot 23 (other groups); query 3 has
    # no positive; query 4's negative slot 15 is a copy of query 2's positive (doc 21).
    doc = [11, 11, 12, 13, 0, 21, 21, 22, 0, 0, 31, 32, 0, 41, 41, 21, 11, 0, 51, 52, 61, 0, 61, 11]
    pad = n - len(kind)
    meta = [np.asarray(x + [0] * pad, np.int32) for x in (kind, group, positive, doc)]
    perm = np.random.default_rng(seed).permutation(n)  # slots in any order
    meta = [x[perm] for x in meta]
    emb = np.random.default_rng(seed + 1).normal(size=(n, p)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return jnp.asarray(emb), [jnp.asarray(x) for x in meta]


def _value_and_grads(fn, emb, meta, temp):
    f = jax.jit(jax.value_and_grad(lambda e, t: fn(e, *meta, t), argnums=(0, 1), has_aux=True))
    (total, count), (d_emb, d_temp) = f(emb, jnp.float32(temp))
    return total, count, d_emb, d_temp


def _assert_like_dense(emb, meta, temp, mesh=None, **tiles):
    want = _value_and_grads(lambda *a: _info_nce_dense(*a), emb, meta, temp)
    if mesh is None:
        got = _value_and_grads(lambda *a: info_nce(*a, **tiles), emb, meta, temp)
    else:
        with activation_sharding(mesh):
            got = _value_and_grads(lambda *a: info_nce(*a, **tiles), emb, meta, temp)
    assert float(got[1]) == float(want[1]) > 0
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    scale = float(jnp.max(jnp.abs(want[2])))
    np.testing.assert_allclose(np.asarray(got[2]) / scale, np.asarray(want[2]) / scale, atol=1e-5)
    np.testing.assert_allclose(float(got[3]), float(want[3]), rtol=1e-5)


@pytest.mark.parametrize("tiles", [{}, {"query_tile": 2, "doc_tile": 3}, {"doc_tile": 8}])
def test_equals_dense_on_hand_made_slots(tiles):
    emb, meta = _hand_made()
    kind, group, positive, doc = (np.asarray(x) for x in meta)
    # The cases are really there: a query without a positive, copies of a positive.
    positives = set(group[(kind == DOC) & (positive == 1)].tolist())
    with_pos = [g in positives for g in group[kind == QUERY].tolist()]
    assert len(with_pos) == 5 and sum(with_pos) == 4
    assert np.sum((kind == DOC) & (doc == 11)) == 3
    _assert_like_dense(emb, meta, 0.05, **tiles)


def test_equals_dense_on_random_slot_metadata():
    """Random kinds, groups, doc hashes, several positives a group: the same rules hold."""
    rng = np.random.default_rng(7)
    n = 300
    meta = [
        rng.choice([0, 0, QUERY, DOC, DOC], size=n), rng.integers(0, 40, size=n),
        (rng.random(n) < 0.5).astype(np.int32), rng.integers(0, 30, size=n),
    ]  # fmt: skip
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    metas = [jnp.asarray(x, jnp.int32) for x in meta]
    _assert_like_dense(jnp.asarray(emb), metas, 0.05, query_tile=16, doc_tile=32)


@pytest.mark.parametrize("mesh_shape", list(MESHES.values()), ids=list(MESHES))
def test_equals_dense_on_hand_made_slots_on_a_mesh(devices, mesh_shape):
    emb, meta = _hand_made(seed=3)
    mesh = make_mesh(MeshConfig(*mesh_shape))
    _assert_like_dense(emb, meta, 0.05, mesh=mesh, query_tile=2, doc_tile=4)


def test_sharded_program_gathers_documents_and_holds_no_slot_by_slot_scores(devices):
    """Each device scores its own queries against the gathered documents; no `[n, n]` (nor
    `[n / 8, n]`) float buffer is built."""
    n, p = 8192, 8
    emb = jnp.zeros((n, p))
    meta = [jnp.zeros(n, jnp.int32)] * 4
    mesh = make_mesh(MeshConfig(8, 1, 1))

    def loss(e, t, *meta):
        return info_nce(e, *meta, t)[0]

    with activation_sharding(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(emb, jnp.float32(1), *meta)
        compiled = lowered.compile()
    text = compiled.as_text()
    assert "all-gather" in text and "reduce-scatter" in text
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes < (n // 8) * n * 4 // 4, temp_bytes


@pytest.fixture(scope="module")
def pipeline_batches(tmp_path_factory):
    """Two batches of the real pipeline (16 rows x 256 tokens, 23 slots a row) from the
    synthetic corpus."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0)
    cfg = load_config(TINY_CONFIG, ["data.batch_size=16", "data.reasoning_dropout=0.5"])
    it = iter(train_dataset(cfg, HashTok(), JsonlSource(out / "train.jsonl"))[0])
    return [next(it) for _ in range(2)]


@pytest.mark.parametrize("mesh_name", [None, *MESHES])
def test_equals_dense_on_pipeline_batches(pipeline_batches, devices, mesh_name):
    mesh = None if mesh_name is None else make_mesh(MeshConfig(*MESHES[mesh_name]))
    for i, batch in enumerate(pipeline_batches):
        meta = [jnp.asarray(x).reshape(-1) for x in (
            batch.seg_kind, batch.seg_group, batch.seg_positive, batch.seg_doc)]  # fmt: skip
        assert 0.1 < float(jnp.mean(meta[0] == 0)) < 0.9  # empty slots and full ones
        emb = jax.random.normal(jax.random.key(i), (meta[0].shape[0], 16))
        emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        _assert_like_dense(emb, meta, 0.1, mesh=mesh, query_tile=8, doc_tile=32)


# ---------------------------------------------------------------------------------------------
# The whole GRC loss: scatter pooling + tiled InfoNCE against one-hot pooling + dense InfoNCE


@pytest.fixture(scope="module")
def params():
    grc = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)
    return GRCParams(
        model=init_params(MODEL, grc, jax.random.key(0)),
        head=init_head(grc, MODEL.d_model, jax.random.key(1)),
    )


@pytest.fixture
def old_losses(monkeypatch):
    """Switches `grc_jax.train.losses` to the old pooling and InfoNCE; returns a function that
    switches back."""

    def old():
        monkeypatch.setattr(losses, "pool_latents", _pool_latents_einsum)
        monkeypatch.setattr(losses, "info_nce", _info_nce_dense)

    return old, monkeypatch.undo


def _grads_close(got, want):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5)


@pytest.mark.parametrize(
    "mesh_name,microbatches",
    [(None, 1), ("dp4_tp2", 2), pytest.param("dp8", 1, marks=pytest.mark.slow)],
)
def test_grc_loss_and_grads_equal_the_old_ones(
    params, old_losses, devices, mesh_name, microbatches
):
    old, new = old_losses
    grc = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)
    batch = _batch(6, rows=8)
    mesh = None if mesh_name is None else make_mesh(MeshConfig(*MESHES[mesh_name]))

    def run():
        fn = jax.jit(lambda p, b: loss_and_grads(p, MODEL, grc, b, microbatches))
        if mesh is None:
            return fn(params, batch)
        with activation_sharding(mesh):
            return fn(params, jax.device_put(batch, batch_shardings(batch, mesh)))

    old()
    loss_old, m_old, g_old = run()
    new()
    loss_new, m_new, g_new = run()
    assert float(m_new["count/queries"]) == float(m_old["count/queries"]) == 6
    for key in ("loss/total", "loss/rep"):
        np.testing.assert_allclose(float(m_new[key]), float(m_old[key]), rtol=1e-5)
    np.testing.assert_allclose(float(loss_new), float(loss_old), rtol=1e-5)
    _grads_close(g_new, g_old)
    assert abs(float(g_new.head.log_temperature)) > 0
