"""The vocabulary projection's GEMM (`dense_transposed`) and the platform choice it relies on."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lm.model.linear import dense, dense_transposed
from lm.runtime.platforms import per_platform


def head_inputs(dtype):
    r = np.random.default_rng(0)
    x_BxLxD = jnp.asarray(r.standard_normal((2, 24, 32)), dtype)
    w_VxD = jnp.asarray(r.standard_normal((96, 32)), dtype)
    g_BxLxV = jnp.asarray(r.standard_normal((2, 24, 96)), jnp.float32)
    return x_BxLxD, w_VxD, g_BxLxV


def value_and_grads(project, x, w, g):
    out, vjp = jax.vjp(lambda x, w: project(x, w, x.dtype, out_dtype=jnp.float32), x, w)
    return out, *vjp(g)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_transposed_matches_dense_of_the_transpose_in_value_and_gradients(dtype):
    x, w, g = head_inputs(dtype)
    out, dx, dw = jax.jit(lambda x, w, g: value_and_grads(dense_transposed, x, w, g))(x, w, g)
    ref_out, ref_dx, ref_dw = jax.jit(
        lambda x, w, g: value_and_grads(lambda x, w, *a, **k: dense(x, w.T, *a, **k), x, w, g)
    )(x, w, g)
    assert out.dtype == jnp.float32 and dx.dtype == dw.dtype == dtype
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(dx, ref_dx)
    # The weight gradient is the same sum of products, taken by another GEMM kernel on CPU.
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(dw, np.float32), np.asarray(ref_dw, np.float32), rtol=tol, atol=tol
    )


def test_on_cpu_every_gemm_of_the_projection_and_its_gradients_has_an_untransposed_left_operand():
    # XLA:CPU gives YNNPACK only such GEMMs; gᵀx would run in Eigen, beside YNNPACK and slower.
    x, w, g = head_inputs(jnp.float32)
    hlo = (
        jax.jit(lambda x, w, g: value_and_grads(dense_transposed, x, w, g))
        .lower(x, w, g)
        .compile()
        .as_text()
    )
    contracting = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
    assert len(contracting) == 3  # logits, input gradient, weight gradient
    assert set(contracting) == {"1"}, hlo


def test_per_platform_lowers_only_the_choice_of_the_platform_compiled_for():
    def program(x):
        choices = {True: lambda x: x + 1.5, False: lambda x: x * 3.0}
        return per_platform("transposed_weight_grad", choices, x)

    x = jnp.ones((3,))
    np.testing.assert_array_equal(jax.jit(program)(x), x + 1.5)  # this CPU's profile
    for platform, op in [("cpu", "add"), ("tpu", "multiply"), ("cuda", "multiply")]:
        text = export.export(jax.jit(program), platforms=[platform])(x).mlir_module()
        other = {"add", "multiply"} - {op}
        assert f"stablehlo.{op}" in text and f"stablehlo.{other.pop()}" not in text, platform
    # The accelerators, choosing alike, share one traced branch besides the CPU's.
    (cond,) = [e for e in jax.make_jaxpr(program)(x).eqns if e.primitive.name == "cond"]
    assert len(cond.params["branches"]) == 2
