"""Attention math against a plain numpy reference: masks, grouped-query heads, RoPE."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.config import ModelConfig
from lm.model.attention import KERNELS, attention_mask, dot_product_attention, rope


def numpy_attention(q, k, v, segment_ids, causal):
    """softmax(QKᵀ/√d)V per head, key/value heads repeated for grouped queries."""
    b, length, h, d = q.shape
    rep = h // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(d)
    allowed = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones((length, length), bool))
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


@pytest.mark.parametrize("implementation", ["xla", "math"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy_with_causal_and_segment_masks(implementation, kv_heads, causal):
    rng = np.random.default_rng(kv_heads)
    q = rng.normal(size=(2, 12, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 12, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 12, kv_heads, 8)).astype(np.float32)
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
    mask = attention_mask(jnp.asarray(segment_ids), causal)
    out = dot_product_attention(q, k, v, mask, implementation)
    expected = numpy_attention(q, k, v, segment_ids, causal)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    k_heads_major, v_heads_major = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = dot_product_attention(
        q, k_heads_major, v_heads_major, mask, implementation, heads_major=True
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [256, 384])
def test_math_kernel_skipping_masked_causal_blocks_equals_numpy_and_dense_gradients(length):
    # Two and three 128-token query blocks, packed documents crossing block edges, grouped
    # queries: the blocks see exactly what the dense mask allows, forward and backward.
    rng = np.random.default_rng(length)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(2))
    ids = np.ones((2, length), np.int32)
    ids[0, 100:300] = 2
    ids[0, 300:] = 0
    ids[1, length // 2 :] = 3
    segment_ids = jnp.asarray(ids)
    packed = KERNELS["math"].packed
    out = packed(q, k, v, segment_ids, True)
    expected = numpy_attention(*(np.asarray(x) for x in (q, k, v)), ids, True)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * jnp.cos(jnp.arange(8.0)))

    def dense(q, k, v):
        mask = attention_mask(segment_ids, True)
        return dot_product_attention(q, k, v, mask, "math")

    def blocked(q, k, v):
        return packed(q, k, v, segment_ids, True)

    grads = [jax.grad(lambda *x, f=f: loss(f, *x), (0, 1, 2))(q, k, v) for f in (blocked, dense)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def jitted(module: nnx.Module):
    """`module`'s call, compiled once per input shape instead of dispatched op by op."""
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    return lambda *args: call(state, *args)


def test_packed_documents_do_not_see_each_other_through_the_model():
    from lm.model import Transformer

    cfg = tiny_model()
    with nnx.use_eager_sharding(False):
        model = jitted(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 10], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(10))], jnp.int32)
    packed = model(tokens, segments, positions)
    alone = model(tokens[:, 6:])  # the second document on its own
    np.testing.assert_allclose(np.asarray(packed[:, 6:]), np.asarray(alone), rtol=1e-5, atol=1e-5)
    changed = model(tokens.at[0, 0].set(7), segments, positions)
    np.testing.assert_array_equal(np.asarray(changed[:, 6:]), np.asarray(packed[:, 6:]))


def test_causal_model_output_ignores_later_tokens():
    from lm.model import Transformer

    with nnx.use_eager_sharding(False):
        model = jitted(Transformer(tiny_model(), rngs=nnx.Rngs(1)))
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    base = model(tokens)
    later = model(tokens.at[0, 10].set(3))
    np.testing.assert_array_equal(np.asarray(base[:, :10]), np.asarray(later[:, :10]))
    assert not np.allclose(np.asarray(base[:, 10:]), np.asarray(later[:, 10:]))


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        qm = rope(q, jnp.array([[m]]), 10000.0)
        kn = rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-6)
    assert score(7, 0) != pytest.approx(score(0, 0), rel=1e-3)
    rotated = rope(q, jnp.array([[123]]), 10000.0)
    assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-6)


def test_rope_rotates_channel_pairs_by_position_times_frequency():
    x = jnp.zeros((1, 1, 1, 4)).at[0, 0, 0, 0].set(1.0)  # unit vector on pair (0, 2)
    out = rope(x, jnp.array([[3]]), 10000.0)[0, 0, 0]
    np.testing.assert_allclose(np.asarray(out), [np.cos(3.0), 0.0, np.sin(3.0), 0.0], atol=1e-6)


def test_gqa_with_one_kv_head_equals_mha_with_repeated_kv_weights():
    from lm.model.attention import Attention

    with nnx.use_eager_sharding(False):
        gqa = Attention(tiny_model(num_kv_heads=1), rngs=nnx.Rngs(0))
        mha = Attention(tiny_model(num_kv_heads=4), rngs=nnx.Rngs(0))
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 4, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], 4, axis=1)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    segments = jnp.ones((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    np.testing.assert_allclose(
        np.asarray(jitted(gqa)(x, segments, positions)[0]),
        np.asarray(jitted(mha)(x, segments, positions)[0]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_every_configurable_attention_name_but_auto_is_a_kernel():
    import lm.model.build  # noqa: F401  (imports every kernel module, as a run does)

    names = typing.get_args(typing.get_type_hints(ModelConfig)["attention"])
    assert "auto" in names
    assert set(names) - {"auto"} == set(KERNELS)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_prefix_rows_masked_by_length_equal_the_segment_mask_on_real_tokens(kv_heads, causal):
    """Rows of one sequence then padding (task rows): the length-masked path (`prefix`, how
    cuDNN gets its own causal/padding mask type) gives the dense-mask path's outputs and
    gradients at every real token, the whole model through."""
    from lm.model.transformer import Transformer

    cfg = tiny_model(attention="xla", num_kv_heads=kv_heads, causal=causal)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    lengths = np.array([16, 11, 3, 1])
    real = np.arange(16)[None, :] < lengths[:, None]
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    segment_ids = real.astype(np.int32)
    positions = np.where(real, np.arange(16), 0).astype(np.int32)

    def loss(model, prefix_rows):
        h = model.hidden(tokens, segment_ids, positions, prefix_rows=prefix_rows)
        return jnp.sum(jnp.where(real[..., None], jnp.sin(h), 0.0)), h

    grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True), static_argnums=1)
    (dense, h_dense), g_dense = grad(model, False)
    (by_length, h_length), g_length = grad(model, True)
    np.testing.assert_allclose(np.asarray(h_length)[real], np.asarray(h_dense)[real], atol=1e-5)
    np.testing.assert_allclose(by_length, dense, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_length), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_task_objectives_mark_rows_of_one_example_each():
    """Only rows the encoders lay out as one example from position 0 take the length mask:
    packed chat rows hold several conversations and keep the segment mask."""
    from lm.config import load_config
    from lm.tasks import task_for

    def prefix(task, *overrides):
        cfg = load_config(None, [f"finetune.task={task}", *overrides])
        return task_for(cfg).objective(cfg, {}).prefix_rows

    assert prefix("text_to_text") is True
    assert prefix("chat", "finetune.packing=false") is True
    assert prefix("chat", "finetune.packing=true") is False


def test_length_masked_kernels_give_padding_queries_zeros():
    """Weight gradients sum over padding positions too: their attention output is exactly 0."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 8, 4, 8)).astype(np.float32) for _ in range(3))
    lengths = jnp.asarray([8, 3], jnp.int32)
    out = np.asarray(KERNELS["xla"].prefix(q, k[:, :, :2], v[:, :, :2], lengths, True))
    assert (out[1, 3:] == 0).all() and np.isfinite(out).all() and (out[1, :3] != 0).any()
