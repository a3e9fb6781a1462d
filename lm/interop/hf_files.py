"""The files besides the weights that make an exported run a whole Hugging Face model directory:
special token ids, `generation_config.json`, the tokenizer with its `tokenizer_config.json`
(and chat template), and the dropout values of the model a run was imported from.

A SentencePiece `tokenizer.model` is described as a `LlamaTokenizer`, which `transformers`
builds from the model offline with the same ids; `add_prefix_space` follows the model's dummy
prefix (none in those trained here, `lm.data.tokenizer`; Llama's own have one). A
`tokenizer.json` keeps its own files (`special_tokens_map.json`, `tokenizer_config.json`,
`chat_template.jinja`), completed with the special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from etils import epath

from lm.data.hf_tokenizer import TOKENIZER_CONFIG
from lm.data.tokenizer import TextTokenizer

# The config.json a run was imported from (`from_hf` keeps it in the run dir): its dropout
# values, which training here does not use, go back out with the export.
SOURCE_CONFIG = "hf_config.json"
GENERATION_CONFIG = "generation_config.json"
_ROLES = ("bos", "eos", "unk", "pad", "mask", "sep", "cls")
# config.json keys that model.dropout sets (the others are dropout this project does not train).
_MODEL_DROPOUT = ("resid_pdrop", "embd_pdrop", "hidden_dropout_prob")


def special_ids(tokenizer: TextTokenizer | None, source: dict | None = None) -> dict[str, int]:
    """bos/eos/pad_token_id: the tokenizer's, else those of the imported config.json. Without a
    pad token, pad is EOS (as for GPT-2 and Llama: padding is masked, any id works)."""
    ids: dict[str, int] = {}
    for role in ("bos", "eos", "pad"):
        value = getattr(tokenizer, role) if tokenizer is not None else None
        if value is None and source is not None:
            value = source.get(f"{role}_token_id")
        if isinstance(value, int):
            ids[f"{role}_token_id"] = value
    if "pad_token_id" not in ids and "eos_token_id" in ids:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def generation_config(ids: dict[str, int]) -> dict:
    """generation_config.json: the special ids generation starts, pads and stops with; greedy
    by default, as `lm generate`."""
    return {**ids, "do_sample": False}


def source_config(run_dir: str | Path, init_from: str = "") -> dict | None:
    """The config.json the run was imported from: its own `hf_config.json`, else that of the
    run it was fine-tuned from (`finetune.init_from`), recursively; None for a native run."""
    seen: set[str] = set()
    current = str(run_dir)
    while current and current not in seen:
        seen.add(current)
        path = epath.Path(current) / SOURCE_CONFIG
        if path.is_file():
            return json.loads(path.read_text())
        config = epath.Path(current) / "config.yaml"
        if not config.is_file():
            return None
        current = (yaml.safe_load(config.read_text()) or {}).get("finetune", {}).get("init_from")
    return None


def original_dropout(hf: dict, source: dict | None, dropout: float) -> dict:
    """The imported model's dropout values for config.json `hf` (same model_type), except
    `classifier_dropout` (finetune.head_dropout) and, when the run set model.dropout, the keys
    it sets."""
    if not source or source.get("model_type") != hf.get("model_type"):
        return {}
    kept = {"classifier_dropout", *(_MODEL_DROPOUT if dropout else ())}
    return {
        k: v
        for k, v in source.items()
        if ("dropout" in k or k.endswith("pdrop")) and k not in kept and isinstance(v, int | float)
    }


def write_tokenizer(tokenizer: TextTokenizer, dst: Path, max_len: int) -> None:
    """The tokenizer's files in `dst` (a tokenizer.json brings its special tokens and chat
    template), with a `tokenizer_config.json` that `AutoTokenizer` loads."""
    tokenizer.save(dst)
    path = dst / TOKENIZER_CONFIG
    settings = json.loads(path.read_text()) if path.is_file() else {}
    sentencepiece = tokenizer.file_name == "tokenizer.model"
    # <mask>, <sep> and <cls> of the models trained here are plain pieces to `lm generate`'s
    # decoding: declared special, transformers would drop them from decoded text.
    roles = _ROLES[:4] if sentencepiece else _ROLES
    pieces = tokenizer.pieces()
    tokens = {
        f"{role}_token": pieces[getattr(tokenizer, role)]
        for role in roles
        if getattr(tokenizer, role) is not None
    }
    if sentencepiece:
        # Models trained here have no dummy prefix ("a" is "a"); Llama's own have ("▁a").
        dummy_prefix = pieces[tokenizer.encode("a")[0]].startswith("\u2581")
        settings.update(
            tokenizer_class="LlamaTokenizer",
            add_bos_token=tokenizer.bos is not None,  # `lm generate` leads prompts with BOS
            add_eos_token=False,
            add_prefix_space=dummy_prefix,
            legacy=False,
            clean_up_tokenization_spaces=False,
        )
    else:
        settings.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    settings.update({k: v for k, v in tokens.items() if k not in settings})
    settings["model_max_length"] = max_len
    path.write_text(json.dumps(settings, indent=2) + "\n")
