"""Splash attention (the Pallas interpreter on CPU) against the `math` kernel, and the
platform profiles that choose it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_model
from flax import nnx

from lm.config import Config, DataConfig, MeshConfig
from lm.model.attention import attention_mask, dot_product_attention
from lm.model.build import build_model
from lm.model.splash import block_sizes, splash_attention
from lm.model.transformer import Transformer
from lm.runtime.mesh import make_mesh
from lm.runtime.platforms import attention_kernel, for_platform

# Two or three documents packed per row, ending mid-tile so tiles mix segments. L=384 takes
# 128-wide tiles: 3 x 3 per head, some skipped (causal), some partly masked.
_SEGMENTS = {
    128: [[1] * 50 + [2] * 40 + [3] * 38, [1] * 100 + [2] * 28],
    384: [[1] * 150 + [2] * 150 + [3] * 84, [1] * 300 + [2] * 84],
}


def _inputs(length: int, head_dim: int, dtype: jnp.dtype, seed: int = 0):
    """q [2, L, 4, K], k and v [2, L, 2, K] (grouped-query), segment ids [2, L]."""
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.normal(size=(2, length, heads, head_dim)), dtype) for heads in (4, 2, 2)
    )
    return q, k, v, jnp.asarray(_SEGMENTS[length], jnp.int32)


def _math(q, k, v, segment_ids, causal):
    return dot_product_attention(q, k, v, attention_mask(segment_ids, causal), "math")


@pytest.mark.parametrize("causal", [True, False])
def test_splash_matches_math_in_float32(causal):
    q, k, v, segment_ids = _inputs(384, 32, jnp.float32)
    out = jax.jit(splash_attention, static_argnums=4)(q, k, v, segment_ids, causal)
    np.testing.assert_allclose(out, _math(q, k, v, segment_ids, causal), atol=1e-5, rtol=1e-5)


def test_splash_gradients_match_math():
    q, k, v, segment_ids = _inputs(384, 32, jnp.float32, seed=1)

    def loss(attention):
        # A fixed random cotangent, so every output element's gradient is checked.
        weights = jax.random.normal(jax.random.key(0), q.shape)
        return lambda q, k, v: (attention(q, k, v, segment_ids, True) * weights).sum()

    got = jax.jit(jax.grad(loss(splash_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_math), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_matches_math_in_bfloat16(causal):
    q, k, v, segment_ids = _inputs(384, 64, jnp.bfloat16)
    out = jax.jit(splash_attention, static_argnums=4)(q, k, v, segment_ids, causal)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    # Against float32 math on the same bf16 inputs: within a few bf16 ulps (2^-8 relative).
    np.testing.assert_allclose(
        out.astype(jnp.float32), _math(*f32, segment_ids, causal), atol=2e-2, rtol=2e-2
    )


def test_block_sizes_suit_short_and_long_sequences():
    short, long = block_sizes(256), block_sizes(8192)
    assert (short.block_q, short.block_kv, short.block_kv_compute) == (256, 256, 256)
    assert (long.block_q, long.block_kv, long.block_kv_compute) == (512, 1024, 512)
    assert block_sizes(384).block_kv == 128
    with pytest.raises(ValueError, match="divisible by 128"):
        block_sizes(100)


@pytest.mark.parametrize(
    "platform, seq_len, attention, loss_chunk",
    [
        ("cpu", 1024, "math", 0),
        ("gpu", 1024, "cudnn", 512),
        ("tpu", 1024, "splash", 512),
        ("tpu", 512, "splash", 0),  # a one-tile loss tiles nothing
        ("tpu", 200, "xla", 0),  # splash needs 128-token lanes; 512 does not divide 200
    ],
)
def test_platform_profiles_choose_the_auto_values(platform, seq_len, attention, loss_chunk):
    cfg = Config(model=tiny_model(max_seq_len=1024), data=DataConfig(seq_len=seq_len))
    chosen = for_platform(cfg, platform)
    assert (chosen.model.attention, chosen.train.loss_chunk) == (attention, loss_chunk)
    explicit = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, attention="xla"),
        train=dataclasses.replace(cfg.train, loss_chunk=256),
    )
    assert for_platform(explicit, "tpu") is explicit


@pytest.mark.parametrize("platform, length", [("cpu", 16), ("tpu", 1), ("tpu", 48), ("gpu", 1)])
def test_auto_attention_is_chosen_per_call_for_the_rows_length(platform, length):
    # Decoding one token or prefilling a short bucket on TPU falls back from splash.
    chosen = attention_kernel("auto", length, platform)
    assert chosen == {"cpu": "math", "tpu": "xla", "gpu": "cudnn"}[platform]
    assert attention_kernel("xla", length, platform) == "xla"


def test_models_built_on_this_cpu_compute_with_its_profiles_kernel():
    batch = random_batch()
    logits = {}
    for attention in ("auto", "math"):
        with nnx.use_eager_sharding(False):
            model = build_model(Config(model=tiny_model(attention=attention)), nnx.Rngs(0))
        logits[attention] = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    np.testing.assert_array_equal(logits["auto"], logits["math"])


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_on_a_mesh_matches_math(kv_heads):
    # Rows split over data x fsdp; heads over tensor only where the key/value heads split too.
    q, k, v, segment_ids = _inputs(128, 32, jnp.float32, seed=2)
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    q, k, v, segment_ids = (jnp.tile(x, (2,) + (1,) * (x.ndim - 1)) for x in (q, k, v, segment_ids))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        out = jax.jit(splash_attention, static_argnums=4)(q, k, v, segment_ids, True)
    np.testing.assert_allclose(out, _math(q, k, v, segment_ids, True), atol=1e-5, rtol=1e-5)


def _transformer(attention: str, causal: bool = True) -> Transformer:
    cfg = tiny_model(attention=attention, max_seq_len=128, causal=causal)
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
def test_a_transformer_with_splash_matches_math_in_loss_and_every_gradient(causal):
    batch = random_batch(rows=2, length=128, docs=3)
    inputs = [jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions")]
    results = {}
    for impl in ("math", "splash"):

        def loss(model):
            return model(*inputs).astype(jnp.float32).std()

        value, grads = nnx.value_and_grad(loss)(_transformer(impl, causal))
        results[impl] = (value, jax.tree.leaves(nnx.state(grads)))
    np.testing.assert_allclose(results["splash"][0], results["math"][0], rtol=1e-5)
    for got, want in zip(results["splash"][1], results["math"][1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_the_splash_path_builds_no_dense_mask():
    batch = random_batch(rows=2, length=128, docs=3)
    inputs = [jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions")]
    model = _transformer("splash")
    jaxpr = str(jax.make_jaxpr(lambda *xs: model(*xs))(*inputs))
    assert "pallas_call" in jaxpr and "bool[2,1,128,128]" not in jaxpr
