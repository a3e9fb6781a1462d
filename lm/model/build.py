"""Which module a config trains: the causal Transformer, the masked LM, or a task model."""

from __future__ import annotations

from flax import nnx

import lm.model.splash  # noqa: F401  (registers the "splash" kernel, which `auto` picks on TPU)
from lm.config import Config
from lm.model.heads import MaskedLM
from lm.model.lora import LoraModel
from lm.model.transformer import Transformer
from lm.tasks import task_for


def build_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """The module that `cfg` trains: the causal-LM Transformer by default."""
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
