"""THE train step, shared by every objective, plus the matching evaluation step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.runtime.mesh import constrain
from lm.train.objectives import Batch
from lm.train.state import TrainState


def _micro_batches(batch: Batch, n: int) -> Batch:
    """[B, ...] → [n, B/n, ...], taking rows i, i+n, i+2n, ... for micro-batch i.

    Strided selection keeps each micro-batch spread over the batch-sharded devices, so no
    device idles and no rows move between devices.
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, n, *x.shape[1:]), 0, 1), batch)


def reduce_sums(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-row metric sums (`*_sum`, [B]) → scalars; other metrics (`predictions`) pass through.

    The [B] vector is first gathered whole onto every device (an exact copy) and then added up
    locally, so every mesh and every process count add the same values in the same order and
    the totals are bit-identical. A cross-device all-reduce would add per-device partial sums in
    an order that depends on the collective (XLA's in-process CPU one differs from gloo's).
    """
    return {
        k: jnp.sum(constrain(v, (None,))) if k.endswith("_sum") else v for k, v in metrics.items()
    }


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective,
    shardings: TrainState,
    grad_accum: int = 1,
    dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jitted `step(state, batch) -> (state, metrics)` that donates the old state."""

    def loss_fn(params, batch, key):
        return objective.loss(nnx.merge(graphdef, params), batch, key)

    grad_of_loss = jax.grad(loss_fn, has_aux=True)

    def grad_fn(params, batch, key):
        grads, sums = grad_of_loss(params, batch, key)
        return grads, reduce_sums(sums)

    def step(state: TrainState, batch: Batch):
        key = (
            None
            if dropout_seed is None
            else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        )
        if grad_accum == 1:
            grads, sums = grad_fn(state.params, batch, key)
        else:

            def accumulate(carry, inputs):
                i, micro = inputs
                micro_key = None if key is None else jax.random.fold_in(key, i)
                g, s = grad_fn(state.params, micro, micro_key)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, batch, key))
            (grads, sums), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum), _micro_batches(batch, grad_accum))
            )
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["nll_sum"] / denom,
            "tokens": sums["weight_sum"],
            "grad_norm": optax.tree.norm(grads),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))


def make_eval_step(graphdef: nnx.GraphDef, objective) -> Callable[[nnx.State, Batch], dict]:
    """A jitted `eval(params, batch) -> metrics`: scalar sums plus any `predictions` [B, ...]."""

    def evaluate(params, batch: Batch):
        _, metrics = objective.loss(nnx.merge(graphdef, params), batch, None, evaluating=True)
        return reduce_sums(metrics)

    return jax.jit(evaluate)
