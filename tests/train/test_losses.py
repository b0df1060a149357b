"""GRC losses: InfoNCE against NumPy, the combined loss, pooling, and GradCache microbatching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.config import GRCConfig, LossWeights, ModelConfig
from grc_jax.core.roles import DOC, QUERY
from grc_jax.data.layout import gen, latents, layout_example, text
from grc_jax.data.pipeline import BatchBuilder, Group
from grc_jax.model import forward, init_params
from grc_jax.model.head import init_head, pool_latents
from grc_jax.model.params import GRCParams
from grc_jax.train.grad import loss_and_grads
from grc_jax.train.losses import grc_loss, info_nce, token_cross_entropy

MODEL = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
K = 2


def _infonce_numpy(emb, kind, group, positive, doc, temp):
    total, count = 0.0, 0
    for i in np.where(kind == QUERY)[0]:
        pos = [
            j
            for j in range(len(kind))
            if kind[j] == DOC and positive[j] == 1 and group[j] == group[i]
        ]
        if not pos:
            continue
        p = pos[0]
        cands = [j for j in range(len(kind)) if kind[j] == DOC and (j == p or doc[j] != doc[i])]
        s = np.array([emb[i] @ emb[j] / temp for j in cands], np.float64)
        m = s.max()
        logz = m + np.log(np.exp(s - m).sum())
        total += logz - emb[i] @ emb[p] / temp
        count += 1
    return total, count


def test_info_nce_matches_numpy_reference():
    rng = np.random.default_rng(0)
    n = 24
    emb = rng.normal(size=(n, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    kind = rng.choice([0, QUERY, DOC, DOC], size=n)
    group = rng.integers(0, 5, size=n)
    positive = (rng.random(n) < 0.5).astype(int)
    doc = rng.integers(0, 6, size=n)
    # Make doc hashes consistent: a query's `doc` is its positive's hash.
    for i in np.where(kind == QUERY)[0]:
        pos = [j for j in range(n) if kind[j] == DOC and positive[j] and group[j] == group[i]]
        if pos:
            doc[i] = doc[pos[0]]
            for j in pos[1:]:
                positive[j] = 0
    want_sum, want_n = _infonce_numpy(emb, kind, group, positive, doc, 0.05)
    assert want_n >= 2
    got_sum, got_n = info_nce(
        jnp.asarray(emb, jnp.float32), jnp.asarray(kind), jnp.asarray(group),
        jnp.asarray(positive), jnp.asarray(doc), jnp.float32(0.05),
    )  # fmt: skip
    assert float(got_n) == want_n
    np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)


def test_token_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) < 0.6).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
    got, n = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(n) == weights.sum()


def test_pool_latents_mean_and_last():
    hidden = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
    seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
    blk = jnp.array([[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]])
    roles = jnp.array([[1, 3, 3, 1, 3, 2], [1, 3, 3, 3, 0, 0]])  # row1: token 3 is in block 1
    mean = pool_latents(hidden, seg, blk, roles, 2, "mean")
    last = pool_latents(hidden, seg, blk, roles, 2, "last")
    h = np.asarray(hidden)
    np.testing.assert_allclose(mean[0, 0], h[0, 1:3].mean(0))
    np.testing.assert_allclose(mean[0, 1], h[0, 4])
    np.testing.assert_allclose(mean[1, 0], h[1, 1:3].mean(0))
    np.testing.assert_allclose(last[0, 0], h[0, 2])
    np.testing.assert_allclose(last[1, 0], h[1, 2])
    np.testing.assert_allclose(mean[1, 1], 0.0)  # empty slot


def _batch(seed=0, rows=4, seq_len=96):
    """A real packed batch of GRC groups (queries, positives, hard negatives) from random tokens."""
    rng = np.random.default_rng(seed)
    builder = BatchBuilder(
        rows=rows, seq_len=seq_len, slots=6, group_id_stride=1, group_id_offset=0
    )

    def ids(n):
        return [int(x) for x in rng.integers(4, MODEL.vocab_size, size=n)]

    for g in range(6):
        q = [[text([2, *ids(4)]), gen([*ids(3), 3]), latents(K)], [text([2]), gen([*ids(4), 3])]]
        docs = [
            [[text([2, *ids(5)]), latents(K)], [text([2]), gen([*ids(5), 3])]] for _ in range(2)
        ]
        group = Group(
            examples=[layout_example(e, K, "independent") for e in [q, *docs]],
            kinds=[QUERY, DOC, DOC],
            positive=[0, 1, 0],
            docs=[100 + g, 100 + g, 200 + g],
        )
        assert builder.try_add(group), "test batch too small"
    return jax.tree.map(jnp.asarray, builder.finish())


@pytest.fixture(scope="module")
def params():
    grc = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)
    return GRCParams(
        model=init_params(MODEL, grc, jax.random.key(0)),
        head=init_head(grc, MODEL.d_model, jax.random.key(1)),
    )


def test_combined_loss_is_weighted_sum_of_separate_terms(params):
    batch = _batch()
    grc = GRCConfig(num_latents=K, projection_dim=16, loss_weights=LossWeights(0.3, 1.7, 0.5))
    total, m = grc_loss(params, MODEL, grc, batch)
    assert float(m["count/gen_tokens"]) > 0 and float(m["count/comp_tokens"]) > 0
    assert float(m["count/queries"]) == 6
    # Recompute each term separately from its own forward pass.
    out = forward(params.model, MODEL, grc, batch)
    gs, gn = token_cross_entropy(out.logits, batch.targets, batch.gen_weights)
    cs, cn = token_cross_entropy(out.logits, batch.targets, batch.comp_weights)
    np.testing.assert_allclose(float(m["loss/gen"]), float(gs / gn), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss/comp"]), float(cs / cn), rtol=1e-6)
    want = 0.3 * float(m["loss/gen"]) + 1.7 * float(m["loss/rep"]) + 0.5 * float(m["loss/comp"])
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    # Zeroing a weight removes exactly that term.
    no_rep = dataclasses.replace(grc, loss_weights=LossWeights(0.3, 0.0, 0.5))
    t2, _ = grc_loss(params, MODEL, no_rep, batch)
    np.testing.assert_allclose(float(t2), want - 1.7 * float(m["loss/rep"]), rtol=1e-5)


@pytest.mark.parametrize("microbatches", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_grad_cache_microbatches_match_full_batch(params, microbatches):
    batch = _batch(1)
    grc = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)
    full = jax.jit(lambda p, b: loss_and_grads(p, MODEL, grc, b, 1))
    micro = jax.jit(lambda p, b: loss_and_grads(p, MODEL, grc, b, microbatches))
    loss_f, m_f, g_f = full(params, batch)
    loss_m, m_m, g_m = micro(params, batch)
    np.testing.assert_allclose(float(loss_m), float(loss_f), rtol=1e-5)
    for key in ("loss/gen", "loss/rep", "loss/comp"):
        np.testing.assert_allclose(float(m_m[key]), float(m_f[key]), rtol=1e-5)
    flat_f = jax.tree_util.tree_flatten_with_path(g_f)[0]
    flat_m = jax.tree.leaves(g_m)
    for (path, a), b in zip(flat_f, flat_m):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(
            np.asarray(b) / scale,
            np.asarray(a) / scale,
            atol=1e-5,
            err_msg=jax.tree_util.keystr(path),
        )
    # The temperature really receives a gradient (it is learnable here).
    assert abs(float(g_f.head.log_temperature)) > 0


def test_microbatches_must_divide_batch(params):
    grc = GRCConfig(num_latents=K)
    with pytest.raises(ValueError, match="does not divide the batch size 4"):
        loss_and_grads(params, MODEL, grc, _batch(2), 3)


def test_sharded_loss_equals_unsharded(params, devices):
    """On a (2, 2, 2) mesh the contrastive loss still sees every device's documents."""
    from grc_jax.core.config import MeshConfig
    from grc_jax.core.sharding import activation_sharding, make_mesh
    from grc_jax.train.step import batch_shardings

    grc = GRCConfig(num_latents=K, projection_dim=16)
    batch = _batch(3, rows=8)
    ref_loss, ref = jax.jit(lambda p, b: grc_loss(p, MODEL, grc, b))(params, batch)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(batch, batch_shardings(batch, mesh))
    assert sharded.tokens.addressable_shards[0].data.shape[0] == 2  # rows really split
    with activation_sharding(mesh):
        loss, m = jax.jit(lambda p, b: grc_loss(p, MODEL, grc, b))(params, sharded)
    assert float(m["count/queries"]) == float(ref["count/queries"]) == 6
    for key in ("loss/gen", "loss/rep", "loss/comp"):
        np.testing.assert_allclose(float(m[key]), float(ref[key]), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)


