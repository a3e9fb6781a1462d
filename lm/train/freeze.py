"""What a fine-tune trains: the head, the last k blocks, LoRA adapters, or all parameters.

Frozen parameters get no optimizer update (`freeze`, plus `keep_layers_from` for the frozen
slices of scanned blocks) and no gradient (`FrozenNoGradient`), so XLA can skip their backward
pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.config import Config
from lm.tasks import task_for
from lm.train.optim import freeze, make_optimizer, path_names


def _layer_mask(x: jax.Array, first: int) -> jax.Array:
    """Bool [layers, 1, ...]: True for the stacked slices of layer `first` onwards."""
    return (jnp.arange(x.shape[0]) >= first).reshape(-1, *([1] * (x.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class FrozenNoGradient:
    """`objective` with gradients stopped at frozen parameters.

    The optimizer already ignores them (`freeze`); stopping the gradient as well lets XLA skip
    their backward pass (with a frozen backbone, everything below the head) and keeps the
    reported gradient norm to the parameters that train. With scanned blocks and
    `first_layer`, only the stacked slices of layers before it are stopped.
    """

    objective: object
    trainable: Callable[[list[str]], bool]
    first_layer: int | None = None

    def loss(self, model, batch, dropout_key=None, evaluating: bool = False):
        graphdef, params = nnx.split(model)

        def gate(path, x):
            names = path_names(path)
            if not self.trainable(names):
                return jax.lax.stop_gradient(x)
            if self.first_layer is not None and "blocks" in names:
                return jnp.where(_layer_mask(x, self.first_layer), x, jax.lax.stop_gradient(x))
            return x

        params = jax.tree_util.tree_map_with_path(gate, params)
        return self.objective.loss(nnx.merge(graphdef, params), batch, dropout_key, evaluating)


def keep_layers_from(first: int) -> optax.GradientTransformation:
    """Zero the updates of stacked-block slices before layer `first` (weight decay included).

    Their gradients are already stopped, but AdamW's decoupled weight decay would still move
    them; with this they stay bit-identical. (They keep Adam moments: one array holds all
    layers.)
    """

    def update(updates, state, params=None):
        def one(path, u):
            return jnp.where(_layer_mask(u, first), u, 0) if "blocks" in path_names(path) else u

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def first_trained_layer(cfg: Config) -> int | None:
    """With `trainable=last_k` on scanned (stacked) blocks, the first block that trains."""
    f, m = cfg.finetune, cfg.model
    if f.trainable != "last_k" or f.lora_rank or not m.scan_layers:
        return None
    return _first_kept_layer(cfg)


def _first_kept_layer(cfg: Config) -> int:
    return cfg.model.num_layers - min(cfg.finetune.last_k, cfg.model.num_layers)


def trainable_names(cfg: Config) -> Callable[[list[str]], bool] | None:
    """Which parameters train (by path names), or None when every used parameter does.

    With scanned blocks, `last_k` marks the stacked block arrays trainable as a whole;
    `first_trained_layer` then freezes their earlier slices.
    """
    f, m = cfg.finetune, cfg.model
    outputs = task_for(cfg).output_params
    # An output matrix the task never reads: freeze it rather than let weight decay erode it.
    unused = {"unembed"} - outputs
    if f.lora_rank:
        return lambda names: "adapters" in names or "head" in names
    if f.trainable == "head":
        return lambda names: "head" in names
    if f.trainable == "last_k":
        first = _first_kept_layer(cfg)
        top = {"final_norm"} | outputs

        def last_k(names: list[str]) -> bool:
            if top & set(names):
                return True
            if "blocks" not in names:
                return False
            return m.scan_layers or int(names[names.index("blocks") + 1]) >= first

        return last_k
    return (lambda names: not unused & set(names)) if unused and not m.tie_embeddings else None


def finetune_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The run's AdamW, restricted to the parameters that train (see `trainable_names`)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    first_layer = first_trained_layer(cfg)
    if first_layer is not None:
        tx = optax.chain(tx, keep_layers_from(first_layer))
    trainable = trainable_names(cfg)
    return tx if trainable is None else freeze(tx, trainable)


def gate_frozen(cfg: Config, objective):
    """`objective`, with gradients stopped at the parameters `cfg` freezes."""
    trainable = trainable_names(cfg)
    if trainable is None:
        return objective
    return FrozenNoGradient(objective, trainable, first_trained_layer(cfg))
