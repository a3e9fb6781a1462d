"""One forward path: the KV cache is an optional argument of the training forward pass.

Cached generation (prefill, then chunks and single tokens) must reproduce the uncached pass, for
every layer layout and attention kernel, and the uncached (training) program must carry no
cache machinery.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.model import Transformer
from lm.model.kv_cache import KVCache

# cudnn needs a GPU; splash needs sequences in multiples of 128 (tests/test_splash.py).
CPU_KERNELS = ["xla", "math"]


def _model(**overrides) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(tiny_model(**overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("attention", CPU_KERNELS)
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_cached_chunks_reproduce_the_uncached_forward(scan, attention):
    model = _model(scan_layers=scan, attention=attention)
    pads = np.array([0, 3], np.int32)  # row 1 is left-padded by 3 slots
    tokens = np.random.default_rng(0).integers(1, 64, (2, 10)).astype(np.int32)
    slots = np.arange(tokens.shape[1])[None]
    segments = (slots >= pads[:, None]).astype(np.int32)  # padding is its own segment
    positions = np.maximum(slots - pads[:, None], 0)
    chunks = [5, 3, 1, 1]  # a prefill, a multi-token chunk after it, then decode steps

    @jax.jit
    def forwards(model, tokens):
        full = model(tokens, segments, positions)
        cache = KVCache.zeros(model.cfg, jnp.asarray(pads), 16)
        cached, start = [], 0
        for length in chunks:
            logits, cache = model(tokens[:, start : start + length], cache=cache)
            cached.append(logits)
            start += length
        return full, jnp.concatenate(cached, axis=1), cache.length

    full, cached, filled = forwards(model, tokens)
    real = slots >= pads[:, None]  # a padding query attends to nothing in the cache
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)
    assert int(filled) == sum(chunks)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_training_program_has_no_cache_ops(scan):
    """The gradient of the uncached forward (with dropout and remat) neither writes nor reads a
    cache; the same model's cached forward writes one."""
    model = _model(scan_layers=scan, dropout=0.1, remat="full")
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 8), jnp.int32)
    segments, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(8), (2, 8))

    def loss(params):
        logits = nnx.merge(graphdef, params)(
            tokens, segments, positions, dropout_key=jax.random.key(0)
        )
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    def decode(params, cache):
        return nnx.merge(graphdef, params)(tokens[:, :1], cache=cache)

    training = str(jax.make_jaxpr(jax.grad(loss))(params))
    cache = KVCache.zeros(model.cfg, jnp.zeros((2,), jnp.int32), 16)
    decoding = str(jax.make_jaxpr(decode)(params, cache))
    assert "dynamic_update_slice" in decoding  # cache writes
    assert "dynamic_update_slice" not in training
    assert "dynamic_slice" not in training  # a scanned cache's per-layer read
