"""Which module a config trains: the causal Transformer, the masked LM, or a task model."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

import lm.model.splash  # noqa: F401  (registers the "splash" kernel, which `auto` picks on TPU)
from lm.config import Config
from lm.model.heads import MaskedLM
from lm.model.lora import LoraModel
from lm.model.transformer import Transformer
from lm.tasks import task_for

# `model.attention=auto`: the kernel each platform runs best; XLA's elsewhere.
_AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn"}


def resolve_attention(cfg: Config) -> Config:
    """`cfg` with `model.attention=auto` replaced by the kernel for this platform."""
    if cfg.model.attention != "auto":
        return cfg
    name = _AUTO_ATTENTION.get(jax.default_backend(), "xla")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=name))


def build_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """The module that `cfg` trains: the causal-LM Transformer by default."""
    cfg = resolve_attention(cfg)
    if cfg.finetune.task:
        model = task_for(cfg).model(cfg, rngs)
        if cfg.finetune.lora_rank:
            targets = [t.strip() for t in cfg.finetune.lora_targets.split(",")]
            rank, alpha = cfg.finetune.lora_rank, cfg.finetune.lora_alpha
            model = LoraModel(model, rank, alpha, targets, rngs=rngs)
        return model
    if cfg.train.objective == "mlm":
        return MaskedLM(cfg.model, rngs=rngs)
    return Transformer(cfg.model, rngs=rngs)
