"""Optax chains: AdamW with warmup + decay, global-norm clipping, and weight decay where each
parameter declares it (`lm.model.params`)."""

from __future__ import annotations

import optax

from lm.config import OptimConfig
from lm.model.params import decay_mask


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio`.

    Step s uses the schedule's value at s + 1, so the first update is not wasted at lr 0.
    """
    schedule = _schedule(cfg, total_steps)
    return lambda step: schedule(step + 1)


def _schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end
        )
    decay_steps = max(total_steps - warmup, 1)
    after = (
        optax.linear_schedule(cfg.lr, end, decay_steps)
        if cfg.schedule == "linear"
        else optax.constant_schedule(cfg.lr)
    )
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def path_names(path) -> list[str]:
    """The names along a pytree key path, e.g. ['backbone', 'blocks', 'attn', 'wq']."""
    return [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The run's optimizer; gradient accumulation happens in the train step, not here."""
    adamw = optax.adamw(
        learning_rate(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
