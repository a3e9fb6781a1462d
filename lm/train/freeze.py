"""What a fine-tune trains: the head, the last k blocks, LoRA adapters, or all parameters.

Each choice is a rule over the parameters' declared groups (`lm.model.params`: embedding,
block, final_norm, unembed, head, adapter); only a block's layer number comes from its path.
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
from lm.model.params import is_variable, role
from lm.tasks import task_for
from lm.train.optim import make_optimizer, path_names

# (group, path names) -> does the parameter train?
Trainable = Callable[[str, list[str]], bool]


def _layer_mask(x: jax.Array, first: int) -> jax.Array:
    """Bool [layers, 1, ...]: True for the stacked slices of layer `first` onwards."""
    return (jnp.arange(x.shape[0]) >= first).reshape(-1, *([1] * (x.ndim - 1)))


def _map_params(fn: Callable[[str, list[str], nnx.Variable], object], tree):
    """`tree` with each variable's value replaced by `fn(group, path names, variable)`; other
    leaves (e.g. optax's masked-out nodes) pass through."""

    def one(path, v):
        return v.replace(fn(role(v, "group"), path_names(path), v)) if is_variable(v) else v

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_variable)


@dataclasses.dataclass(frozen=True)
class FrozenNoGradient:
    """`objective` with gradients stopped at frozen parameters.

    The optimizer already ignores them (`freeze`); stopping the gradient as well lets XLA skip
    their backward pass (with a frozen backbone, everything below the head) and keeps the
    reported gradient norm to the parameters that train. With scanned blocks and
    `first_layer`, only the stacked slices of layers before it are stopped.
    """

    objective: object
    trainable: Trainable
    first_layer: int | None = None

    def loss(self, model, batch, dropout_key=None, evaluating: bool = False):
        graphdef, params = nnx.split(model)

        def gate(group: str, names: list[str], v: nnx.Variable) -> jax.Array:
            x = v.get_value()
            if not self.trainable(group, names):
                return jax.lax.stop_gradient(x)
            if self.first_layer is not None and group == "block":
                return jnp.where(_layer_mask(x, self.first_layer), x, jax.lax.stop_gradient(x))
            return x

        params = _map_params(gate, params)
        return self.objective.loss(nnx.merge(graphdef, params), batch, dropout_key, evaluating)


def keep_layers_from(first: int) -> optax.GradientTransformation:
    """Zero the updates of stacked-block slices before layer `first` (weight decay included).

    Their gradients are already stopped, but AdamW's decoupled weight decay would still move
    them; with this they stay bit-identical. (They keep Adam moments: one array holds all
    layers.)
    """

    def update(updates, state, params=None):
        def one(group: str, _: list[str], v: nnx.Variable) -> jax.Array:
            u = v.get_value()
            return jnp.where(_layer_mask(u, first), u, 0) if group == "block" else u

        return _map_params(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def trainable_mask(params, trainable: Trainable):
    """True where `trainable` accepts the parameter (same tree structure as `params`)."""
    return _map_params(lambda group, names, _: trainable(group, names), params)


def freeze(tx: optax.GradientTransformation, trainable: Trainable) -> optax.GradientTransformation:
    """`tx` on the trainable parameters only; the others get zero updates and no optimizer state.

    Clipping inside `tx` then measures the trainable gradients alone.
    """

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, trainable))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def first_trained_layer(cfg: Config) -> int | None:
    """With `trainable=last_k` on scanned (stacked) blocks, the first block that trains."""
    f, m = cfg.finetune, cfg.model
    if f.trainable != "last_k" or f.lora_rank or not m.scan_layers:
        return None
    return _first_kept_layer(cfg)


def _first_kept_layer(cfg: Config) -> int:
    return cfg.model.num_layers - min(cfg.finetune.last_k, cfg.model.num_layers)


def trainable_groups(cfg: Config) -> Trainable | None:
    """Which parameters train, or None when every used parameter does.

    With scanned blocks, `last_k` marks the stacked block arrays trainable as a whole;
    `first_trained_layer` then freezes their earlier slices.
    """
    f, m = cfg.finetune, cfg.model
    outputs = task_for(cfg).output_groups
    if f.lora_rank:
        return lambda group, _: group in ("adapter", "head")
    if f.trainable == "head":
        return lambda group, _: group == "head"
    if f.trainable == "last_k":
        first = _first_kept_layer(cfg)
        top = {"final_norm"} | outputs

        def last_k(group: str, names: list[str]) -> bool:
            if group in top:
                return True
            if group != "block":
                return False
            return m.scan_layers or int(names[names.index("blocks") + 1]) >= first

        return last_k
    # An output matrix the task never reads: freeze it rather than let weight decay erode it.
    if "unembed" not in outputs and not m.tie_embeddings:
        return lambda group, _: group != "unembed"
    return None


def finetune_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The run's AdamW, restricted to the parameters that train (see `trainable_groups`)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    first_layer = first_trained_layer(cfg)
    if first_layer is not None:
        tx = optax.chain(tx, keep_layers_from(first_layer))
    trainable = trainable_groups(cfg)
    return tx if trainable is None else freeze(tx, trainable)


def gate_frozen(cfg: Config, objective):
    """`objective`, with gradients stopped at the parameters `cfg` freezes."""
    trainable = trainable_groups(cfg)
    if trainable is None:
        return objective
    return FrozenNoGradient(objective, trainable, first_trained_layer(cfg))
