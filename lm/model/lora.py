"""LoRA (Hu et al., 2021) as a functional parameter transform on any model of this package.

`LoraModel(base, ...)` keeps the base parameters untouched and, on every call, runs the base
model with W + (alpha / r) · A · B in place of each target matrix W. A [in, r] starts random and
B [r, out] at zero, so training starts exactly at the base model. `merge_lora` folds the
adapters into plain base weights for export: the merged model computes the same function
without the adapters' extra work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.params import param, role

_SEP = "__"  # joins a parameter's path into one adapter key (no '/' or '.' in checkpoint keys)


class LoraAdapter(nnx.Module):
    """The low-rank pair of one matrix: A [..., in, r] and B [..., r, out]."""

    def __init__(self, lead: tuple[int, ...], d_in: int, d_out: int, rank: int, dtype, rngs):
        bound = 1.0 / math.sqrt(d_in)  # PEFT's kaiming-uniform(a=√5) bound for A
        a = jax.random.uniform(rngs.params(), (*lead, d_in, rank), dtype, -bound, bound)
        self.a = param(a, None, decay=True, group="adapter")
        self.b = param(jnp.zeros((*lead, rank, d_out), dtype), None, decay=True, group="adapter")


class LoraModel(nnx.Module):
    """`base` whose target matrices gain trainable low-rank updates scaled by alpha / rank."""

    def __init__(
        self,
        base: nnx.Module,
        rank: int,
        alpha: float,
        targets: Sequence[str],
        *,
        rngs: nnx.Rngs,
    ):
        # Matrices declare themselves adaptable (`lora` role): (input axes, output axes) of one
        # layer's matrix; a scanned stack of blocks adds a leading layer axis, which gets its
        # own adapter per layer.
        matrices = [
            (path, variable, role(variable, "lora"))
            for path, variable in nnx.to_flat_state(nnx.state(base, nnx.Param))
            if role(variable, "lora") is not None
        ]
        adaptable = sorted({str(path[-1]) for path, _, _ in matrices})
        unknown = sorted(set(targets) - set(adaptable))
        if unknown:
            raise ValueError(
                f"LoRA targets {unknown} are not adaptable matrices; choose from {adaptable}."
            )
        self.base = base
        self.scale = alpha / rank
        adapters = {}
        for path, variable, (in_axes, out_axes) in matrices:
            if str(path[-1]) not in targets:
                continue
            ndim = in_axes + out_axes
            shape = variable.shape
            lead = shape[: len(shape) - ndim]
            d_in = math.prod(shape[len(lead) : len(lead) + in_axes])
            d_out = math.prod(shape[len(lead) + in_axes :])
            adapters[_SEP.join(map(str, path))] = LoraAdapter(
                lead, d_in, d_out, rank, variable.get_value().dtype, rngs
            )
        if not adapters:
            raise ValueError(
                f"No parameter of the model is named one of the LoRA targets {targets}."
            )
        self.adapters = nnx.Dict(adapters)

    def merged_state(self) -> nnx.State:
        """The base model's state with every target W replaced by W + scale · A · B."""
        flat = dict(nnx.to_flat_state(nnx.state(self.base)))
        for key, adapter in self.adapters.items():
            path = tuple(int(p) if p.isdigit() else p for p in key.split(_SEP))
            w = flat[path]
            w_value = w.get_value()
            delta = jnp.matmul(adapter.a[...], adapter.b[...]) * self.scale
            flat[path] = w.replace(w_value + delta.reshape(w_value.shape).astype(w_value.dtype))
        return nnx.from_flat_state(list(flat.items()))

    def __call__(self, *args, **kwargs):
        """The base model's output with adapted weights (same arguments as the base model)."""
        return merge_lora(self)(*args, **kwargs)

    def hidden_and_head(self, *args, **kwargs) -> tuple[jax.Array, Callable]:
        """The base model's `hidden_and_head`, with the adapters merged once for both."""
        return merge_lora(self).hidden_and_head(*args, **kwargs)


def merge_lora(model: LoraModel) -> nnx.Module:
    """A plain base model whose target matrices already include the adapters' updates."""
    graphdef, _ = nnx.split(model.base)
    return nnx.merge(graphdef, model.merged_state())
