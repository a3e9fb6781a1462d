"""Matrix multiplies over the last axis, lowered as plain 2-D GEMMs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm.runtime.platforms import per_platform


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


def dense_transposed(x: jax.Array, w_OxI: jax.Array, dtype: jnp.dtype, out_dtype=None) -> jax.Array:
    """x [..., I] times the transpose of w [O, I]: the vocabulary projection, whose [V, D]
    matrix is also the embedding table. Same values as `dense(x, w_OxI.T, ...)`; the weight
    gradient is formed as the platform profile says (`transposed_weight_grad`)."""
    lead = x.shape[:-1]
    x_NxI = x.astype(dtype).reshape(math.prod(lead), x.shape[-1])
    y_NxO = _matmul_wt(x_NxI, w_OxI.astype(dtype), out_dtype)
    return y_NxO.reshape(*lead, w_OxI.shape[0])


def _xwt(x_NxI: jax.Array, w_OxI: jax.Array, out_dtype) -> jax.Array:
    return jnp.matmul(x_NxI, w_OxI.T, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_wt(x_NxI: jax.Array, w_OxI: jax.Array, out_dtype) -> jax.Array:
    return _xwt(x_NxI, w_OxI, out_dtype)


def _matmul_wt_fwd(x_NxI, w_OxI, out_dtype):
    return _xwt(x_NxI, w_OxI, out_dtype), (x_NxI, w_OxI)


def _matmul_wt_bwd(out_dtype, residuals, g_NxO):
    grads = {
        True: functools.partial(_grads_from_xt, out_dtype),
        False: functools.partial(_grads_as_traced, out_dtype),
    }
    return per_platform("transposed_weight_grad", grads, *residuals, g_NxO)


_matmul_wt.defvjp(_matmul_wt_fwd, _matmul_wt_bwd)


def _grads_as_traced(out_dtype, x_NxI, w_OxI, g_NxO):
    """The gradients JAX's own derivative of x·wᵀ gives."""
    dw_OxI = _transpose(lambda w: _xwt(x_NxI, w, out_dtype), w_OxI, g_NxO)
    return _input_grad(out_dtype, x_NxI, w_OxI, g_NxO), dw_OxI


def _grads_from_xt(out_dtype, x_NxI, w_OxI, g_NxO):
    """The input gradient as traced; the weight gradient as (xᵀg)ᵀ with xᵀ written out, so
    both GEMMs take an untransposed left operand. The barriers keep XLA from folding the
    transposes back into the GEMM."""
    xt_IxN = jax.lax.optimization_barrier(x_NxI.T)
    dwt_IxO = jax.lax.dot_general(
        xt_IxN, g_NxO, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype
    )
    dw_OxI = jax.lax.optimization_barrier(dwt_IxO).T.astype(w_OxI.dtype)
    return _input_grad(out_dtype, x_NxI, w_OxI, g_NxO), dw_OxI


def _input_grad(out_dtype, x_NxI, w_OxI, g_NxO):
    return _transpose(lambda x: _xwt(x, w_OxI, out_dtype), x_NxI, g_NxO)


def _transpose(linear, primal: jax.Array, cotangent: jax.Array) -> jax.Array:
    """The cotangent of `primal` under the linear map `linear`."""
    return jax.linear_transpose(linear, primal)(cotangent)[0]
