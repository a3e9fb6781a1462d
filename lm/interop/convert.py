"""`lm convert`: Hugging Face model directories (safetensors) ↔ this project's run directories.

from-hf reads `config.json`, maps it to a `Config`, and streams the weights tensor by tensor
straight onto their shardings (an FSDP mesh over all devices by default) before writing a
params-only checkpoint with `lm.run_dir.write_params_run`. to-hf loads a run's parameters and
streams them out one tensor at a time as `model.safetensors` + `config.json`, loadable by
`transformers` `from_pretrained`, with `generation_config.json` and the tokenizer files
(`lm.interop.hf_files`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from etils import epath
from flax import nnx
from jax.sharding import Mesh

from lm.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, from_dict
from lm.data.hf_tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    wordpiece_tokenizer_json,
)
from lm.interop import bert, gpt2, hf_files, llama
from lm.interop.mapping import Tensors, hf_tensors, load_params
from lm.interop.safetensors_io import SINGLE_FILE, SafetensorsReader, write_safetensors
from lm.model.build import build_model
from lm.model.transformer import abstract_split
from lm.run_dir import check_destination, load_run, read_run_config, write_params_run
from lm.runtime.mesh import make_mesh
from lm.tasks import TASKS, task_for

log = logging.getLogger(__name__)

_MODULES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama, "bert": bert}
# Buffers some checkpoints carry that are not parameters (causal masks, position ranges).
_BUFFERS = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "rotary_emb.inv_freq")
# Fields that decide the math; `to_hf` refuses a run whose values an architecture cannot express.
_ARCH_FIELDS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "kv_heads", "d_ff", "position",
    "rope_theta", "rope_scaling", "rope_scaling_factor", "norm", "mlp", "tie_embeddings", "bias",
    "norm_position", "embed_norm", "type_vocab_size", "causal", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_len",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported HF class: its module, the name prefix of backbone tensors, the head kind."""

    name: str
    module: ModuleType
    prefix: str
    head: str  # "" (backbone / causal LM) | "mlm" | "classify" (pooler + classifier)


def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{src} has no config.json; pass a Hugging Face model directory (save_pretrained)."
        )
    return json.loads(path.read_text())


def architecture(hf: dict) -> Architecture:
    """The supported architecture a config.json names, or a ValueError naming what it is."""
    model_type = hf.get("model_type", "")
    names = hf.get("architectures") or []
    supported = [n for m in _MODULES.values() for n in m.ARCHITECTURES]
    if model_type not in _MODULES or not names or names[0] not in supported:
        raise ValueError(
            f"Architecture {names[0] if names else model_type!r} (model_type {model_type!r}) "
            f"is not supported; supported: {', '.join(supported)}."
        )
    module = _MODULES[model_type]
    head = {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify"}
    return Architecture(names[0], module, module.ARCHITECTURES[names[0]], head.get(names[0], ""))


def config_from_hf(hf: dict, overrides: Sequence[str] = ()) -> Config:
    """The run config of a HF model: its architecture, project defaults for training, then
    `section.key=value` overrides (e.g. finetune.dataset=... for a sequence classifier)."""
    arch = architecture(hf)
    model = arch.module.model_config(hf)
    tree: dict = {
        "model": model,
        "data": {"seq_len": min(DataConfig().seq_len, model["max_seq_len"])},
        "train": {"objective": "mlm" if arch.head == "mlm" else "clm"},
    }
    if arch.head == "classify":
        finetune = bert.finetune_config(hf)
        problem = finetune.pop("problem_type")
        finetune["task"] = next(n for n, t in TASKS.items() if t.hf_problem_type == problem)
        tree["finetune"] = finetune
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like section.key=value.")
        key, value = item.split("=", 1)
        tree[key.strip()] = value  # a dotted key: from_dict applies it after the sections
    return from_dict(tree)


def _entries(arch: Architecture, m: ModelConfig) -> list[Tensors]:
    """Every tensor of `arch`, named by our full parameter paths."""
    backbone = arch.module.entries(m, arch.prefix)
    if arch.head == "mlm":
        return with_prefix(backbone, "backbone/") + with_prefix(bert.mlm_entries(), "head/")
    if arch.head == "classify":
        return with_prefix(backbone, "backbone/") + with_prefix(bert.classifier_entries(), "head/")
    return backbone


def with_prefix(entries: list[Tensors], prefix: str) -> list[Tensors]:
    return [dataclasses.replace(e, ours=tuple(prefix + p for p in e.ours)) for e in entries]


def import_hf(
    src: str | Path, mesh: Mesh | None = None, overrides: Sequence[str] = ()
) -> tuple[Config, nnx.GraphDef, nnx.State]:
    """(config, graphdef, params) of the HF model directory `src`, params sharded on `mesh`
    (default: FSDP over all devices); tensors are read and placed one at a time."""

    src = Path(src)
    hf = read_hf_config(src)
    cfg, arch = config_from_hf(hf, overrides), architecture(hf)
    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=-1))
    with nnx.use_eager_sharding(False):
        graphdef, abstract = abstract_split(lambda: build_model(cfg, nnx.Rngs(0)))
    entries = _entries(arch, cfg.model)
    with SafetensorsReader(src) as reader:
        params = load_params(reader, entries, abstract, mesh, cfg.model.num_layers)
        used = {
            name.format(i=i)
            for e in entries
            for name in e.hf
            for i in range(cfg.model.num_layers if e.per_layer else 1)
        }
        ignored = [
            k
            for k in reader
            if k not in used and not k.endswith(_BUFFERS) and k != "lm_head.weight"
        ]
    if ignored:
        log.warning("%s: not imported (no counterpart here): %s", src, ", ".join(ignored))
    return cfg, graphdef, params


