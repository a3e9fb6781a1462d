"""Starting a fine-tune from another run (`finetune.init_from`): its architecture and backbone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx

from lm.config import Config, ConfigError, ModelConfig, build_config, load_config
from lm.run_dir import read_run_config
from lm.tasks import task_for

# Model keys that change how a checkpoint's parameters are used, not what they are: a fine-tune
# may set them freely; every other model key must be the checkpoint's.
RUNTIME_MODEL_KEYS = frozenset(
    {"dropout", "dtype", "param_dtype", "remat", "attention", "init_std"}
)


def finetune_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config of a fine-tune: the YAML file `path` and `section.key=value` overrides.

    With `finetune.init_from`, the model section starts as the checkpoint's (its
    config.yaml), so the architecture need not be copied; keys the file or overrides set
    must equal the checkpoint's, except the runtime keys (`RUNTIME_MODEL_KEYS`).
    """
    # Validated only once the model section is known: the defaults may not fit this config.
    origin = build_config(path, list(overrides)).finetune.init_from
    if not origin:
        return load_config(path, list(overrides))
    source = read_run_config(origin).model
    cfg = load_config(path, list(overrides), base={"model": dataclasses.asdict(source)})
    for field in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg.model, field.name), getattr(source, field.name)
        if field.name not in RUNTIME_MODEL_KEYS and ours != theirs:
            raise ConfigError(
                f"init_from {origin}: model.{field.name}={ours} in this config but "
                f"{theirs} in the checkpoint; drop model.{field.name} (the architecture comes "
                "from the checkpoint's config.yaml) or set it to the checkpoint's value."
            )
    return cfg


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def copy_backbone(params: nnx.State, source: nnx.State, prefix: tuple, origin: str) -> nnx.State:
    """`params` with the subtree at `prefix` replaced by the backbone of `source`.

    `source` is a checkpoint's params: an MLM or task run's hold the backbone under `backbone`,
    a causal LM's are the backbone itself. Every parameter must match by name and shape, or a
    ConfigError names the first one that does not.
    """
    if "backbone" in source:
        source = source["backbone"]
    src = {path: v for path, v in nnx.to_flat_state(source)}
    flat = list(nnx.to_flat_state(params))
    mine = {path[len(prefix) :] for path, _ in flat if path[: len(prefix)] == prefix}
    fix = "make the model section match the checkpoint's config.yaml"
    for path, variable in flat:
        rel = path[len(prefix) :]
        if path[: len(prefix)] != prefix:
            continue
        if rel not in src:
            raise ConfigError(
                f"init_from {origin}: parameter '{_name(rel)}' (shape {variable.shape}) of this "
                f"config is not in the checkpoint; {fix}."
            )
        if src[rel].shape != variable.shape:
            raise ConfigError(
                f"init_from {origin}: parameter '{_name(rel)}' has shape {src[rel].shape} in the "
                f"checkpoint but {variable.shape} in this config; {fix}."
            )
    for rel, variable in src.items():
        if rel not in mine:
            raise ConfigError(
                f"init_from {origin}: checkpoint parameter '{_name(rel)}' (shape "
                f"{variable.shape}) has no place in this config; {fix}."
            )
    copied = []
    for path, variable in flat:
        if path[: len(prefix)] == prefix:
            value = variable.get_value()
            loaded = src[path[len(prefix) :]].get_value().astype(value.dtype)
            variable = variable.replace(jax.device_put(loaded, value.sharding))
        copied.append((path, variable))
    return nnx.from_flat_state(copied)


def backbone_prefix(cfg: Config) -> tuple[str, ...]:
    """Where the backbone sits in the model's parameters (under `base` with LoRA)."""
    return ("base",) * bool(cfg.finetune.lora_rank) + task_for(cfg).backbone_path
