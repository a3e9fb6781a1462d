"""Train state (params + optimizer state + step), created already sharded on the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lm.model.transformer import abstract_split
from lm.runtime.mesh import replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: Any


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


MakeModel = Callable[[nnx.Rngs], nnx.Module]


def plan_train_state(
    make_model: MakeModel, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[nnx.GraphDef, TrainState, TrainState, Callable[[], TrainState]]:
    """(graphdef, abstract state, shardings, jitted init) of `make_model(rngs)`; nothing computed.

    Calling the init builds the state already sharded (eval_shape → partition specs →
    jit(init, out_shardings)): no parameter is ever materialised whole on one device, and
    optimizer moments are sharded exactly like the parameters they track. A resumed run
    restores onto the abstract state instead and never calls it.
    """

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            params = nnx.state(make_model(nnx.Rngs(seed)))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    with nnx.use_eager_sharding(False):
        graphdef, _ = abstract_split(lambda: make_model(nnx.Rngs(seed)))
        abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, tx, mesh)
    return graphdef, abstract, shardings, jax.jit(init, out_shardings=shardings)


def train_state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: Mesh):
    """Shardings for a TrainState: params by their logical axes, moments following params."""
    param_sh = state_shardings(abstract.params, mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract.opt_state,
        param_sh,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=_is_variable,
    )
    return TrainState(replicated(mesh), param_sh, opt_sh)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for Orbax.

    `shardings` may hold one sharding where `abstract` has an empty subtree (optax's
    `MaskedNode` for a parameter a fine-tune freezes); such subtrees pass through as they are.
    """

    def place(sharding: Any, a: Any) -> Any:
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
        return a

    return jax.tree.map(place, shardings, abstract)