def from_hf(
    src: str | Path,
    dst: str | Path,
    *,
    mesh: Mesh | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Config:
    """Convert the HF model directory `src` into the run directory `dst`; returns its config.

    `dst` must be empty unless `overwrite`, which replaces everything in it."""
    src, dst = Path(src), Path(dst)
    check_destination(epath.Path(dst), overwrite)  # before the import, which can take minutes
    cfg, _, params = import_hf(src, mesh, overrides)
    if not any(o.strip().startswith("train.run_dir=") for o in overrides):
        cfg.train = dataclasses.replace(cfg.train, run_dir=str(dst))  # where it really lives
    arch = architecture(read_hf_config(src))
    meta = {"converted_from": str(src), "architecture": arch.name}
    write_params_run(dst, cfg, params, meta, overwrite=overwrite)
    shutil.copyfile(src / "config.json", dst / hf_files.SOURCE_CONFIG)  # dropout, special ids
    copy_tokenizer(src, dst)
    return cfg


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy `src`'s tokenizer into `dst`: tokenizer.model (SentencePiece), else tokenizer.json
    with its special_tokens_map.json, tokenizer_config.json and chat_template.jinja, else a
    tokenizer.json built from a WordPiece vocab.txt."""

    beside = (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, CHAT_TEMPLATE)
    for name in ("tokenizer.model", "tokenizer.json", *beside):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            if name == "tokenizer.model":
                return
    if not (dst / "tokenizer.json").is_file() and (src / "vocab.txt").is_file():
        config = src / TOKENIZER_CONFIG
        settings = json.loads(config.read_text()) if config.is_file() else {}
        lowercase = settings.get("do_lower_case", True)
        wordpiece_tokenizer_json(src / "vocab.txt", dst / "tokenizer.json", lowercase)


def export_config(cfg: Config) -> tuple[Architecture, dict]:
    """(HF class, config.json) a run is written as, or a ValueError naming what has no match."""
    m, f = cfg.model, cfg.finetune
    if f.lora_rank:
        raise ValueError(
            f"finetune.lora_rank={f.lora_rank}: LoRA adapters have no place in a plain Hugging "
            "Face model; export a run trained without LoRA."
        )
    task = task_for(cfg) if f.task else None
    hf_class = task.hf_architecture if task else ""
    if hf_class is None:
        raise ValueError(f"finetune.task={f.task} has no Hugging Face architecture here.")
    if hf_class == "BertForSequenceClassification":
        if not (f.pooler and f.pooling == "first"):
            raise ValueError(
                "A sequence classifier exports as BertForSequenceClassification only with "
                "finetune.pooler=true and finetune.pooling=first (BERT's pooler on [CLS])."
            )
        name, module = hf_class, bert
    elif cfg.train.objective == "mlm":
        name, module = "BertForMaskedLM", bert
    elif m.norm_position == "post":
        name, module = "BertModel", bert
    elif m.position == "learned":
        name, module = gpt2.EXPORT_ARCHITECTURE, gpt2
    else:
        name, module = llama.EXPORT_ARCHITECTURE, llama
    problem_type = task.hf_problem_type if task else ""
    hf = bert.hf_config(m, name, f, problem_type) if module is bert else module.hf_config(m)
    expected = ModelConfig(**module.model_config(hf))
    for field in _ARCH_FIELDS:
        ours, theirs = getattr(m, field), getattr(expected, field)
        if ours != theirs:
            key = "num_kv_heads" if field == "kv_heads" else field
            raise ValueError(
                f"model.{key}={ours} has no equivalent in {name}, which needs "
                f"model.{key}={theirs}; this run cannot be written as a Hugging Face model."
            )
    return architecture(hf), hf


def to_hf(run_dir: str | Path, dst: str | Path, *, mesh: Mesh | None = None) -> str:
    """Write run `run_dir`'s newest parameters as a HF model directory `dst`: config.json
    (with the special ids and an imported model's dropout values), model.safetensors,
    generation_config.json (causal models) and the tokenizer; returns the HF class."""

    cfg = read_run_config(run_dir)
    arch, hf = export_config(cfg)
    run = load_run(run_dir, mesh=mesh)
    m = cfg.model
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shapes, fetch = hf_tensors(run.params, _entries(arch, m), m.num_layers, m.scan_layers)
    write_safetensors(dst / SINGLE_FILE, shapes, fetch, {"format": "pt"})
    source = hf_files.source_config(run_dir, cfg.finetune.init_from)
    ids = hf_files.special_ids(run.tokenizer, source)
    hf.update(ids)
    hf.update(hf_files.original_dropout(hf, source, m.dropout))
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if m.causal:
        generation = hf_files.generation_config(ids)
        (dst / hf_files.GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    if run.tokenizer is not None:
        hf_files.write_tokenizer(run.tokenizer, dst, m.max_seq_len)
    return arch.name
