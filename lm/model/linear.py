"""Matrix multiplies over the last axis, lowered as plain 2-D GEMMs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(
    x: jax.Array, w: jax.Array, dtype: jnp.dtype, in_dims: int = 1, out_dtype=None
) -> jax.Array:
    """Contract the last `in_dims` axes of `x` with the first `in_dims` axes of `w`.

    Leading axes are flattened so XLA emits one [tokens, in] × [in, out] GEMM: on CPU its
    backward pass is ~2× faster than the batched einsum with several contracting dimensions.
    `out_dtype` sets the accumulation/result type (e.g. float32 logits from bf16 inputs).
    """
    lead, contract = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims :]
    out = w.shape[in_dims:]
    x_2d = x.astype(dtype).reshape(math.prod(lead), math.prod(contract))
    w_2d = w.astype(dtype).reshape(math.prod(contract), math.prod(out))
    y_2d = jnp.matmul(x_2d, w_2d, preferred_element_type=out_dtype)
    return y_2d.reshape(*lead, *out)
