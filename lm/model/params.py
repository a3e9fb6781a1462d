"""Parameter roles as metadata on each `nnx.Param`, declared where the parameter is created.

Every parameter says, next to its logical sharding axes:
- `decay`: whether AdamW's weight decay applies (matrices yes; norms, biases, embeddings no);
- `group`: which part of the network it belongs to, for freezing (see `GROUPS`);
- `lora`: (input axes, output axes) of the matrix a LoRA adapter may wrap, or None.

The optimizer's decay mask, a fine-tune's freezing and LoRA's targets read these roles; nothing
matches parameter names. Metadata rides in the pytree structure, so it survives `jit`, scans
over layers and checkpoint restores without touching the arrays.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

# embedding: token/position/type tables and their norm; block: one Transformer layer;
# final_norm: the norm after the last block; unembed: the untied output matrix;
# head: an MLM or task head; adapter: LoRA's A and B.
GROUPS = ("embedding", "block", "final_norm", "unembed", "head", "adapter")


def param(
    value: jax.Array,
    sharding: tuple[str | None, ...] | None,
    *,
    decay: bool,
    group: str,
    lora: tuple[int, int] | None = None,
) -> nnx.Param:
    """An `nnx.Param` with its logical sharding axes and its roles."""
    if group not in GROUPS:
        raise ValueError(f"Unknown parameter group {group!r}; choose from {GROUPS}.")
    return nnx.Param(value, out_sharding=sharding, decay=decay, group=group, lora=lora)


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def role(variable: nnx.Variable, name: str) -> Any:
    """The role `name` ('decay', 'group' or 'lora') that `variable` was declared with."""
    metadata = variable.get_metadata()
    if name not in metadata:
        raise ValueError(
            f"A parameter of shape {variable.shape} declares no '{name}' role; create it with "
            "lm.model.params.param(...)."
        )
    return metadata[name]


def map_roles(fn, params: Any) -> Any:
    """`params` with every variable's value replaced by `fn(variable)` (same tree structure,
    as optax masks need)."""
    return jax.tree.map(
        lambda v: v.replace(fn(v)) if is_variable(v) else v, params, is_leaf=is_variable
    )


def decay_mask(params: Any) -> Any:
    """True for parameters that take weight decay."""
    return map_roles(lambda v: bool(role(v, "decay")), params)