@pytest.mark.parametrize("chunk", [16, 40, 128])
def test_target_token_losses_equal_the_full_logits_sums(params, chunk):
    """Logits only at target positions (sorted first, in chunks; chunks past the targets are
    skipped): the sums of `token_cross_entropy` over all logits, and the same gradients."""
    from grc_jax.model import project_logits
    from grc_jax.train.losses import target_token_losses

    batch = _batch(4)
    grc = GRCConfig(num_latents=K, projection_dim=16)
    assert 0 < float(jnp.mean((batch.gen_weights + batch.comp_weights) > 0)) < 0.7

    def sums(model_params, compact):
        out = forward(model_params, MODEL, grc, batch)
        if not compact:
            g, _ = token_cross_entropy(out.logits, batch.targets, batch.gen_weights)
            c, _ = token_cross_entropy(out.logits, batch.targets, batch.comp_weights)
            return g, c
        return target_token_losses(
            lambda h: project_logits(model_params, MODEL, grc, h), out.hidden, batch.targets,
            batch.gen_weights, batch.comp_weights, chunk=chunk,
        )  # fmt: skip

    want = jax.jit(lambda p: sums(p, False))(params.model)
    got = jax.jit(lambda p: sums(p, True))(params.model)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    g_want = jax.jit(jax.grad(lambda p: sum(sums(p, False))))(params.model)
    g_got = jax.jit(jax.grad(lambda p: sum(sums(p, True))))(params.model)
    for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got), strict=True):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5)


@pytest.mark.parametrize("microbatches", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_logits_at_targets_gives_the_same_loss_and_grads(params, microbatches):
    batch = _batch(5)
    grc = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)
    run = lambda at: jax.jit(  # noqa: E731
        lambda p, b: loss_and_grads(p, MODEL, grc, b, microbatches, logits_at=at)
    )(params, batch)
    (loss_a, m_a, g_a), (loss_t, m_t, g_t) = run("all"), run("targets")
    np.testing.assert_allclose(float(loss_t), float(loss_a), rtol=1e-5)
    for key in ("loss/gen", "loss/comp", "count/gen_tokens", "count/comp_tokens"):
        np.testing.assert_allclose(float(m_t[key]), float(m_a[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_t), strict=True):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5)
