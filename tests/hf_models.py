"""Tiny random `transformers` models (GPT-2, Llama, BERT) and a byte-level BPE tokenizer.json
for the Hugging Face interop and generation tests; import after `pytest.importorskip("torch")`
and `pytest.importorskip("transformers")`."""

from pathlib import Path

import torch
import transformers

VOCAB = 96
ENDOFTEXT = "<|endoftext|>"


def gpt2(vocab_size: int = VOCAB, **kwargs) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64, **kwargs
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama(vocab_size: int = VOCAB, **kwargs) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kwargs,
    )
    return transformers.LlamaForCausalLM(cfg)


def bert_config(**kwargs) -> transformers.BertConfig:
    return transformers.BertConfig(
        **kwargs,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def randomize(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random values (std `scale`) for every tensor, norm scales around 1, so zero biases or
    unit norms cannot hide a mapping bug; a large `scale` makes next-token distributions peaked
    (no near-ties that float rounding could flip). Returns the model, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = 1.0 if p.ndim == 1 and not name.endswith("bias") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + one)
    return model.eval()


def save(model: torch.nn.Module, tmp_path_factory, name: str) -> Path:
    """`model` written with save_pretrained into a fresh temporary directory."""
    path = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(path)
    return path


def bpe_tokenizer_json(directory: Path, texts: list[str], vocab_size: int) -> Path:
    """A GPT-2 style byte-level BPE `tokenizer.json` trained offline on `texts`, whose only
    special token <|endoftext|> (id 0) is both BOS and EOS."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[ENDOFTEXT],
        show_progress=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"
